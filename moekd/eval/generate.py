"""Load a checkpoint with its tokenizer and sample responses the way the published work does.

Sampling is pure ancestral sampling from the model's distribution: temperature 1, top_k 0,
top_p 1, nothing else. transformers fills every decoding parameter we leave unset from the
checkpoint's generation_config.json and then from its global defaults (top_k=50), so the
checkpoint's decoding defaults are swapped out for an empty config while we generate.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from moekd.errors import MoekdError
from moekd.models import load_causal_lm, load_tokenizer, resolve_device

SAMPLING = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def load_model(model_dir: str | Path, device: str = "auto"):
    """(model, tokenizer) of a saved checkpoint directory, the model in eval mode on `device`."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise MoekdError(f"--model: {model_dir} does not exist")
    if not model_dir.is_dir():
        raise MoekdError(f"--model: {model_dir} is not a directory; pass a checkpoint saved with save_pretrained")
    if not (model_dir / "config.json").exists():
        raise MoekdError(f"--model: {model_dir} has no config.json; pass a checkpoint saved with save_pretrained")
    device = resolve_device(device)
    tokenizer = load_tokenizer(model_dir, "--model")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return load_causal_lm(model_dir, dtype, device, "--model"), tokenizer


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus any the checkpoint's generation config adds (e.g. an end-of-turn token)."""
    ids = {tokenizer.eos_token_id}
    extra = model.generation_config.eos_token_id
    ids.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return sorted(ids)


def generate_responses(
    model,
    tokenizer,
    prompts: list[list[int]],
    seed: int,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    greedy: bool = False,
    routing=None,
    row_seeds: list[int] | None = None,
    on_batch=lambda prompts: None,
) -> list[str]:
    """One response per prompt (token ids), batched in the given order with left padding, cut at EOS.

    torch is seeded once with `seed` before the first batch, so the same prompts, seed and
    batch size give the same responses. `greedy` decodes by argmax instead (for checks).
    `routing` (a RouterController of `model`) routes its MoE layers by a policy while it
    generates, with one seed per prompt in `row_seeds` for a stochastic policy. `on_batch(n)` is
    called after each batch of n prompts (a progress bar).
    """
    eos = eos_token_ids(model, tokenizer)
    continuations = sample_continuations(
        model, tokenizer, prompts, seed, max_new_tokens, batch_size, greedy, routing, row_seeds, on_batch
    )
    return [
        tokenizer.decode(ids[:-1] if ids and ids[-1] in eos else ids, skip_special_tokens=True).strip()
        for ids in continuations
    ]


def sample_continuations(
    model,
    tokenizer,
    prompts: list[list[int]],
    seed: int,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    greedy: bool = False,
    routing=None,
    row_seeds: list[int] | None = None,
    on_batch=lambda prompts: None,
) -> list[list[int]]:
    """Token ids of one sampled continuation per prompt, up to and including the first EOS (if any).

    Sampling as in `generate_responses` (which decodes these): temperature 1, top_k 0, top_p 1,
    left-padded batches in the given order, torch seeded once with `seed`; `routing` and
    `row_seeds` and `on_batch` as there.
    """
    from transformers import GenerationConfig

    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    decoding = {"do_sample": False} if greedy else SAMPLING
    config = GenerationConfig(**decoding, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    device = next(model.parameters()).device
    checkpoint_defaults = model.generation_config
    model.generation_config = GenerationConfig()
    torch.manual_seed(seed)
    continuations = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
            seeds = row_seeds[start : start + batch_size] if row_seeds is not None else None
            with torch.inference_mode(), routing.active(row_seeds=seeds) if routing is not None else nullcontext():
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            for row in out[:, width:].tolist():
                cut = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
                continuations.append(row[:cut])
            on_batch(len(batch))
    finally:
        model.generation_config = checkpoint_defaults
    return continuations
