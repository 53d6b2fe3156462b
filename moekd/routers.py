"""MoE routers of Hugging Face models: where they are and what their gate distribution is.

Shared by the cache builder (routing policies, gate capture) and the training side (MoE
students), so it imports neither. Routers are found through the model class's
`_can_record_outputs["router_logits"]`; each returns `(router_logits [T, N], weights [T, k],
index [T, k])` for the B*T flattened tokens.

Gate distribution g per router family (what policies select from and `gate_probs` returns):
- softmax routers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): softmax(router_logits) in float32;
- DeepSeek-V3-style routers: sigmoid(router_logits) normalised to sum 1. The correction bias
  and the group limit belong to the native top-k choice only; other policies select from g
  without them and keep the native weighting (sigmoid scores, `norm_topk_prob`, scaling).
"""

from __future__ import annotations

import torch
from torch import nn


class SoftmaxGate:
    """Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE routers: softmax gates, top-k renormalised if `norm_topk_prob`."""

    def gate_probs(self, router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1)

    def weights(self, router: nn.Module, logits: torch.Tensor, index: torch.Tensor, valid, renormalise: bool) -> torch.Tensor:
        w = self.gate_probs(router, logits).gather(1, index)
        if valid is not None:
            w = w * valid
        if renormalise or getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises
            w = w / w.sum(dim=-1, keepdim=True)
        return w


class DeepseekV3Gate:
    """DeepSeek-V3-style routers: sigmoid scores, optional renormalisation, routed scaling factor."""

    def gate_probs(self, router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float().sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True)

    def weights(self, router: nn.Module, logits: torch.Tensor, index: torch.Tensor, valid, renormalise: bool) -> torch.Tensor:
        w = logits.float().sigmoid().gather(1, index)
        if valid is not None:
            w = w * valid
        if router.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * router.routed_scaling_factor


GATES = {
    "MixtralTopKRouter": SoftmaxGate(),
    "Qwen2MoeTopKRouter": SoftmaxGate(),
    "Qwen3MoeTopKRouter": SoftmaxGate(),
    "OlmoeTopKRouter": SoftmaxGate(),
    "DeepseekV3TopkRouter": DeepseekV3Gate(),
}


def router_classes(model: nn.Module) -> tuple[type, ...]:
    """Router module classes the model declares for recording `router_logits`; empty for dense models."""
    recorders = getattr(model, "_can_record_outputs", None) or {}
    entries = recorders.get("router_logits")
    entries = entries if isinstance(entries, (list, tuple)) else [entries] if entries is not None else []
    return tuple(getattr(e, "target_class", e) for e in entries if isinstance(getattr(e, "target_class", e), type))


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module name, router) of every MoE router in the model, in forward order."""
    classes = router_classes(model)
    return [(name, m) for name, m in model.named_modules() if classes and isinstance(m, classes)]
