"""The settings of a Student-Aware Router run (`moekd sar train`), checked where they enter."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from moekd.data.records import check_max_examples
from moekd.errors import MoekdError
from moekd.options import data_field_parts, option, read_recorded
from moekd.sar.objective import TEACHER_KLDS

RESPONSES = ("data", "student")
DEFAULT_STUDENT_LR = 1e-5
# Settings that do not change what the run computes: they may differ when resuming.
RUN_ONLY = ("out", "resume", "device", "save_every", "moekd_version")


@dataclass
class SarOptions:
    teacher: str = option(
        help="MoE teacher checkpoint directory: any family whose routers moekd recognises (see `moekd routing families`)."
    )
    student: str = option(
        help="Student checkpoint directory; its tokenizer must map tokens to ids as the teacher's does."
    )
    data: str = option(
        help="Training data (.jsonl, .json, .parquet or a datasets directory): the prompts, and the responses with --responses data."
    )
    out: str = option(
        help="Router file to write, e.g. router.safetensors; the run (metrics, checkpoints) goes to router.run/ beside it."
    )  # the router file, e.g. router.safetensors
    steps: int = option(200, "Router updates.")
    lr: float = option(5e-6, "AdamW learning rate of the routers (published 1e-6 .. 5e-6).")
    beta: float = option(0.01, "Weight β of the load-balancing term CV(importance)² + CV(load)², per MoE layer.")
    teacher_kld: str = option("reverse", "reverse: KL(p_T || q_s) (published); forward: -Σ q_s log p_T.")
    responses: str = option(
        "data",
        "data: the dataset's responses; student: the student samples a response each step (published, on-policy).",
    )
    co_train_student: bool = option(
        False,
        "Alternate one router step and one student step (reverse KL against the updated teacher); saves the student to router.student/.",
    )
    student_lr: float | None = option(
        None, "AdamW learning rate of the co-trained student (default 1e-5)."
    )  # DEFAULT_STUDENT_LR when co-training
    batch_tokens: int = option(4096, "Padded tokens per batch (rows x longest row of the data).")
    gradient_checkpointing: bool = option(
        False, "Recompute the teacher's layer activations in backward instead of keeping them."
    )
    dtype: str = option(
        "auto",
        "Teacher compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16; routers stay float32.",
    )
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    seed: int = option(0, "Seed of the batch order and the sampled responses.")
    resume: str | None = option(
        None, "auto (newest complete checkpoint in router.run/, or a fresh start) or a step-XXXXXX directory."
    )
    max_grad_norm: float = option(1.0, "Gradient clipping norm (routers; the student too).")
    max_new_tokens: int = option(256, "--responses student: longest sampled response.")
    save_every: int = option(50, "Resumable checkpoint every N steps; 0: none.")
    max_prompt_len: int = option(256, "Longest prompt in tokens.")
    max_len: int = option(512, "Longest prompt+response in tokens (responses are truncated).")
    chat_template: bool = option(
        False, "Build prompts with the tokenizer's chat template instead of the Dolly template."
    )
    fields: dict = option(default_factory=dict, help="the fields of a row", parts=data_field_parts())
    skip_invalid: bool = option(False, "Leave out bad or over-long rows instead of stopping.")
    max_examples: int | None = option(None, "Use only the first N rows of --data (a smoke run).")


def run_dir(out: str | Path) -> Path:
    """Where a run keeps config.json, metrics and checkpoints: `router.run/` beside `router.safetensors`."""
    out = Path(out)
    return out.with_name(out.stem + ".run")


def student_dir(out: str | Path) -> Path:
    """Where --co-train-student saves the student: `router.student/` beside `router.safetensors`."""
    out = Path(out)
    return out.with_name(out.stem + ".student")


def recorded_run(values: dict) -> dict | None:
    """The settings the run of --out recorded (router.run/config.json), when it is being resumed: `moekd sar
    train --out router.safetensors --resume auto` needs no other flag."""
    return read_recorded(run_dir(values["out"]) / "config.json") if values.get("resume") and values.get("out") else None


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
    check_max_examples(o.max_examples)
    if o.save_every < 0:
        raise MoekdError(f"--save-every must be >= 0, got {o.save_every}")
