"""Routing policies and gate distributions through `cache build`, checked against the teacher itself."""

import numpy as np
import pytest
import torch

from moekd import CacheReader
from moekd.cache_builder.build import build_cache
from moekd.encodings.topk import decode_topk, encode_topk, sparse_next_token
from moekd.errors import MoekdError
from moekd.routing.controller import RouterController
from moekd.routing.policies import make_policy
from moekd.seeds import derive_seed
from moekd.store.verify import verify_store
from tests.test_cache_build import options


def _teacher(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_ka_samples_are_stored_apart_and_recompute_exactly(make_teacher, data_file, tmp_path):
    teacher = make_teacher("mixtral")
    out = tmp_path / "ka.zarr"
    # batch_tokens=1 runs every example alone, so a single-example recomputation is bit-identical
    build_cache(
        options(
            teacher,
            data_file,
            out,
            policy="ka",
            policy_params={"samples": 2, "ka_lambda": 0.5},
            seed=7,
            batch_tokens=1,
            k=8,
        )
    )
    reader = CacheReader(out)
    meta = reader.meta
    assert meta.policy.name == "ka" and meta.policy.samples == 2 and meta.policy.stochastic
    assert meta.policy.params == {"ka_lambda": 0.5, "ka_drop": 1} and meta.policy.seed == 7
    assert reader[0].topk_ids.shape[1] == 2
    model = _teacher(teacher)
    policy = make_policy("ka", samples=2, ka_lambda=0.5)
    controller = RouterController(model, policy)
    differ = 0
    for i in (0, 13, 95):
        ex = reader[i]
        samples = []
        ids = torch.from_numpy(ex.input_ids[None]).long()
        targets = torch.zeros_like(ids, dtype=torch.bool)
        targets[0, ex.target_positions] = True
        for m in range(2):
            with torch.no_grad(), controller.active(row_seeds=[derive_seed(7, ex.source_index, m)]):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=targets).logits
            top_id, top_lp, tail = sparse_next_token(logits, 8)
            stored = encode_topk(top_id.numpy(), top_lp.numpy(), tail.numpy(), meta.encoding.scale)
            stored_ids, logprobs, _ = decode_topk(**stored, scale=meta.encoding.scale)
            np.testing.assert_array_equal(ex.topk_ids[:, m], stored_ids)
            np.testing.assert_array_equal(ex.topk_logprobs[:, m], logprobs)
            samples.append(top_lp)
        differ += not torch.equal(*samples)
    assert differ >= 2, "the two KA samples should differ on most examples"


def test_deterministic_policy_refuses_several_samples(make_teacher, data_file, tmp_path):
    with pytest.raises(MoekdError, match="--m 2 with --policy all: the policy is deterministic"):
        build_cache(
            options(make_teacher("mixtral"), data_file, tmp_path / "c.zarr", policy="all", policy_params={"samples": 2})
        )


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_stored_full_gates_equal_router_probabilities(family, make_teacher, data_file, tmp_path):
    teacher = make_teacher(family)
    out = tmp_path / "g.zarr"
    build_cache(options(teacher, data_file, out, router_probs="full"))
    reader = CacheReader(out)
    gates = reader.meta.gates
    assert gates.mode == "full" and gates.r == gates.num_experts == 8 and len(gates.layers) == 2
    model = _teacher(teacher)
    for i in (0, 50):
        ex = reader[i]
        with torch.no_grad():
            out_ = model(torch.from_numpy(ex.input_ids[None]).long(), output_router_logits=True)
        logits = torch.stack([layer.float() for layer in out_.router_logits], dim=1)  # [T, L, N]
        probs = (
            torch.softmax(logits, -1)
            if family != "deepseek_v3"
            else logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True)
        )
        expected = probs[torch.from_numpy(ex.target_positions).long()].numpy()
        np.testing.assert_allclose(ex.extra["gate_probs"][:, 0].astype(np.float32), expected, atol=1e-3, rtol=2e-3)
    assert verify_store(str(out), deep=True).ok


def test_top_r_gates_keep_the_largest_and_the_rest_mass(make_teacher, data_file, tmp_path):
    teacher = make_teacher("olmoe")
    build_cache(options(teacher, data_file, tmp_path / "full.zarr", router_probs="full"))
    build_cache(options(teacher, data_file, tmp_path / "top.zarr", router_probs="top-3"))
    full, top = CacheReader(tmp_path / "full.zarr")[4].extra, CacheReader(tmp_path / "top.zarr")[4].extra
    probs = full["gate_probs"].astype(np.float64)
    expected_ids = np.argsort(-probs, axis=-1, kind="stable")[..., :3]
    picked = np.take_along_axis(probs, top["gate_ids"].astype(np.int64), axis=-1)
    np.testing.assert_allclose(picked, np.take_along_axis(probs, expected_ids, -1), atol=2e-3)
    np.testing.assert_allclose(top["gate_rest"] + top["gate_probs"].astype(np.float64).sum(-1), 1.0, atol=3e-3)
    assert CacheReader(tmp_path / "top.zarr").meta.gates.mode == "top"
    from moekd.store.info import store_info

    info = store_info(str(tmp_path / "top.zarr"))
    gate_bytes = sum(info["bytes_per_array"][name] for name in ("gate_ids", "gate_probs", "gate_rest"))
    samples = info["meta"].layout.num_positions * info["meta"].layout.num_samples
    assert info["gate_bytes_per_position_sample"] == gate_bytes / samples > 0


@pytest.mark.parametrize("value, message", [("top-9", "1 <= R < 8"), ("some", "is not none, full or top-R")])
def test_router_probs_errors(value, message, make_teacher, data_file, tmp_path):
    with pytest.raises(MoekdError, match=message):
        build_cache(options(make_teacher("mixtral"), data_file, tmp_path / "c.zarr", router_probs=value))


def test_router_probs_on_dense_teacher(make_teacher, data_file, tmp_path):
    with pytest.raises(MoekdError, match="--router-probs full needs an MoE teacher"):
        build_cache(options(make_teacher("llama"), data_file, tmp_path / "c.zarr", router_probs="full"))
