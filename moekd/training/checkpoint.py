"""Checkpoints of a training run, and where a run resumes from.

A run directory holds `config.json` (the resolved configuration), `metrics.jsonl`/`.csv`,
`step-XXXXXX/` checkpoints and `final/`. A checkpoint directory holds the model
(`save_pretrained`, safetensors), the tokenizer, `training_state.pt` (optimizer, scheduler, RNG
states, loader position, counters) and, written last and atomically, `checkpoint.json` with
the step and the configuration. A directory without that marker is an interrupted save: it is
never resumed from, and saving the same step again replaces it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import torch

from moekd.errors import MoekdError
from moekd.fsio import atomic_write, setting_differences

MARKER = "checkpoint.json"
STATE = "training_state.pt"
RUN_CONFIG = "config.json"
FINAL = "final"
STEP_DIR = re.compile(r"step-(\d{6,})")


def step_dir(out: Path, step: int) -> Path:
    return out / f"step-{step:06d}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def latest_checkpoint(out: Path) -> Path | None:
    """The complete step checkpoint of `out` with the highest step, if any."""
    found = [(int(m.group(1)), p) for p in out.glob("step-*") if (m := STEP_DIR.fullmatch(p.name)) and is_complete(p)]
    return max(found)[1] if found else None


def config_hash(config: dict, ignore: tuple[str, ...]) -> str:
    kept = {k: v for k, v in config.items() if k not in ignore}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints of `out` (incomplete ones older than those too)."""
    found = sorted((int(m.group(1)), p) for p in out.glob("step-*") if (m := STEP_DIR.fullmatch(p.name)))
    complete = [step for step, p in found if is_complete(p)]
    if len(complete) <= keep:
        return
    oldest_kept = complete[-keep]
    for step, path in found:
        if step < oldest_kept:
            shutil.rmtree(path)


def save_checkpoint(
    path: Path, model, tokenizer, state: dict | None, step: int, config: dict, ignore: tuple[str, ...]
) -> None:
    """Write a checkpoint; `state` None saves the model only (final/). `model` is anything with
    `save_pretrained(directory)`; `tokenizer` None saves none."""
    if path.exists():
        shutil.rmtree(path)  # an interrupted save of the same step, or an older final/
    path.mkdir(parents=True)
    model.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    if state is not None:
        torch.save(state, path / STATE)
    marker = {"step": step, "config_sha256": config_hash(config, ignore), "config": config}
    atomic_write(path / MARKER, json.dumps(marker, indent=2, default=str).encode())


def load_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def load_state(path: Path) -> dict:
    if not (path / STATE).is_file():
        raise MoekdError(f"--resume {path}: no {STATE}; it is a model-only checkpoint (final/), not a resumable one")
    return torch.load(path / STATE, weights_only=True)


def resume_point(out: Path, config: dict, resume: str | None, ignore: tuple[str, ...]) -> Path | None:
    """The checkpoint to continue from (None: start fresh), or an error when `out` holds another run."""
    saved = json.loads((out / RUN_CONFIG).read_text()) if (out / RUN_CONFIG).is_file() else None
    if saved is not None:
        differences = setting_differences(saved, config, ignore)
        if differences:
            raise MoekdError(
                f"--out {out} holds a run with another configuration ({'; '.join(differences)}); "
                "use the same settings to continue it, or choose another --out"
            )
        if resume is None:
            raise MoekdError(
                f"--out {out} already holds this run; pass --resume auto to continue it, or choose another --out"
            )
        if is_complete(out / FINAL):
            raise MoekdError(f"--out {out}: this run is finished ({out / FINAL} exists); nothing to resume")
    elif out.exists() and any(out.iterdir()):
        raise MoekdError(f"--out {out} is not empty and holds no moekd run; choose a new or empty directory")
    if resume in (None, "auto"):
        return latest_checkpoint(out) if saved is not None else None
    path = Path(resume)
    if not is_complete(path):
        raise MoekdError(
            f"--resume {path}: not a complete checkpoint (no {MARKER}); pass a step-XXXXXX directory or auto"
        )
    differences = setting_differences(load_marker(path)["config"], config, ignore)
    if differences:
        raise MoekdError(f"--resume {path} was trained with another configuration: {'; '.join(differences)}")
    return path
