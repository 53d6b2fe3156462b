"""`--policy topk --experts K`: the K largest gates, checked against the native router, `all` and an explicit computation."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moekd import CacheReader
from moekd.cache_builder.build import build_cache
from moekd.cli import app
from moekd.errors import MoekdError
from moekd.routing.controller import RouterController
from moekd.routing.policies import make_policy
from moekd.tiny_models import MOE_FAMILIES
from tests.test_cache_build import options, read_all
from tests.test_routing import batch, block_io, expert_outputs, hook_counts, run
from tests.test_tiny_teachers import assert_rerouted


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_k_equal_native_k_is_the_native_policy_without_hooks(load, family):
    model = load(family)
    ids, mask = batch()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
    before = hook_counts(model)
    ctrl = RouterController(model, make_policy("topk", experts=2))
    assert not ctrl.rewrites
    with torch.no_grad(), ctrl.active():
        assert hook_counts(model) == before  # nothing installed: bit-identical by construction
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, reference)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_k_equal_n_is_all_bit_for_bit(load, family):
    model = load(family)
    ids, mask = batch()
    every, every_ctrl = run(model, make_policy("all"), ids, mask)
    k8, k8_ctrl = run(model, make_policy("topk", experts=8), ids, mask)
    assert torch.equal(k8.logits, every.logits)
    with torch.no_grad():
        assert_rerouted(k8.logits, model(input_ids=ids, attention_mask=mask).logits)
    assert all(torch.equal(a, b) for a, b in zip(k8_ctrl.activated_experts(), every_ctrl.activated_experts()))


@pytest.mark.parametrize("family, experts", [("mixtral", 4), ("olmoe", 4), ("qwen3_moe", 6), ("mixtral", 1)])
def test_k_largest_gates_renormalised_explicitly(load, family, experts):
    """Softmax routers: the K largest of softmax(x W^T), the other logits at -inf, softmax (OLMoE too, native or not)."""
    model = load(family)
    ids, mask = batch()
    block, x, y, ctrl = block_io(model, make_policy("topk", experts=experts), ids, mask)
    logits = x @ block.gate.weight.T
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(experts, dim=-1).indices, True)
    assert torch.equal(ctrl.activated_experts()[0], chosen)
    weights = torch.softmax(logits.masked_fill(~chosen, float("-inf")), dim=-1)
    explicit = torch.einsum("tn,nth->th", weights, expert_outputs(block.experts, x))
    torch.testing.assert_close(y, explicit, atol=1e-5, rtol=1e-4)


def test_k_on_deepseek_v3_selects_from_g_and_keeps_native_weighting(load):
    """DeepSeek-V3: the K largest sigmoid scores (no correction bias, no group limit), weighted natively:
    sigmoid scores renormalised over the K (norm_topk_prob) times routed_scaling_factor."""
    model = load("deepseek_v3")
    ids, mask = batch()
    block, x, y, ctrl = block_io(model, make_policy("topk", experts=4), ids, mask)
    router = block.gate
    scores = (x.float() @ router.weight.T).sigmoid()
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(4, dim=-1).indices, True)
    assert torch.equal(ctrl.activated_experts()[0], chosen)
    weights = scores * chosen
    weights = weights / weights.sum(dim=-1, keepdim=True) * router.routed_scaling_factor
    explicit = torch.einsum("tn,nth->th", weights, expert_outputs(block.experts, x)) + block.shared_experts(x)
    torch.testing.assert_close(y, explicit, atol=1e-5, rtol=1e-4)


def test_errors_name_the_flag(load):
    with pytest.raises(MoekdError, match="--experts must be at least 1"):
        make_policy("topk", experts=0)
    with pytest.raises(MoekdError, match="--experts applies only to --policy topk"):
        make_policy("ka", experts=4)
    with pytest.raises(MoekdError, match="--experts 9: the teacher has only 8 experts"):
        RouterController(load("mixtral"), make_policy("topk", experts=9))
    with pytest.raises(MoekdError, match="--experts 2 needs an MoE teacher"):
        RouterController(load("llama"), make_policy("topk", experts=2))
    assert make_policy("topk", experts=3).describe() == {"experts": 3}
    assert make_policy("topk", **make_policy("topk", experts=3).describe()) == make_policy("topk", experts=3)


def test_cache_build_records_k_and_native_k_gives_the_topk_store(make_teacher, data_file, tmp_path):
    teacher = make_teacher("mixtral")
    build_cache(options(teacher, data_file, tmp_path / "topk.zarr"))
    result = CliRunner().invoke(
        app,
        [
            "cache",
            "build",
            "--teacher",
            str(teacher),
            "--data",
            str(data_file),
            "--out",
            str(tmp_path / "k2.zarr"),
            "--experts",
            "2",
            "--k",
            "16",
            "--max-prompt-len",
            "96",
            "--max-len",
            "128",
            "--batch-tokens",
            "512",
            "--positions-per-shard",
            "256",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    build_cache(options(teacher, data_file, tmp_path / "k4.zarr", policy_params={"experts": 4}))
    assert CacheReader(tmp_path / "k2.zarr").meta.policy.params == {"experts": 2}
    assert CacheReader(tmp_path / "k4.zarr").meta.policy.params == {"experts": 4}
    native, k2, k4 = (read_all(tmp_path / f"{n}.zarr") for n in ("topk", "k2", "k4"))
    assert all(np.array_equal(native[name], k2[name]) for name in native)
    assert not np.array_equal(native["topk_ids"], k4["topk_ids"]) or not np.array_equal(
        native["topk_logprobs"], k4["topk_logprobs"]
    )
