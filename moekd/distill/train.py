"""`moekd train`: fit a student to the cached teacher distributions (or plain SFT with --loss ce).

Flow: check the store, the student's tokenizer and vocabulary against it -> hold out a fixed
eval subset -> AdamW over token-budget batches (warmup + constant/cosine schedule, grad
accumulation, clipping, bf16 autocast on CUDA) -> metrics every step, eval and checkpoints
every N steps -> final/. The teacher is never loaded: everything needed is in the store.

Objective: KD over the k stored ids + tail bucket (losses.py), averaged over the response
positions of a step; with --ce-weight w it is (1-w)·KD + w·CE on the ground-truth tokens, so
w moves between pure distillation (0) and pure SFT (1) at a constant scale. With M > 1 teacher
samples, --samples mean averages the per-sample losses and --samples random draws one sample
per example and epoch (seeded, so a resumed run draws the same).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from moekd import __version__
from moekd.models import load_causal_lm, load_tokenizer, output_vocab_size, resolve_device
from moekd.data.prompts import tokenize_records
from moekd.data.records import load_records
from moekd.data.tokenizer import tokenizer_fingerprint
from moekd.distill.checkpoint import (
    FINAL, RUN_CONFIG, latest_checkpoint, load_state, resume_point, save_checkpoint, step_dir,
)
from moekd.distill.loader import (
    BatchDataset, BatchOrder, CacheSource, LoaderPosition, TokenizedSource, held_out_split, make_loader, pack,
)
from moekd.distill.losses import KD_LOSSES, masked_cross_entropy, reduce_kd_loss, sparse_kd_loss
from moekd.distill.metrics import MetricsLog, progress_bar
from moekd.errors import MoekdError
from moekd.store.reader import CacheReader
from moekd.store.verify import verify_store
from moekd.store.writer import atomic_write

LOSSES = (*KD_LOSSES, "ce")
# Settings that do not change what the run computes: they may differ when resuming.
RUN_ONLY = ("out", "resume", "device", "workers", "eval_every", "save_every", "moekd_version")


@dataclass
class TrainOptions:
    student: str
    out: str
    cache: str | None = None
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


@dataclass
class TrainSummary:
    out: str
    steps: int
    tokens: int
    loss: float | None  # last step's training loss
    eval_loss_start: float | None  # before training (None when resumed or nothing is held out)
    eval_loss: float | None  # at the end
    resumed_from: str | None
    final_dir: str
    wall_seconds: float
    tokens_per_second: float


def train(o: TrainOptions, console: Console | None = None) -> TrainSummary:
    console = console or Console(stderr=True, quiet=True)
    started = time.perf_counter()
    _check_options(o)
    device = resolve_device(o.device)
    tokenizer = load_tokenizer(o.student, "--student")
    source, source_sha = _open_source(o, tokenizer, console)
    train_idx, eval_idx = held_out_split(len(source), o.eval_fraction)
    order = BatchOrder(train_idx, source.lengths, source.shards, o.batch_tokens, o.seed)
    epochs = None if o.max_steps else (o.epochs or 1)
    total_steps = o.max_steps or -(-sum(len(order.epoch(e)) for e in range(epochs)) // o.grad_accum)
    config = {**asdict(o), "epochs": epochs, "source_sha256": source_sha, "total_steps": total_steps,
              "train_examples": len(train_idx), "eval_examples": len(eval_idx), "moekd_version": __version__}
    out = Path(o.out)
    resume_from = resume_point(out, config, o.resume, RUN_ONLY)

    model = load_causal_lm(resume_from or o.student, torch.float32, device, "--student")
    _check_vocabulary(model, source, o.student)
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, o.warmup, total_steps, o.schedule))
    torch.manual_seed(o.seed)
    step, tokens, position = 0, 0, LoaderPosition(0, 0)
    if resume_from is not None:
        step, tokens, position = _restore(load_state(resume_from), optimizer, scheduler, device)
        console.print(f"resuming from {resume_from} (step {step})")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / RUN_CONFIG, json.dumps(config, indent=2, default=str).encode())
    log = MetricsLog(out, keep_until_step=step if resume_from else -1)

    pad_id = tokenizer.pad_token_id
    train_batches = iter(make_loader(
        BatchDataset(source, pad_id, o.samples, o.seed),
        BatchOrder(train_idx, source.lengths, source.shards, o.batch_tokens, o.seed, start=position, epochs=epochs),
        o.workers,
    ))
    eval_order = [(0, b, ex) for b, ex in enumerate(pack(eval_idx[np.argsort(-source.lengths[eval_idx], kind="stable")],
                                                         source.lengths, o.batch_tokens))]

    def evaluate() -> dict[str, float]:
        return _evaluate(model, make_loader(BatchDataset(source, pad_id, "mean", o.seed), eval_order, o.workers), o, device)

    eval_start = None
    if step == 0 and eval_order:
        eval_start = evaluate()
        log.write({"step": 0, "loss": None, "lr": scheduler.get_last_lr()[0], "tokens": 0, **eval_start})
    record, session_tokens, clock = {}, 0, time.perf_counter()
    with progress_bar(console) as progress:
        task = progress.add_task("train", total=total_steps, completed=step, loss="-", rate="-")
        while step < total_steps:
            micro = list(islice(train_batches, o.grad_accum))
            if not micro:
                break
            lr = scheduler.get_last_lr()[0]
            terms, grad_norm = _optimizer_step(model, optimizer, micro, o, device, step + 1, out)
            scheduler.step()
            step += 1
            batch_tokens = sum(b["tokens"] for b in micro)
            tokens += batch_tokens
            session_tokens += batch_tokens
            position = LoaderPosition(micro[-1]["epoch"], micro[-1]["batch"] + 1)
            rate = session_tokens / max(time.perf_counter() - clock, 1e-9)
            record = {"step": step, "epoch": micro[-1]["epoch"], **terms, "lr": lr, "grad_norm": grad_norm,
                      "tokens": tokens, "tokens_per_s": rate}
            if eval_order and ((o.eval_every and step % o.eval_every == 0) or step == total_steps):
                record.update(evaluate())
            log.write(record)
            if o.save_every and step % o.save_every == 0:
                state = _training_state(optimizer, scheduler, device, step, tokens, position)
                save_checkpoint(step_dir(out, step), model, tokenizer, state, step, config, RUN_ONLY)
            progress.update(task, completed=step, loss=f"{terms['loss']:.4f}", rate=f"{rate:,.0f}")
    save_checkpoint(out / FINAL, model, tokenizer, None, step, config, RUN_ONLY)
    log.close()
    elapsed = time.perf_counter() - clock
    return TrainSummary(
        out=str(out), steps=step, tokens=tokens, loss=record.get("loss"),
        eval_loss_start=eval_start["eval_loss"] if eval_start else None, eval_loss=record.get("eval_loss"),
        resumed_from=str(resume_from) if resume_from else None, final_dir=str(out / FINAL),
        wall_seconds=time.perf_counter() - started, tokens_per_second=session_tokens / max(elapsed, 1e-9),
    )


def _training_state(optimizer, scheduler, device, step: int, tokens: int, position: LoaderPosition) -> dict:
    return {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        "step": step, "tokens": tokens, "position": asdict(position),
    }


def _restore(state: dict, optimizer, scheduler, device) -> tuple[int, int, LoaderPosition]:
    """Load a checkpoint's training state; returns (step, tokens, loader position)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    return state["step"], state["tokens"], LoaderPosition(**state["position"])


