"""The student as the trainer runs it: a Hugging Face causal LM split at its output layer.

`Student(model)` is an nn.Module whose forward runs the causal LM's base model (embeddings,
layers, final norm) and returns its output: `last_hidden_state` [B, T, d] and, with
`output_router_logits=True`, an MoE student's `router_logits` from the same forward
(`Student(model, router_terms=...)` holds the module that turns them into loss terms). The
output layer is not run there: the loss applies it chunk by chunk (chunked.py), so the forward
never produces [B, T, V] logits. Its parameters are the causal LM's, so wrapping a Student in
DistributedDataParallel makes that forward the synchronised one; the output layer's gradient
arrives through the loss in the same backward.

`output_layer_of(model)` describes the output layer: weight, bias, and the logit scaling or
soft-capping of the families that apply one after the lm_head (Gemma 2/3 and other
`final_logit_softcapping` configs, Cohere's `logit_scale`, Granite's and MiniCPM3's
`logits_scaling`). A Student checks once, on a few tokens, that this reproduces the model's own
logits; a family that computes them any other way is refused with a clear error instead of being
trained on the wrong logits.
"""

from __future__ import annotations

import torch

from moekd.distill.chunked import OutputLayer
from moekd.errors import MoekdError

PROBE_TOKENS = 4


class Student(torch.nn.Module):
    def __init__(self, model, flag: str = "--student", router_terms: torch.nn.Module | None = None):
        super().__init__()
        self.lm = model
        # an MoE student's router terms (router_losses.RouterObjective) and their learned τ: a submodule, so that
        # DistributedDataParallel, which wraps the Student, synchronises τ's gradient with the model's
        self.router_terms = router_terms
        check_output_layer(model, flag)

    def forward(self, input_ids: torch.Tensor, output_router_logits: bool = False):
        """The base model's output for input_ids [B, T]: last_hidden_state, router_logits when asked."""
        extra = {"output_router_logits": True} if output_router_logits else {}
        return self.lm.base_model(input_ids=input_ids, use_cache=False, **extra)

    @property
    def output_layer(self) -> OutputLayer:
        return output_layer_of(self.lm)


def output_layer_of(model) -> OutputLayer:
    """The output layer of a causal LM as the chunked loss applies it (not checked: see check_output_layer)."""
    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    logit_scale = getattr(config, "logit_scale", None) or 1.0
    logits_scaling = getattr(config, "logits_scaling", None) or 1.0
    return OutputLayer(
        head.weight,
        head.bias,
        float(logit_scale) / float(logits_scaling),
        getattr(config, "final_logit_softcapping", None),
    )


def check_output_layer(model, flag: str) -> None:
    """Refuse a model whose logits are not what output_layer_of(model) computes from its base model's hidden states."""
    name = type(model).__name__
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or model.base_model is model:
        raise MoekdError(
            f"{flag}: {name} has no linear output layer on top of a base model; moekd trains causal LMs "
            "whose logits are lm_head(final hidden state)"
        )
    layer = output_layer_of(model)
    device = head.weight.device
    probe = torch.arange(min(PROBE_TOKENS, head.weight.shape[0]), device=device).unsqueeze(0)
    training = model.training
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=probe, use_cache=False).logits.float()
        actual = layer.logits(model.base_model(input_ids=probe, use_cache=False).last_hidden_state).float()
    model.train(training)
    tolerance = (1e-4 if head.weight.dtype == torch.float32 else 2e-2) * (1 + expected.abs().max().item())
    if actual.shape != expected.shape or (actual - expected).abs().max().item() > tolerance:
        gap = (
            "a different shape"
            if actual.shape != expected.shape
            else f"up to {(actual - expected).abs().max().item():.3g} apart"
        )
        raise MoekdError(
            f"{flag}: {name} computes its logits in a way moekd does not reproduce (lm_head of the final hidden state, "
            f"with the logit scaling or soft-capping of its config): the two are {gap} on a probe. "
            "Train a student of another family"
        )
