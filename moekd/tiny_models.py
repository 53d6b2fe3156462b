"""Tiny causal LMs built from configs, for the demo, tests and benchmarks.

They are saved with `save_pretrained` and loaded back through the same path as a user's
checkpoint. Random routers are nearly uniform, so router weights are re-initialised with a
large standard deviation: that gives peaked gates on which routing policies really differ.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "llama")
MOE_FAMILIES = FAMILIES[:5]


def tiny_config(
    family: str, vocab_size: int, hidden: int = 32, layers: int = 2, experts: int = 8, top_k: int = 2,
    special_ids: dict | None = None, **extra,
):
    """A small config of `family` with `vocab_size` tokens; `special_ids` sets eos/pad/bos token ids."""
    from transformers import (
        DeepseekV3Config,
        LlamaConfig,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        **(special_ids or {}),
    )
    moe = dict(num_experts_per_tok=top_k)
    if family == "mixtral":
        cfg = MixtralConfig(**common, **moe, num_local_experts=experts)
    elif family == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            **common, **moe, num_experts=experts, moe_intermediate_size=hidden,
            shared_expert_intermediate_size=2 * hidden, norm_topk_prob=False,
        )
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(**common, **moe, num_experts=experts, moe_intermediate_size=hidden, norm_topk_prob=True, head_dim=hidden // 4)
    elif family == "olmoe":
        cfg = OlmoeConfig(**common, **moe, num_experts=experts, norm_topk_prob=False)
    elif family == "deepseek_v3":
        common["num_key_value_heads"] = 4
        cfg = DeepseekV3Config(
            **common, **moe, n_routed_experts=experts, moe_intermediate_size=hidden, n_shared_experts=1,
            n_group=2, topk_group=1, first_k_dense_replace=0, routed_scaling_factor=2.5, norm_topk_prob=True,
            kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        )
    elif family == "llama":
        cfg = LlamaConfig(**common)
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    for key, value in extra.items():
        setattr(cfg, key, value)
    return cfg


def make_tiny_model(family: str, tokenizer, out_dir: str | Path | None = None, seed: int = 0,
                    router_std: float | None = 1.0, vocab_size: int | None = None, **config):
    """A randomly initialised tiny model of `family` matching `tokenizer`, saved to `out_dir` with it.

    `router_std` re-initialises the router weights (peaked gates for tests); None keeps the
    config's initialisation (near-uniform gates, as before training). `vocab_size` sets the
    embedding and output-layer rows (default: the tokenizer's size; more is allowed, as in real
    checkpoints padded for speed: the extra ids are never inputs or labels).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size: {vocab_size} is below the tokenizer's {len(tokenizer)} tokens")
    cfg = tiny_config(family, vocab_size=vocab_size or len(tokenizer), special_ids=ids, **config)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if router_std is not None and name.endswith("gate.weight") and param.dim() == 2 and param.shape[0] > 1:
                param.normal_(0.0, router_std)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    return model