def lr_factor(step: int, warmup: int, total_steps: int, schedule: str) -> float:
    """Multiplier of --lr at optimizer step `step` (0-based): linear warmup, then constant or cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * progress))


def batch_loss(model, batch: dict, o: TrainOptions, device: torch.device) -> dict[str, torch.Tensor]:
    """loss (and kd_loss, ce_loss when mixed): means over the batch's target positions."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        # Right padding under a causal mask never reaches real tokens: no attention mask needed.
        logits = model(input_ids=batch["input_ids"].to(device), use_cache=False).logits
    logits = logits.flatten(0, 1)[batch["rows"].to(device)]
    labels = batch["labels"].to(device)
    mask = torch.ones_like(labels, dtype=torch.bool)
    if o.loss == "ce":
        return {"loss": masked_cross_entropy(logits, labels, mask)}
    per_sample = sparse_kd_loss(
        logits, batch["topk_ids"].to(device), batch["topk_logprobs"].to(device), batch["tail_logprob"].to(device),
        o.loss, o.temperature, o.skew_lambda, o.jsd_beta,
    )
    kd = reduce_kd_loss(per_sample, mask)
    if not o.ce_weight:
        return {"loss": kd}
    ce = masked_cross_entropy(logits, labels, mask)
    return {"loss": (1 - o.ce_weight) * kd + o.ce_weight * ce, "kd_loss": kd, "ce_loss": ce}


