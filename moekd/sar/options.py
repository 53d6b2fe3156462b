"""The settings of a Student-Aware Router run (`moekd sar train`), checked where they enter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from moekd.errors import MoekdError
from moekd.sar.objective import TEACHER_KLDS

RESPONSES = ("data", "student")
DEFAULT_STUDENT_LR = 1e-5
# Settings that do not change what the run computes: they may differ when resuming.
RUN_ONLY = ("out", "resume", "device", "save_every", "moekd_version")


@dataclass
class SarOptions:
    teacher: str
    student: str
    data: str
    out: str  # the router file, e.g. router.safetensors
    steps: int = 200
    lr: float = 5e-6
    beta: float = 0.01
    teacher_kld: str = "reverse"
    responses: str = "data"
    co_train_student: bool = False
    student_lr: float | None = None  # DEFAULT_STUDENT_LR when co-training
    batch_tokens: int = 4096
    gradient_checkpointing: bool = False
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    resume: str | None = None
    max_grad_norm: float = 1.0
    max_new_tokens: int = 256
    save_every: int = 50
    max_prompt_len: int = 256
    max_len: int = 512
    chat_template: bool = False
    fields: dict = field(default_factory=dict)
    skip_invalid: bool = False


def run_dir(out: str | Path) -> Path:
    """Where a run keeps config.json, metrics and checkpoints: `router.run/` beside `router.safetensors`."""
    out = Path(out)
    return out.with_name(out.stem + ".run")


def student_dir(out: str | Path) -> Path:
    """Where --co-train-student saves the student: `router.student/` beside `router.safetensors`."""
    out = Path(out)
    return out.with_name(out.stem + ".student")


def check_options(o: SarOptions) -> None:
    if Path(o.out).suffix != ".safetensors":
        raise MoekdError(
            f"--out {o.out}: the router file is safetensors; give it the .safetensors suffix (e.g. router.safetensors)"
        )
    if Path(o.out).exists():
        raise MoekdError(f"--out {o.out} already exists (a finished run); choose another --out or delete it")
    if o.teacher_kld not in TEACHER_KLDS:
        raise MoekdError(f"--teacher-kld must be one of {', '.join(TEACHER_KLDS)}, got {o.teacher_kld!r}")
    if o.responses not in RESPONSES:
        raise MoekdError(f"--responses must be one of {', '.join(RESPONSES)}, got {o.responses!r}")
    if not (math.isfinite(o.lr) and o.lr > 0):
        raise MoekdError(f"--lr must be > 0 (the routers' AdamW learning rate), got {o.lr}")
    if not (math.isfinite(o.beta) and o.beta >= 0):
        raise MoekdError(f"--beta must be >= 0 (weight of the load-balancing term), got {o.beta}")
    if o.student_lr is not None and not o.co_train_student:
        raise MoekdError("--student-lr applies only with --co-train-student (the student is frozen otherwise)")
    if o.student_lr is not None and not (math.isfinite(o.student_lr) and o.student_lr > 0):
        raise MoekdError(f"--student-lr must be > 0, got {o.student_lr}")
    if o.dtype == "float16":
        raise MoekdError(
            "--dtype float16: training the routers needs bfloat16 or float32 (float16 gradients underflow "
            "without loss scaling); use --dtype bfloat16"
        )
    if not 0 <= o.seed < 2**63:
        raise MoekdError(f"--seed must be in [0, 2**63), got {o.seed}")
    positive = {
        "--steps": o.steps,
        "--batch-tokens": o.batch_tokens,
        "--max-grad-norm": o.max_grad_norm,
        "--max-new-tokens": o.max_new_tokens,
    }
    for flag, value in positive.items():
        if not value > 0:
            raise MoekdError(f"{flag} must be positive, got {value}")
    if o.save_every < 0:
        raise MoekdError(f"--save-every must be >= 0, got {o.save_every}")
