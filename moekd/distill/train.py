"""`moekd train`: fit a student to the cached teacher distributions (or plain SFT with --loss ce).

Flow: check the store, the student's tokenizer and vocabulary against it (sources.py) -> hold
out a fixed eval subset -> AdamW over token-budget batches (warmup + constant/cosine schedule,
grad accumulation, clipping, bf16 autocast on CUDA) on the objective of objective.py (with an
MoE student's router terms and their learned temperatures τ, router_losses.py) -> metrics
every step, eval and checkpoints every N steps -> final/. The teacher is never loaded:
everything needed is in the store. Under torchrun, every rank trains its share of each batch
through DistributedDataParallel and rank 0 writes (parallel.py). One run writes an --out at a time:
rank 0 holds the run directory's lock (moekd/locking.py) from before it looks for a checkpoint to
resume from until final/ is written.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from moekd import __version__
from moekd.data.batches import pack
from moekd.distill.loader import BatchDataset, make_loader
from moekd.distill.objective import KDLoss, batch_loss, held_out_loss
from moekd.distill.options import RUN_ONLY, TrainOptions, check_options
from moekd.distill.router_losses import router_objective
from moekd.distill.sources import check_vocabulary, open_source, verify_cache
from moekd.distill.student import Student
from moekd.distributed import Ranks
from moekd.interrupt import resumable, resume_command
from moekd.locking import WriterLock
from moekd.models import load_causal_lm, load_tokenizer, resolve_device
from moekd.training.checkpoint import (
    FINAL,
    load_state,
    prune_checkpoints,
    resume_point,
    save_checkpoint,
    step_dir,
)
from moekd.training.frame import StepFrame, check_finite
from moekd.training.order import BatchOrder, LoaderPosition, held_out_split
from moekd.training.parallel import RankShare, backend, combined, empty_share_backward, unwrap, wrap

__all__ = ["TrainOptions", "TrainSummary", "train"]

ADVICE = "Lower --lr, raise --warmup, or check the student's weights"


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
    """Train as `o` says; under torchrun, one call per rank with DDP (parallel.py)."""
    started = time.perf_counter()
    check_options(o)
    ranks = Ranks.from_env()
    device = ranks.device(resolve_device(o.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    console = console if console is not None and ranks.main else Console(stderr=True, quiet=True)
    ranks.start(backend(device))
    lock = WriterLock(o.out, "--out")  # rank 0 takes it, for the whole job
    try:
        return _train(o, ranks, device, console, started, lock)
    finally:
        lock.release()
        ranks.stop()


def _train(
    o: TrainOptions, ranks: Ranks, device: torch.device, console: Console, started: float, lock: WriterLock
) -> TrainSummary:
    ranks.share(lock.acquire)  # before anything is read or written: a second writer is refused at once
    tokenizer = load_tokenizer(o.student, "--student")
    if o.cache is not None:
        ranks.share(lambda: verify_cache(o))  # every file hashed once, not once per rank
    source, source_sha = open_source(o, tokenizer, console)
    train_idx, eval_idx = held_out_split(min(len(source), o.max_examples or len(source)), o.eval_fraction)
    order = BatchOrder(train_idx, source.lengths, source.shards, o.batch_tokens, o.seed)
    epochs = None if o.max_steps else (o.epochs or 1)
    total_steps = o.max_steps or -(-sum(len(order.epoch(e)) for e in range(epochs)) // o.grad_accum)
    config = {
        **o.recorded(),
        "epochs": epochs,
        "source_sha256": source_sha,
        "total_steps": total_steps,
        "train_examples": len(train_idx),
        "eval_examples": len(eval_idx),
        "moekd_version": __version__,
        "world_size": ranks.world,
    }
    out = Path(o.out)
    # decided by rank 0 before anything is written, then the same for every rank
    resume_from = ranks.share(lambda: resume_point(out, config, o.resume, RUN_ONLY))

    model = load_causal_lm(resume_from or o.student, torch.float32, device, "--student")
    ranks.share(lambda: check_vocabulary(model, source, o.student))
    routing, gate_targets = router_objective(o, model, source.gate_info)
    # the forward to hidden states (the loss applies the output layer) and the router terms with their τ
    student = Student(model, router_terms=routing.to(device) if routing is not None else None)
    kd = o.kd_loss(source.encoding.kind if source.encoding else "topk_tail")  # what the loss reads of the cache
    teacher_layer = source.teacher_output_layer(device)  # hidden caches: the teacher's, for its exact log-probs
    forward = wrap(student, ranks, device)  # the module whose forward the loss calls (DDP on several ranks)
    groups = [{"params": list(model.parameters())}]
    if routing is not None and routing.tau.numel():
        groups.append({"params": [routing.tau], "weight_decay": 0.0})  # τ: no decay towards 0
    optimizer = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, o.warmup, total_steps, o.schedule))
    torch.manual_seed(o.seed)
    step, tokens, position = 0, 0, LoaderPosition(0, 0)
    if resume_from is not None:
        step, tokens, position = _restore(load_state(resume_from), optimizer, scheduler, device, routing)
        console.print(f"resuming from {resume_from} (step {step})")
    pad_id = tokenizer.pad_token_id
    train_batches = iter(
        make_loader(
            BatchDataset(source, pad_id, o.sample_mode, o.seed, gate_targets),
            RankShare(
                BatchOrder(
                    train_idx, source.lengths, source.shards, o.batch_tokens, o.seed, start=position, epochs=epochs
                ),
                ranks,
            ),
            o.workers,
        )
    )
    eval_order = [
        (0, b, ex)
        for b, ex in enumerate(
            pack(eval_idx[np.argsort(-source.lengths[eval_idx], kind="stable")], source.lengths, o.batch_tokens)
        )
    ]

    def evaluate() -> dict[str, float]:
        batches = make_loader(
            BatchDataset(source, pad_id, "mean", o.seed, gate_targets), RankShare(eval_order, ranks), o.workers
        )
        return held_out_loss(student, batches, kd, device, partial(combined, ranks), teacher_layer)

    frame = StepFrame(
        out,
        config,
        console,
        lock,
        label="train",
        total=total_steps,
        step=step,
        tokens=tokens,
        resumed=resume_from is not None,
        extra_columns=routing.columns if routing else (),
        main=ranks.main,
    )
    eval_start, record = None, {}
    with frame, resumable(frame.where, resume_command("train", "--out", str(out), "--resume", "auto")):
        if step == 0 and eval_order:
            eval_start = evaluate()
            frame.write({"step": 0, "loss": None, "lr": scheduler.get_last_lr()[0], "tokens": 0, **eval_start})
        while frame.step < total_steps:
            micro = list(islice(train_batches, o.grad_accum))
            if not micro:
                break
            lr = scheduler.get_last_lr()[0]
            terms, grad_norm, batch_tokens = _optimizer_step(
                forward, optimizer, micro, o, kd, device, frame.step + 1, out, ranks, pad_id, teacher_layer
            )
            scheduler.step()
            position = LoaderPosition(micro[-1]["epoch"], micro[-1]["batch"] + 1)
            record = {"step": frame.step + 1, "epoch": micro[-1]["epoch"], **terms, "lr": lr, "grad_norm": grad_norm}
            if eval_order and ((o.eval_every and record["step"] % o.eval_every == 0) or record["step"] == total_steps):
                record.update(evaluate())
            frame.done(record, batch_tokens)
            if frame.due(o.save_every):
                state = _training_state(optimizer, scheduler, device, frame.step, frame.tokens, position, routing)
                frame.save(
                    partial(
                        save_checkpoint,
                        step_dir(out, frame.step),
                        model,
                        tokenizer,
                        state,
                        frame.step,
                        config,
                        RUN_ONLY,
                    )
                )
                if o.save_total_limit is not None:
                    frame.save(partial(prune_checkpoints, out, o.save_total_limit))
        model.to(getattr(torch, o.save_dtype))  # the last use of the model: final/ in the dtype asked for
        frame.save(partial(save_checkpoint, out / FINAL, model, tokenizer, None, frame.step, config, RUN_ONLY))
    ranks.barrier()  # final/ is written
    return TrainSummary(
        out=str(out),
        steps=frame.step,
        tokens=frame.tokens,
        loss=record.get("loss"),
        eval_loss_start=eval_start["eval_loss"] if eval_start else None,
        eval_loss=record.get("eval_loss"),
        resumed_from=str(resume_from) if resume_from else None,
        final_dir=str(out / FINAL),
        wall_seconds=time.perf_counter() - started,
        tokens_per_second=frame.tokens_per_second,
    )


def _training_state(optimizer, scheduler, device, step: int, tokens: int, position: LoaderPosition, routing) -> dict:
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        },
        "step": step,
        "tokens": tokens,
        "position": asdict(position),
        "router": routing.state_dict() if routing is not None else None,  # the learned τ
    }


def _restore(state: dict, optimizer, scheduler, device, routing) -> tuple[int, int, LoaderPosition]:
    """Load a checkpoint's training state; returns (step, tokens, loader position)."""
    if routing is not None:
        routing.load_state_dict(state["router"])
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