def _optimizer_step(model, optimizer, micro: list[dict], o: TrainOptions, device, step: int, out: Path):
    """One update over the micro-batches, weighted by their target positions (= one big batch)."""
    model.train()
    positions = sum(len(b["rows"]) for b in micro)
    totals: dict[str, float] = {}
    for b in micro:
        terms = batch_loss(model, b, o, device)
        if not torch.isfinite(terms["loss"]):
            raise _diverged(f"the loss is {terms['loss'].item()}", step, b, out)
        weight = len(b["rows"]) / positions
        (terms["loss"] * weight).backward()
        for key, value in terms.items():
            totals[key] = totals.get(key, 0.0) + value.item() * weight
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
    if not torch.isfinite(grad_norm):
        raise _diverged(f"the gradient norm is {grad_norm.item()}", step, micro[-1], out)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals, grad_norm.item()


def _diverged(what: str, step: int, batch: dict, out: Path) -> MoekdError:
    last = latest_checkpoint(out)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
    return MoekdError(
        f"step {step}: {what} on batch {batch['batch']} of epoch {batch['epoch']} "
        f"(examples {batch['examples'].tolist()}); training stopped and {kept}. "
        "Lower --lr, raise --warmup, or check the student's weights"
    )


@torch.no_grad()
def _evaluate(model, batches, o: TrainOptions, device) -> dict[str, float]:
    """Held-out loss terms, averaged over all held-out target positions (all teacher samples)."""
    model.eval()
    sums: dict[str, float] = {}
    positions = 0
    for b in batches:
        for key, value in batch_loss(model, b, o, device).items():
            sums[key] = sums.get(key, 0.0) + value.item() * len(b["rows"])
        positions += len(b["rows"])
    return {f"eval_{key}": value / positions for key, value in sums.items()}


def _check_options(o: TrainOptions) -> None:
    if (o.cache is None) == (o.data is None):
        raise MoekdError("pass exactly one of --cache (distillation) and --data (plain SFT with --loss ce)")
    if o.loss not in LOSSES:
        raise MoekdError(f"--loss must be one of {', '.join(LOSSES)}, got {o.loss!r}")
    if o.data is not None and o.loss != "ce":
        raise MoekdError(f"--loss {o.loss} needs teacher distributions: pass --cache, or use --loss ce with --data")
    if not 0 <= o.ce_weight <= 1:
        raise MoekdError(f"--ce-weight must be in [0, 1] (objective (1-w)·KD + w·CE), got {o.ce_weight}")
    if o.loss == "ce" and o.ce_weight:
        raise MoekdError("--ce-weight mixes CE into a KD loss; drop it with --loss ce")
    if not (math.isfinite(o.temperature) and o.temperature > 0):
        raise MoekdError(f"--temperature must be > 0, got {o.temperature}")
    if not 0 < o.skew_lambda < 1 or not 0 < o.jsd_beta < 1:
        raise MoekdError(f"--skew-lambda and --jsd-beta must lie strictly between 0 and 1, got {o.skew_lambda}, {o.jsd_beta}")
    if o.samples not in ("mean", "random"):
        raise MoekdError(f"--samples must be mean or random, got {o.samples!r}")
    if o.schedule not in ("constant", "cosine"):
        raise MoekdError(f"--schedule must be constant or cosine, got {o.schedule!r}")
    if o.max_steps is not None and o.epochs is not None:
        raise MoekdError("pass one of --max-steps and --epochs, not both")
    if not 0 <= o.seed < 2**63:
        raise MoekdError(f"--seed must be in [0, 2**63), got {o.seed}")
    positive = {"--lr": o.lr, "--batch-tokens": o.batch_tokens, "--grad-accum": o.grad_accum,
                "--max-grad-norm": o.max_grad_norm, "--max-steps": o.max_steps, "--epochs": o.epochs}
    for flag, value in positive.items():
        if value is not None and not value > 0:
            raise MoekdError(f"{flag} must be positive, got {value}")
    for flag, value in {"--warmup": o.warmup, "--eval-every": o.eval_every, "--save-every": o.save_every, "--workers": o.workers}.items():
        if value < 0:
            raise MoekdError(f"{flag} must be >= 0, got {value}")


