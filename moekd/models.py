"""Loading Hugging Face checkpoints (teacher or student) onto a device, and fingerprinting them."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from moekd.errors import MoekdError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
TOKENIZER_PROBE = "Below is an instruction that describes a task."
TOKENIZER_FIXES = {
    "--teacher": "pass the teacher's tokenizer with --tokenizer PATH, or save it into the checkpoint directory",
    "--tokenizer": "point --tokenizer at the directory of the teacher's own tokenizer",
}


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


def is_hub_id(path: str | Path) -> bool:
    """'org/name' naming no local file: a model on the Hugging Face hub (loaded when online)."""
    text = str(path)
    return re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", text) is not None and not Path(text).exists()


def checkpoint_dir(path: str | Path, flag: str) -> Path | None:
    """The local checkpoint directory `path` names (None for a hub id); an error when it is not one."""
    if is_hub_id(path):
        return None
    local = Path(path)
    if not local.exists():
        raise MoekdError(f"{flag}: {path} does not exist")
    if not local.is_dir():
        raise MoekdError(f"{flag}: {path} is a file, not a directory saved with save_pretrained")
    if (local / "final" / "config.json").exists() and not any(local.glob("*.safetensors")):
        raise MoekdError(
            f"{flag}: {path} is a moekd training run, not a checkpoint; pass its checkpoint {local / 'final'}"
        )
    return local


def load_tokenizer(path: str | Path, flag: str = "--teacher"):
    """The tokenizer of a checkpoint (or tokenizer) directory, refused when it cannot encode text or has no EOS."""
    from transformers import AutoTokenizer

    local = checkpoint_dir(path, flag)
    fix = TOKENIZER_FIXES.get(flag, "save the model's tokenizer into it with tokenizer.save_pretrained")
    if local is not None and not any((local / name).exists() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer of its model type, which encodes every text to nothing
        raise MoekdError(f"{flag}: {path} holds no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); {fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise MoekdError(f"{flag}: cannot load a tokenizer from {path} ({str(e).splitlines()[0]}); {fix}") from None
    probe = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if all(token == tokenizer.unk_token_id for token in probe):  # also true of no tokens at all
        got = "unknown tokens only" if probe else "no tokens at all"
        raise MoekdError(
            f"{flag}: the tokenizer in {path} ({len(tokenizer)} tokens) encodes plain English to {got}, "
            f"so it cannot encode the prompts; {fix}"
        )
    if tokenizer.eos_token_id is None:
        raise MoekdError(f"{flag}: the tokenizer in {path} defines no eos_token; set one in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | Path, dtype: torch.dtype, device: torch.device, flag: str = "--teacher"):
    """A Hugging Face causal LM in eval mode on `device`."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoModelForCausalLM

    local = checkpoint_dir(path, flag)
    if local is not None:
        if not (local / "config.json").exists():
            raise MoekdError(f"{flag}: {path} has no config.json; point it at a Hugging Face checkpoint directory")
        for file in sorted(local.glob("*.safetensors")):
            try:
                with safe_open(str(file), "pt"):
                    pass
            except SafetensorError as e:  # a copy or download cut short
                raise MoekdError(f"{flag}: {file} is not a complete safetensors file ({e}); copy it again") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise MoekdError(f"{flag}: cannot load a causal LM from {path} ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


def check_tokenizer_fits(tokenizer, model, flag: str) -> None:
    """Refuse a tokenizer that does not belong to the teacher `model`: one with ids beyond its output layer, or
    one far smaller than it (output layers are padded to a round size, not to twice the vocabulary)."""
    tokens, rows = len(tokenizer), output_vocab_size(model)
    fix = "pass the model's own tokenizer" + (" with --tokenizer" if flag == "--teacher" else "")
    if tokens > rows:
        raise MoekdError(
            f"{flag}: the tokenizer has {tokens} tokens but the model's output layer only {rows}, "
            f"so its ids would fall outside it; they do not belong together ({fix})"
        )
    if tokens < rows / 2:
        raise MoekdError(
            f"{flag}: the tokenizer has {tokens} tokens, under half of the model's {rows}-row output "
            f"layer: it belongs to another model ({fix})"
        )


def output_vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]