def _optimizer_step(
    model,
    optimizer,
    micro: list[dict],
    o: TrainOptions,
    kd: KDLoss,
    device,
    step: int,
    out: Path,
    ranks: Ranks,
    pad_id: int,
    teacher_layer: torch.Tensor | None,
):
    """One update over the micro-batches, weighted by their target positions (= one big batch, over all ranks).
    Returns the loss terms, the gradient norm and the step's tokens (all ranks)."""
    model.train()
    counts = ranks.gather(([len(b["rows"]) for b in micro], sum(b["tokens"] for b in micro)))
    positions = sum(sum(rows) for rows, _ in counts)
    totals: dict[str, float] = {}
    for i, b in enumerate(micro):
        last = i == len(micro) - 1  # DDP all-reduces the gradients in the last micro-batch's backward only
        with contextlib.nullcontext() if last or ranks.world == 1 else model.no_sync():
            if not len(b["rows"]):
                empty_share_backward(model, pad_id, device)
                continue
            terms = batch_loss(model, b, kd, device, teacher_layer)
            check_finite(terms["loss"], "the loss", step, b["epoch"], b["batch"], b["examples"].tolist(), out, ADVICE)
            weight = len(b["rows"]) / positions
            (terms["loss"] * (weight * ranks.world)).backward()  # DDP averages over ranks: x W makes it the sum
        for key, value in terms.items():
            totals[key] = totals.get(key, 0.0) + value.item() * weight
    totals, _ = combined(ranks, totals, 0)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)  # the Student's: τ too
    last = micro[-1]
    check_finite(
        grad_norm, "the gradient norm", step, last["epoch"], last["batch"], last["examples"].tolist(), out, ADVICE
    )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    routing = unwrap(model).router_terms
    if routing is not None:
        routing.clamp_()
    return totals, grad_norm.item(), sum(t for _, t in counts)
