"""The settings of a training run (`moekd train`), checked where they enter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moekd.distill.gate_maps import EXPERT_MAPS
from moekd.distill.losses import KD_LOSSES
from moekd.distill.objective import KDLoss
from moekd.distill.router_losses import TAU_RANGE
from moekd.errors import MoekdError
from moekd.paths import check_output_dir

LOSSES = (*KD_LOSSES, "ce")
ROUTER_LOSSES = ("none", "bdistill")
# Positions per chunk of the loss (chunked.py): bounds the loss's memory to [chunk, V] buffers.
# Chosen by bench/loss_scale.py's chunk sweep on this project's machine (README, Benchmarks).
LOSS_CHUNK = 1024
# Settings that do not change what the run computes: they may differ when resuming.
RUN_ONLY = ("out", "resume", "device", "workers", "eval_every", "save_every", "moekd_version", "world_size")
NOT_RECORDED = ("storage_options",)  # may hold credentials


@dataclass
class TrainOptions:
    student: str
    out: str
    cache: str | None = None
    storage_options: dict | None = None  # fsspec options for a --cache URL; never written to the run directory
    data: str | None = None
    loss: str = "fkl"
    skew_lambda: float = 0.1
    jsd_beta: float = 0.5
    temperature: float = 1.0
    ce_weight: float = 0.0
    samples: str = "mean"
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: int = 0
    max_grad_norm: float = 1.0
    batch_tokens: int = 8192
    loss_chunk: int = LOSS_CHUNK
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: int | None = None
    eval_every: int = 100
    eval_fraction: float = 0.05
    save_every: int = 500
    resume: str | None = None
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    allow_tokenizer_mismatch: bool = False
    max_prompt_len: int = 256
    max_len: int = 512
    chat_template: bool = False
    fields: dict = field(default_factory=dict)
    skip_invalid: bool = False
    # router terms for MoE students (router_losses.py, gate_maps.py)
    router_loss: str = "none"
    expert_weight: float = 0.1
    mc_draws: int = 3
    mc_alpha: float = 0.5
    coverage_weight: float = 0.5
    router_beta: float = 0.1
    router_tau_init: float = 1.0
    router_layers: str = "all"
    layer_map: str = "auto"
    expert_map: str = "group"
    router_aux_coef: float = 0.0

    def kd_loss(self) -> KDLoss:
        """The settings the logit objective reads."""
        return KDLoss(self.loss, self.temperature, self.skew_lambda, self.jsd_beta, self.ce_weight, self.loss_chunk)


def check_options(o: TrainOptions) -> None:
    if (o.cache is None) == (o.data is None):
        raise MoekdError("pass exactly one of --cache (distillation) and --data (plain SFT with --loss ce)")
    if o.loss not in LOSSES:
        raise MoekdError(f"--loss must be one of {', '.join(LOSSES)}, got {o.loss!r}")
    if o.data is not None and o.loss != "ce":
        raise MoekdError(f"--loss {o.loss} needs teacher distributions: pass --cache, or use --loss ce with --data")
    data_only = {
        "--chat-template": o.chat_template,
        "--skip-invalid": o.skip_invalid,
        **{f"--{name}-field": value is not None for name, value in o.fields.items()},
    }
    for flag, given in data_only.items():
        if o.cache is not None and given:
            raise MoekdError(f"{flag} applies to --data only: a cache's prompts were made when it was built; drop it")
    if o.data is not None and o.allow_tokenizer_mismatch:
        raise MoekdError(
            "--allow-tokenizer-mismatch applies to --cache only (there is no cache tokenizer to match); drop it"
        )
    if not 0 <= o.ce_weight <= 1:
        raise MoekdError(f"--ce-weight must be in [0, 1] (objective (1-w)·KD + w·CE), got {o.ce_weight}")
    if o.loss == "ce" and o.ce_weight:
        raise MoekdError("--ce-weight mixes CE into a KD loss; drop it with --loss ce")
    if not (math.isfinite(o.temperature) and o.temperature > 0):
        raise MoekdError(f"--temperature must be > 0, got {o.temperature}")
    if not 0 < o.skew_lambda < 1 or not 0 < o.jsd_beta < 1:
        raise MoekdError(
            f"--skew-lambda and --jsd-beta must lie strictly between 0 and 1, got {o.skew_lambda}, {o.jsd_beta}"
        )
    if o.samples not in ("mean", "random"):
        raise MoekdError(f"--samples must be mean or random, got {o.samples!r}")
    if o.schedule not in ("constant", "cosine"):
        raise MoekdError(f"--schedule must be constant or cosine, got {o.schedule!r}")
    check_output_dir(o.out, "--out")
    if o.max_steps is not None and o.epochs is not None:
        raise MoekdError("pass one of --max-steps and --epochs, not both")
    if not 0 <= o.seed < 2**63:
        raise MoekdError(f"--seed must be in [0, 2**63), got {o.seed}")
    positive = {
        "--lr": o.lr,
        "--batch-tokens": o.batch_tokens,
        "--loss-chunk": o.loss_chunk,
        "--grad-accum": o.grad_accum,
        "--max-grad-norm": o.max_grad_norm,
        "--max-steps": o.max_steps,
        "--epochs": o.epochs,
    }
    for flag, value in positive.items():
        if value is not None and not value > 0:
            raise MoekdError(f"{flag} must be positive, got {value}")
    non_negative = {
        "--weight-decay": o.weight_decay,
        "--warmup": o.warmup,
        "--eval-every": o.eval_every,
        "--save-every": o.save_every,
        "--workers": o.workers,
    }
    for flag, value in non_negative.items():
        if not value >= 0:  # NaN too
            raise MoekdError(f"{flag} must be >= 0, got {value}")
    _check_router_options(o)


def _check_router_options(o: TrainOptions) -> None:
    if o.router_loss not in ROUTER_LOSSES:
        raise MoekdError(f"--router-loss must be one of {', '.join(ROUTER_LOSSES)}, got {o.router_loss!r}")
    if o.router_loss != "none" and o.cache is None:
        raise MoekdError(
            f"--router-loss {o.router_loss} needs the teacher's gate distributions: pass --cache of a store built "
            "with --router-probs full or top-R"
        )
    if o.mc_draws < 1:
        raise MoekdError(f"--mc-draws must be at least 1, got {o.mc_draws}")
    if not 0 < o.mc_alpha <= 1:
        raise MoekdError(
            f"--mc-alpha must be in (0, 1] (the factor a drawn expert's probability is suppressed by), got {o.mc_alpha}"
        )
    if not TAU_RANGE[0] <= o.router_tau_init <= TAU_RANGE[1]:
        raise MoekdError(
            f"--router-tau-init must be in [{TAU_RANGE[0]}, {TAU_RANGE[1]}], the range τ is clamped to, "
            f"got {o.router_tau_init}"
        )
    if o.router_layers not in ("all", "last"):
        raise MoekdError(f"--router-layers must be all or last, got {o.router_layers!r}")
    if o.expert_map not in EXPERT_MAPS:
        raise MoekdError(f"--expert-map must be one of {', '.join(EXPERT_MAPS)}, got {o.expert_map!r}")
    for flag, value in {
        "--expert-weight": o.expert_weight,
        "--coverage-weight": o.coverage_weight,
        "--router-beta": o.router_beta,
        "--router-aux-coef": o.router_aux_coef,
    }.items():
        if not (math.isfinite(value) and value >= 0):
            raise MoekdError(f"{flag} must be a finite number >= 0, got {value}")
