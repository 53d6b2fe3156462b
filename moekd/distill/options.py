"""The settings of a training run (`moekd train`), checked where they enter."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from moekd.data.records import check_max_examples
from moekd.distill.gate_maps import EXPERT_MAPS
from moekd.distill.losses import KD_LOSSES
from moekd.distill.objective import KDLoss
from moekd.distill.router_losses import TAU_RANGE
from moekd.errors import MoekdError
from moekd.options import data_field_parts, option, read_recorded
from moekd.paths import check_output_dir
from moekd.store.location import parse_storage_options
from moekd.training.checkpoint import RUN_CONFIG

LOSSES = (*KD_LOSSES, "ce")
ROUTER_LOSSES = ("none", "bdistill")
# Positions per chunk of the loss (chunked.py): bounds the loss's memory to [chunk, V] buffers.
# Chosen by bench/loss_scale.py's chunk sweep on this project's machine (docs/benchmarks.md).
LOSS_CHUNK = 1024
# Settings that do not change what the run computes: they may differ when resuming.
RUN_ONLY = (
    "out",
    "resume",
    "device",
    "workers",
    "eval_every",
    "save_every",
    "save_total_limit",
    "save_dtype",
    "moekd_version",
    "world_size",
)
SAVE_DTYPES = ("float32", "bfloat16")
NOT_RECORDED = ("storage_options",)  # may hold credentials
RECORDED_AS = {"sample_mode": "samples"}  # fields renamed since runs first recorded them


@dataclass
class TrainOptions:
    student: str = option(help="Student checkpoint: a local Hugging Face causal LM directory (dense or MoE).")
    out: str = option(help="Run directory: config.json, metrics.jsonl/.csv, step-XXXXXX/ checkpoints, final/.")
    cache: str | None = option(
        None, "Teacher cache to distil from: a directory, a packed .zip, or an fsspec URL (s3://, gs://, http(s)://)."
    )
    storage_options: dict | None = option(
        None,
        "fsspec options for a --cache URL as JSON, e.g. '{\"anon\": true}' (not written to --out).",
        parse=parse_storage_options,
    )  # never written to --out
    data: str | None = option(None, "Instruction data for plain SFT with --loss ce, instead of --cache.")
    loss: str = option("fkl", "fkl, rkl, skl, srkl, jsd, tvd (over the k stored ids + tail bucket), or ce.")
    skew_lambda: float = option(0.1, "Mixing weight λ of skl and srkl.")
    jsd_beta: float = option(0.5, "β of jsd.")
    temperature: float = option(1.0, "Divides student logits and teacher log-probs (loss not scaled by T²).")
    ce_weight: float = option(0.0, "w in (1-w)·KD + w·CE, CE on the ground-truth response tokens.")
    sample_mode: str = option(
        "mean",
        "With M > 1 teacher samples: mean (average the losses) or random (one per example and epoch).",
        flag="--samples",
    )
    lr: float = option(1e-4, "Peak AdamW learning rate.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    schedule: str = option("cosine", "constant or cosine (to 0), after the warmup.")
    warmup: int = option(0, "Optimizer steps of linear warmup.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    batch_tokens: int = option(8192, "Padded tokens per micro-batch (rows x longest row).")
    loss_chunk: int = option(
        LOSS_CHUNK,
        "Positions per chunk of the loss: logits are computed chunk by chunk from the hidden states, never all at once.",
    )
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    max_steps: int | None = option(None, "Optimizer steps to train (instead of --epochs).")
    epochs: int | None = option(None, "Passes over the training examples (default 1 when --max-steps is not given).")
    eval_every: int = option(
        100, "Held-out evaluation every N steps (also before the first and after the last); 0: only those."
    )
    eval_fraction: float = option(
        0.05, "Share of the examples held out for evaluation (at least 1; 0 for none); fixed for a given dataset."
    )
    save_every: int = option(500, "Resumable checkpoint every N steps; 0: only final/.")
    save_total_limit: int | None = option(
        None, "Keep only the newest N step-XXXXXX checkpoints, deleting older ones (default: keep all)."
    )
    save_dtype: str = option("float32", "dtype of the weights in final/: float32 or bfloat16 (half the size).")
    resume: str | None = option(
        None, "auto (newest complete checkpoint in --out, or a fresh start) or a step-XXXXXX directory."
    )
    seed: int = option(0, "Seed of the batch order, the --samples random draws and torch.")
    device: str = option("auto", "auto, cpu, cuda or cuda:N (bf16 autocast on CUDA).")
    workers: int = option(2, "Loader processes reading the cache ahead of training (0: read in the training process).")
    allow_tokenizer_mismatch: bool = option(
        False, "Train although the tokenizers differ, when their token-to-id mappings are the same."
    )
    max_prompt_len: int = option(256, "--data: longest prompt in tokens.")
    max_len: int = option(512, "--data: longest prompt+response in tokens (responses are truncated).")
    chat_template: bool = option(
        False, "--data: build prompts with the tokenizer's chat template, as cache build does."
    )
    fields: dict = option(default_factory=dict, help="--data: the fields of a row", parts=data_field_parts("--data: "))
    skip_invalid: bool = option(False, "--data: leave out bad or over-long rows instead of stopping.")
    max_examples: int | None = option(
        None, "Use only the first N examples of --cache or --data (held-out ones included; a smoke run)."
    )
    # router terms for MoE students (router_losses.py, gate_maps.py)
    router_loss: str = option(
        "none",
        "MoE students: none, or bdistill (Balanced Distillation from the cache's teacher gate distributions; needs --router-probs).",
    )
    expert_weight: float = option(0.1, "bdistill: weight of the router terms, added as w·(L_mc + coverage + L_router).")
    mc_draws: int = option(3, "bdistill: Monte-Carlo expert draws K per position, sample and layer.")
    mc_alpha: float = option(
        0.5, "bdistill: a drawn expert's probability is multiplied by α (in (0, 1]) before the next draw."
    )
    coverage_weight: float = option(
        0.5, "bdistill: weight of the coverage term KL(mean teacher gates || mean student gates)."
    )
    router_beta: float = option(0.1, "bdistill: β in L_router = KL(p_T || gate(g/τ)) - β·H(gate(g/τ)).")
    router_tau_init: float = option(1.0, "bdistill: initial τ of every mapped layer (learned, clamped to [0.5, 1.5]).")
    router_layers: str = option(
        "all", "bdistill: all mapped MoE layers, or last (the student's last mapped layer, as the published code)."
    )
    layer_map: str = option(
        "auto",
        'bdistill: auto (student MoE layer s takes teacher layer round(s·(L_T-1)/(L_S-1))) or student:teacher pairs "0:0,1:2".',
    )
    expert_map: str = option(
        "group",
        "bdistill, student with fewer experts: group (sum contiguous teacher expert groups) or stride (every N_T/N_S-th, renormalised).",
    )
    router_aux_coef: float = option(
        0.0, "MoE students: weight of the student family's own load-balancing loss (0: off)."
    )

    def recorded(self) -> dict:
        """The settings a run records in its config.json, under the keys runs have always used."""
        settings = {k: v for k, v in asdict(self).items() if k not in NOT_RECORDED}
        return {RECORDED_AS.get(k, k): v for k, v in settings.items()}

    def kd_loss(self, teacher: str = "topk_tail") -> KDLoss:
        """The settings the logit objective reads, for a cache of encoding kind `teacher`."""
        return KDLoss(
            self.loss, self.temperature, self.skew_lambda, self.jsd_beta, self.ce_weight, self.loss_chunk, teacher
        )


def recorded_run(values: dict) -> dict | None:
    """The settings the run at --out recorded (its config.json), when it is being resumed: `moekd train
    --out RUN --resume auto` needs no other flag."""
    if not (values.get("resume") and values.get("out")):
        return None
    recorded = read_recorded(Path(values["out"]) / RUN_CONFIG) or {}
    return {next((f for f, key in RECORDED_AS.items() if key == k), k): v for k, v in recorded.items()}


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
    if o.sample_mode not in ("mean", "random"):
        raise MoekdError(f"--samples must be mean or random, got {o.sample_mode!r}")
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
    check_max_examples(o.max_examples)
    if o.save_total_limit is not None and o.save_total_limit < 1:
        raise MoekdError(f"--save-total-limit must be at least 1 (leave it out to keep all), got {o.save_total_limit}")
    if o.save_dtype not in SAVE_DTYPES:
        raise MoekdError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {o.save_dtype!r}")
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