def _open_source(o: TrainOptions, tokenizer, console: Console):
    """The example source and a hash identifying its content."""
    if o.data is not None:
        loaded = load_records(o.data, o.fields, o.skip_invalid)
        report = tokenize_records(loaded.records, loaded.source_index, tokenizer, o.max_prompt_len, o.max_len,
                                  o.chat_template, o.skip_invalid)
        return TokenizedSource(report.examples), loaded.fingerprint()
    report = verify_store(o.cache)
    if not report.ok:
        shown = "; ".join(report.problems[:3]) + (f" (+{len(report.problems) - 3} more)" if len(report.problems) > 3 else "")
        raise MoekdError(f"--cache {o.cache} fails verification: {shown}. Run `moekd cache verify {o.cache}` for details")
    reader = CacheReader(o.cache)
    if len(reader) == 0:
        raise MoekdError(f"--cache {o.cache} holds no examples")
    _check_tokenizer(tokenizer, reader.meta.tokenizer, o, console)
    return CacheSource(reader), reader.meta.build.manifest_sha256


def _check_tokenizer(tokenizer, stored, o: TrainOptions, console: Console) -> None:
    found = tokenizer_fingerprint(tokenizer)
    if found["sha256"] == stored.sha256:
        return
    same_ids = found["vocab_sha256"] == stored.vocab_sha256
    how = []
    if len(tokenizer) != stored.size:
        how.append(f"size {len(tokenizer)} vs {stored.size}")
    if same_ids:
        how.append(f"same token-to-id mapping but other rules or special tokens (sha256 {found['sha256'][:12]} vs {stored.sha256[:12]})")
    else:
        how.append(f"token-to-id mapping differs (vocab_sha256 {found['vocab_sha256'][:12]} vs {stored.vocab_sha256[:12]})")
    what = f"the student's tokenizer ({o.student}) differs from the cache's ({stored.name_or_path}): {'; '.join(how)}"
    if same_ids and o.allow_tokenizer_mismatch:
        console.print(f"[yellow]warning:[/] {what}; training anyway (--allow-tokenizer-mismatch)", highlight=False)
        return
    hint = ("pass --allow-tokenizer-mismatch to train anyway: the ids mean the same tokens" if same_ids else
            "--allow-tokenizer-mismatch cannot help, the ids mean different tokens: use a student built with the cache's tokenizer")
    raise MoekdError(f"--student: {what}; {hint}")


def _check_vocabulary(model, source, student: str) -> None:
    vocab = output_vocab_size(model)
    if isinstance(source, TokenizedSource):
        largest = max(int(e.input_ids.max()) for e in source.examples)
        if largest >= vocab:
            raise MoekdError(f"--student {student}: its output layer has {vocab} entries but the data holds token id {largest}")
        return
    reader = source.reader
    if vocab >= reader.meta.teacher.vocab_size:
        return
    step = reader.meta.layout.positions_per_shard
    stored = max(int(reader.group["topk_ids"][s:s + step].max()) for s in range(0, reader.num_positions, step))
    largest = max(stored, int(reader.group["input_ids"][:].max()))
    if largest >= vocab:
        raise MoekdError(
            f"--student {student}: its output layer has {vocab} entries, fewer than the teacher's {reader.meta.teacher.vocab_size}, "
            f"and the cache holds token id {largest}; use a student whose vocabulary covers the cache's tokenizer"
        )
