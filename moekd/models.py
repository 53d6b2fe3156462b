"""Loading Hugging Face checkpoints (teacher or student) onto a device, and fingerprinting them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from moekd.errors import MoekdError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise MoekdError(f"--device: {device!r} is not a device moekd runs on; use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MoekdError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise MoekdError(f"--dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def checkpoint_sha256(path: str | Path) -> str | None:
    """sha256 over a local checkpoint's config and weight files (sorted by name); None for a hub id."""
    path = Path(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
    for file in files:
        h.update(file.name.encode())
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def load_tokenizer(path: str | Path, flag: str = "--teacher"):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise MoekdError(f"{flag}: cannot load a tokenizer from {path} ({str(e).splitlines()[0]}); "
                         "save the tokenizer into the checkpoint directory (or, for cache build, pass --tokenizer PATH)") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | Path, dtype: torch.dtype, device: torch.device, flag: str = "--teacher"):
    """A Hugging Face causal LM in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    if "/" not in str(path) or Path(path).exists():
        if not Path(path).is_dir():
            raise MoekdError(f"{flag}: {path} is not a checkpoint directory")
        if not (Path(path) / "config.json").exists():
            raise MoekdError(f"{flag}: {path} has no config.json; point it at a Hugging Face checkpoint directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise MoekdError(f"{flag}: cannot load a causal LM from {path} ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


def output_vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]
