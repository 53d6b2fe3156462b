"""Tiny causal LMs built from configs, for the demo, tests and benchmarks.

`make_tiny_model` builds the six hand-configured families of the demo and tests;
`make_tiny_family_model` builds any model type of the installed transformers from its own
config class, shrunk field by field (the conformance suite and `moekd routing families`).
They are saved with `save_pretrained` and loaded back through the same path as a user's
checkpoint. Their weights come from their own seeded generator (moekd/tiny_weights.py), never
from the library's random initialisation: by default an MoE model gets the "routing" recipe
(top-k experts carry about 0.6 of the gate mass and experts move the output, so routing
policies really differ), a dense one the "training" recipe (the usual small init).
"""

from __future__ import annotations

from pathlib import Path

from moekd.tiny_weights import TOP_K_FIELDS, build_tiny

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "llama")
MOE_FAMILIES = FAMILIES[:5]


def tiny_config(
    family: str,
    vocab_size: int,
    hidden: int = 32,
    layers: int = 2,
    experts: int = 8,
    top_k: int = 2,
    special_ids: dict | None = None,
    **extra,
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
            **common,
            **moe,
            num_experts=experts,
            moe_intermediate_size=hidden,
            shared_expert_intermediate_size=2 * hidden,
            norm_topk_prob=False,
        )
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            **common,
            **moe,
            num_experts=experts,
            moe_intermediate_size=hidden,
            norm_topk_prob=True,
            head_dim=hidden // 4,
        )
    elif family == "olmoe":
        cfg = OlmoeConfig(**common, **moe, num_experts=experts, norm_topk_prob=False)
    elif family == "deepseek_v3":
        common["num_key_value_heads"] = 4
        cfg = DeepseekV3Config(
            **common,
            **moe,
            n_routed_experts=experts,
            moe_intermediate_size=hidden,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=0,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
    elif family == "llama":
        cfg = LlamaConfig(**common)
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    for key, value in extra.items():
        setattr(cfg, key, value)
    return cfg


def make_tiny_model(
    family: str,
    tokenizer,
    out_dir: str | Path | None = None,
    seed: int = 0,
    init: str | None = None,
    gate_mass: float = 0.6,
    vocab_size: int | None = None,
    **config,
):
    """A tiny model of `family` matching `tokenizer`, its weights drawn from `seed`, saved to `out_dir` with it.

    `init` is the recipe of moekd/tiny_weights.py: "routing" (the default for MoE families: the
    top-k experts carry `gate_mass` of the gates) or "training" (the default for dense ones, and
    for models the demo trains). `vocab_size` sets the embedding and output-layer rows (default:
    the tokenizer's size; more is allowed, as in real checkpoints padded for speed: the extra ids
    are never inputs or labels).
    """
    from transformers import AutoModelForCausalLM

    ids = dict(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size: {vocab_size} is below the tokenizer's {len(tokenizer)} tokens")
    cfg = tiny_config(family, vocab_size=vocab_size or len(tokenizer), special_ids=ids, **config)
    init = init or ("routing" if family in MOE_FAMILIES else "training")
    model = build_tiny(lambda: AutoModelForCausalLM.from_config(cfg), seed, init, gate_mass)
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    return model


# ---------------------------------------------------------------- any family of the installed transformers

# Config fields shrunk for a CPU-sized model, by field name; a field a config class lacks is skipped.
SMALL_FIELDS = dict(
    hidden_size_per_layer_input=16,
    hidden_size=64,
    d_model=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_layers=2,
    n_layers=2,
    n_heads=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    max_position_embeddings=512,
    swa_num_attention_heads=4,
    swa_num_key_value_heads=4,
    swa_head_dim=16,
    sliding_window_size=64,
    rel_extent=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    moe_shared_expert_intermediate_size=32,
    shared_intermediate_size=32,
    shared_experts_intermediate_size=32,
    expert_ffn_hidden_size=32,
    moe_hidden_size=32,
    dense_intermediate_size=64,
    ffn_hidden_size=64,
    intermediate_size_mlp=64,
    first_k_dense_replace=0,
    num_dense_layers=0,
    is_moe=True,
    enable_moe_block=True,
    kv_lora_rank=16,
    q_lora_rank=16,
    o_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    index_head_dim=16,
    index_n_heads=2,
    index_topk=8,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_head_dim=16,
    linear_num_heads=4,
    router_hidden_size=16,
    sliding_window=64,
    attention_chunk_size=64,
    max_seq_len=512,
    moe_jitter_eps=0.01,
    keep_window_size=64,
    ssm_state_size=8,
    mamba_num_heads=8,
    mamba_head_dim=16,
    mamba_n_heads=8,
    mamba_d_state=8,
    mamba_d_head=16,
    mamba_chunk_size=16,
    chunk_size=16,
    n_groups=1,
    mamba_n_groups=1,
    attn_layer_period=2,
    attn_layer_offset=1,
    expert_layer_period=1,
    expert_layer_offset=0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
VOCAB_FIELDS = ("vocab_size", "unpadded_vocab_size", "vocab_size_per_layer_input")
EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# (cap, value when unset) - capped, never raised: a family without groups or shared experts stays so;
# an unset value that the modeling code multiplies by anyway gets the neutral one.
CAPPED_FIELDS = {"n_shared_experts": (1, 1), "n_group": (2, 1), "topk_group": (1, 1), "zero_expert_num": (2, None)}
# What the field rules cannot infer, per model type (or config class name for sub-configs without one).
FAMILY_FIELDS: dict[str, dict] = {
    "cohere2_moe": dict(logit_scale=1.0),  # its 1/16 shrinks tied logits: the embeddings would have to grow 16x
    "dots3_note_text": dict(
        swa_num_attention_heads=4,
        swa_num_key_value_heads=4,
        swa_q_lora_rank=16,
        swa_kv_lora_rank=16,
        swa_head_dim=16,
        swa_qk_nope_head_dim=8,
        swa_v_head_dim=16,
    ),  # sliding-window layer sizes
    "dots3_note_vision_encoder": dict(adapter_in_dim=64, adapter_out_dim=64),
    "dots3_note_audio_encoder": dict(adapter_input_size=64, adapter_out_dim=64),
    "DbrxAttentionConfig": dict(
        rope_theta=10000.0, clip_qkv=8.0
    ),  # DbrxAttention needs both; the class defaults lack them
    "deepseek_v4": dict(  # no hash-routed layers: their token-to-expert table is sized by top-k (tests set it to N)
        num_hidden_layers=4,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"] * 2,
        mlp_layer_types=["moe"] * 4,
    ),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),  # the default is Mamba only
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "mimo_v2_flash": dict(num_key_value_heads=2),  # sliding-window layers double the kv heads
    "qwen4_exp_text": dict(
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=16,
        indexer_budget=64,
        indexer_compress_ratio=4,
        ngram_vocab_size_base=256,
        hc_lowrank=8,
        heads_per_ngram=2,
        split_ngram_parts=4,
    ),
}


def _fields(config_class) -> dict:
    import dataclasses

    return {f.name: f for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else {}


def _layer_pattern(default, layers: int) -> dict:
    """Per-layer lists of a full-size config cut to a few layers that keep every distinct layer kind twice.

    Lists of `layers` values are per-layer settings; strictly increasing lists of layer indices
    (e.g. `moe_layers`) are renumbered.
    """
    per_layer, index_lists = {}, {}
    for key, value in vars(default).items():
        if not isinstance(value, (list, tuple)) or not value:
            continue
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if ints and all(0 <= a < b < layers for a, b in zip(value, value[1:])) and value[-1] < layers:
            index_lists[key] = set(value)
        elif len(value) == layers:
            per_layer[key] = list(value)
    if not per_layer and not index_lists:
        return {}
    kinds = [
        tuple(str(v[i]) for v in per_layer.values()) + tuple(i in s for s in index_lists.values())
        for i in range(layers)
    ]
    if len(set(kinds)) == 1:
        return {}
    keep, seen = [], {}
    for i, kind in enumerate(kinds):
        if seen.get(kind, 0) < 2:
            keep.append(i)
            seen[kind] = seen.get(kind, 0) + 1
    pattern = {key: [value[i] for i in keep] for key, value in per_layer.items()}
    pattern.update({key: [new for new, old in enumerate(keep) if old in s] for key, s in index_lists.items()})
    return {"num_hidden_layers": len(keep), **pattern}


def _default_value(default, name: str):
    """A full-size config's value of `name` (through its attribute map); per-layer values read raw."""
    try:
        return getattr(default, name, None)
    except RuntimeError:  # a heterogeneous config refuses global reads of per-layer attributes
        return vars(default).get(name)


def _small_kwargs(config_class, vocab_size: int, experts: int, top_k: int) -> dict:
    fields = _fields(config_class)
    default = config_class()
    kwargs = {k: v for k, v in SMALL_FIELDS.items() if k in fields}
    kwargs.update({k: vocab_size for k in VOCAB_FIELDS if k in fields})
    for names, cap, least in ((EXPERT_FIELDS, experts, 4), (TOP_K_FIELDS, top_k, 1)):
        for name in names:
            value = _default_value(default, name) if name in fields else False
            if value is None or (isinstance(value, int) and not isinstance(value, bool)):
                kwargs[name] = min(cap, value) if isinstance(value, int) and value >= least else cap
    for name, (cap, unset) in CAPPED_FIELDS.items():
        value = _default_value(default, name) if name in fields else False
        if value is None and unset is not None:
            kwargs[name] = unset
        elif isinstance(value, int) and not isinstance(value, bool):
            kwargs[name] = min(cap, value)
    if "qk_rope_head_dim" in fields and "head_dim" in fields:  # multi-head latent attention: rope part is the head
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
    layers = getattr(default, "num_hidden_layers", None)
    if isinstance(layers, int):
        kwargs.update(_layer_pattern(default, layers))
    for name, sub in (getattr(config_class, "sub_configs", None) or {}).items():
        if isinstance(sub, type) and name in fields:
            kwargs[name] = sub(**_small_kwargs(sub, vocab_size, experts, top_k)).to_dict()
    kwargs.update(FAMILY_FIELDS.get(getattr(config_class, "model_type", None) or config_class.__name__, {}))
    return kwargs


def tiny_family_config(model_type: str, vocab_size: int = 256, experts: int = 8, top_k: int = 2, **overrides):
    """A CPU-sized config of any model type of the installed transformers, from its config class.

    Every size field is shrunk by name (`SMALL_FIELDS`), experts and top-k are capped at
    `experts` and `top_k` (a family whose default top-k is 1 stays top-1), groups and shared
    experts at `CAPPED_FIELDS`, per-layer patterns keep each kind of layer twice, and
    `FAMILY_FIELDS` adds what a family needs beyond that.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    kwargs = _small_kwargs(config_class, vocab_size, experts, top_k)
    kwargs.update(overrides)
    return config_class(**kwargs)


def make_tiny_family_model(
    model_type: str,
    vocab_size: int = 256,
    seed: int = 0,
    init: str = "routing",
    gate_mass: float = 0.6,
    out_dir: str | Path | None = None,
    tokenizer=None,
    **overrides,
):
    """A CPU-sized causal LM of `model_type` (eval mode), its weights drawn from `seed` by the `init` recipe
    (moekd/tiny_weights.py), saved to `out_dir` if given."""
    from transformers import AutoModelForCausalLM

    config = tiny_family_config(model_type, vocab_size, **overrides)
    model = build_tiny(lambda: AutoModelForCausalLM.from_config(config), seed, init, gate_mass)
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
    return model
