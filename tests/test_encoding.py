import numpy as np

from moekd.encoding import MAX_ABS_ERROR, MAX_GAP, decode_logprobs, encode_logprobs


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
