"""moekd.routing.routers: recognition by computation, and the API the training side uses."""

import pytest
import torch
from torch import nn
from transformers.utils.output_capturing import OutputRecorder

from moekd.errors import MoekdError
from moekd.routing.routers import frozen_router_tensors, gate_adapter, gate_parameters, recognise_routers
from moekd.tiny_models import make_tiny_family_model


class ScaledSigmoidRouter(nn.Module):
    """Sigmoid scores, top-2 by score + selection bias, renormalised, times a scaling factor."""

    def __init__(self, experts=6, hidden=8, scale=1.7, normalise=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, hidden))
        self.bias_for_choice = nn.Buffer(torch.rand(experts))
        self.scaling = scale
        self.normalise = normalise

    def forward(self, x):
        logits = x.reshape(-1, self.weight.shape[1]) @ self.weight.T
        scores = logits.sigmoid()
        index = (scores + self.bias_for_choice).topk(2, dim=-1).indices
        weights = scores.gather(1, index)
        if self.normalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights * self.scaling, index


class TinyMoE(nn.Module):
    _can_record_outputs = {"router_logits": OutputRecorder(ScaledSigmoidRouter, index=0)}

    def __init__(self, **router):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.block = nn.Module()
        self.block.router = ScaledSigmoidRouter(**router)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return self.block.router(self.embed(input_ids))


@pytest.mark.parametrize("normalise", [True, False])
def test_a_router_is_recognised_by_its_computation(normalise):
    torch.manual_seed(0)
    model = TinyMoE(normalise=normalise)
    (info,) = recognise_routers(model)
    adapter = info.adapter
    assert (adapter.score, adapter.normalise, adapter.scale_name, adapter.scale) == (
        "sigmoid",
        normalise,
        "scaling",
        1.7,
    )
    assert (adapter.num_experts, adapter.top_k, adapter.layout) == (6, 2, "triple")
    assert info.quirks == ("selection bias bias_for_choice (native top-k only)",)
    logits = torch.randn(5, 6)
    scores = logits.sigmoid()
    torch.testing.assert_close(adapter.gate_probs(info.module, logits), scores / scores.sum(-1, keepdim=True))
    index = torch.tensor([[0, 3, 5]] * 5)
    expected = scores.gather(1, index)
    expected = expected / expected.sum(-1, keepdim=True) if normalise else expected
    torch.testing.assert_close(adapter.weights(info.module, logits, index), expected * 1.7)
    renormalised = scores.gather(1, index) / scores.gather(1, index).sum(-1, keepdim=True)
    torch.testing.assert_close(adapter.weights(info.module, logits, index, renormalise=True), renormalised * 1.7)
    model.block.router.scaling = 3.0  # read live: router training or a config change is seen at once
    torch.testing.assert_close(adapter.weights(info.module, logits, index, renormalise=True), renormalised * 3.0)


def test_gate_parameters_and_frozen_tensors_for_router_training():
    model = make_tiny_family_model("deepseek_v3")
    infos = recognise_routers(model)
    router = infos[0].module
    assert [name for name, _ in gate_parameters(router)] == ["weight"]
    assert gate_parameters(router)[0][1] is router.weight
    assert frozen_router_tensors(router) == ["e_score_correction_bias"]
    assert gate_adapter(router) is infos[0].adapter


def test_gemma4_per_expert_scale_is_frozen_and_norm_scale_trainable():
    infos = recognise_routers(make_tiny_family_model("gemma4_text"))
    router = infos[0].module
    assert infos[0].adapter.expert_scale == "per_expert_scale"
    assert sorted(name for name, _ in gate_parameters(router)) == ["proj.weight", "scale"]
    assert frozen_router_tensors(router) == ["per_expert_scale"]


def test_gate_adapter_errors_name_the_router():
    router = ScaledSigmoidRouter()
    with pytest.raises(
        MoekdError, match="ScaledSigmoidRouter was not recognised yet: call moekd.routing.routers.recognise_routers"
    ):
        gate_adapter(router)
    infos = recognise_routers(make_tiny_family_model("jetmoe"))
    with pytest.raises(MoekdError, match=r"router class JetMoeTopKGating is not supported: it returns \(\("):
        gate_adapter(infos[0].module)
    with pytest.raises(MoekdError, match="JetMoeTopKGating is not supported"):
        gate_parameters(infos[0].module)


def test_recognition_leaves_the_model_as_it_was():
    model = make_tiny_family_model("mixtral")
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    recognise_routers(model)
    assert all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "deepseek_v3", "llama4_text", "gpt_oss"])
def test_recognition_in_bfloat16_matches_float32(family):
    """Teachers usually run in bf16: the recognised computation must not change with the dtype."""
    model = make_tiny_family_model(family)
    full = [i.adapter for i in recognise_routers(model)]
    half = [i.adapter for i in recognise_routers(model.to(torch.bfloat16))]
    assert half == full and all(a is not None for a in half)
