"""The top-k codecs: u16_steps_sorted_ids (what builds write) and u16_gap_delta (schema 1.0 stores)."""

import numpy as np
import pytest

from moekd.encodings.topk import (
    MAX_ABS_ERROR,
    MAX_GAP,
    MAX_STEPS,
    decode_logprobs,
    decode_topk,
    encode_logprobs,
    encode_topk,
)


def _sorted_logprobs(rng, rows, vocab, k):
    logits = rng.standard_normal((rows, vocab)) * rng.uniform(0.5, 6, size=(rows, 1))
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.sort(-logprobs, axis=-1)[:, :k]


def test_roundtrip_error_within_documented_bound():
    rng = np.random.default_rng(0)
    lp = _sorted_logprobs(rng, 2000, 5000, 64)
    top1, gaps = encode_logprobs(lp)
    assert gaps.dtype == np.uint16 and top1.dtype == np.float32
    decoded = decode_logprobs(top1, gaps)
    err = np.abs(decoded - lp)
    assert err.max() <= MAX_ABS_ERROR + 1e-5
    assert err.max() > MAX_ABS_ERROR / 4  # the bound is tight, not vacuous
    assert np.all(np.diff(decoded, axis=-1) <= 0)  # order preserved
    np.testing.assert_array_equal(decoded[:, 0], lp[:, 0].astype(np.float32))  # top-1 exact


def test_huge_gaps_are_clamped_not_wrapped():
    lp = np.array([[-0.1, -1.0, -300.0, -1e6]])
    decoded = decode_logprobs(*encode_logprobs(lp))
    np.testing.assert_allclose(decoded[0, :2], lp[0, :2], atol=MAX_ABS_ERROR + 1e-6)
    np.testing.assert_allclose(decoded[0, 2:], -0.1 - MAX_GAP, atol=1e-3)


def test_ties_and_extra_dims():
    lp = np.full((3, 2, 5), -2.0)
    top1, gaps = encode_logprobs(lp)
    assert gaps.shape == (3, 2, 5) and not gaps.any()
    np.testing.assert_allclose(decode_logprobs(top1, gaps), lp)


@pytest.mark.parametrize("scale", [256.0, 64.0, 16.0])
def test_sorted_ids_codec_roundtrip(scale):
    """u16_steps_sorted_ids: ids exact, in rank order; log-probs and tail within 1/(2 scale) nat."""
    rng = np.random.default_rng(1)
    vocab, k = 5000, 32
    logits = rng.standard_normal((400, vocab)) * rng.uniform(0.5, 6, size=(400, 1))
    full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-full, axis=-1)[:, :k]
    lp = np.take_along_axis(full, ids, -1)
    tail = np.log1p(-np.exp(lp).sum(-1))
    tail[0] = -np.inf
    stored = encode_topk(ids, lp, tail, scale)
    assert stored["topk_ids"].dtype == np.int32 and stored["topk_steps"].dtype == np.uint16
    assert np.all(stored["topk_ids"][:, 1:] > 0)  # ascending ids: positive deltas
    dec_ids, dec_lp, dec_tail = decode_topk(**stored, scale=scale)
    np.testing.assert_array_equal(np.sort(dec_ids, -1), np.sort(ids, -1))
    assert np.all(np.diff(dec_lp, axis=-1) <= 0)
    exact = np.take_along_axis(full, dec_ids.astype(np.int64), -1)
    err = np.abs(dec_lp - exact)
    assert err.max() <= 0.5 / scale + 1e-5 and err.max() > 0.5 / scale / 4
    assert np.isneginf(dec_tail[0]) and np.abs(dec_tail[1:] - tail[1:]).max() <= 0.5 / scale + 1e-5
    untied = np.all(np.diff(np.rint(-lp * scale), axis=-1) < 0, axis=-1)  # rows without quantised ties
    np.testing.assert_array_equal(dec_ids[untied], ids[untied])


def test_sorted_ids_codec_clamps_far_log_probs():
    stored = encode_topk(np.array([[3, 1]]), np.array([[-0.5, -1e6]]), np.array([-2000.0]), 64.0)
    _, lp, tail = decode_topk(**stored, scale=64.0)
    np.testing.assert_allclose(lp, [[-0.5, -(MAX_STEPS - 1) / 64.0]])
    np.testing.assert_allclose(tail, [-(MAX_STEPS - 1) / 64.0])
