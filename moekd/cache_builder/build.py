"""`moekd cache build`: run the teacher once per example and sample, write the sparse cache.

Flow: load and tokenize the data -> plan the store (sizes are known before the teacher runs;
metadata.py) -> for each unfinished unit (one position shard): teacher forward x M under the
routing policy, encode in the store's encoding (runner.py, moekd/encodings/), write the unit and its marker -> finalize
(manifest, commit). See store/writer.py for the crash-safety protocol.

One job writes a store at a time (moekd/locking.py): the build holds the store's lock from before
the teacher loads until it has finalized; a `--shard i/n` job holds its shard's lock.

Beyond one process (split.py): under torchrun, rank 0 holds the lock for the job, plans the store
(or finds it complete) and tells the others, every rank loads its own teacher replica and writes its share of the
unfinished units, progress is summed over ranks, and rank 0 finalizes once all are done. With
`--shard i/n`, n independent jobs each write their own units and `moekd cache finalize` commits.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from moekd.cache_builder.metadata import describe_store, resume_settings
from moekd.cache_builder.options import BuildOptions, recorded_options
from moekd.cache_builder.runner import UnitRunner
from moekd.cache_builder.split import parse_shard, split_units
from moekd.data.prompts import tokenize_records
from moekd.data.records import check_max_examples, load_records
from moekd.distributed import Ranks
from moekd.encodings import ENCODINGS, check_flags
from moekd.errors import MoekdError
from moekd.fsio import setting_differences, sha256_file
from moekd.interrupt import resumable, resume_command
from moekd.locking import WriterLock
from moekd.models import (
    check_tokenizer_fits,
    checkpoint_sha256,
    load_causal_lm,
    load_tokenizer,
    output_vocab_size,
    resolve_device,
    resolve_dtype,
)
from moekd.routing.controller import RouterController
from moekd.routing.policies import check_router_flag, make_policy
from moekd.routing.router_file import load_router_file, read_router_file
from moekd.store.layout import POSITIONS_PER_CHUNK, examples_overlapping
from moekd.store.writer import CacheWriter, ExampleTables, recorded_settings, store_state


@dataclass
class BuildSummary:
    out: str
    examples: int
    positions: int
    samples: int
    teacher_tokens: int
    truncated_responses: int
    skipped: dict
    units_done: int
    units_total: int
    units_missing: int  # units of the store still unwritten after this run (other shards' work)
    wall_seconds: float
    teacher_seconds: float  # wall time of the teacher passes (the slowest rank's)
    ranks: int = 1
    shard: str | None = None
    already_complete: bool = False  # --resume on a store complete with the same settings: nothing was done

    @property
    def tokens_per_second(self) -> float:
        """Teacher tokens per second over all ranks."""
        return self.teacher_tokens / max(self.teacher_seconds, 1e-9)


def _check_options(o: BuildOptions) -> dict:
    """The checked options; returns the encoding's flags with their defaults (encodings.check_flags)."""
    given = {"k": o.k, "logprob_scale": o.logprob_scale, "draws": o.draws, "proposal_temp": o.proposal_temp}
    flags = check_flags(o.encoding, {**given, "hidden_dtype": o.hidden_dtype})
    if o.batch_tokens < 1:
        raise MoekdError(f"--batch-tokens must be positive, got {o.batch_tokens}")
    check_max_examples(o.max_examples)
    if o.positions_per_shard < 1 or o.positions_per_shard % min(POSITIONS_PER_CHUNK, o.positions_per_shard):
        raise MoekdError(
            f"--positions-per-shard must be a positive multiple of {POSITIONS_PER_CHUNK} (or smaller than it)"
        )
    if o.resume and o.overwrite:
        raise MoekdError("--resume and --overwrite exclude each other")
    if not 0 <= o.seed < 2**63:
        raise MoekdError(f"--seed must be in [0, 2**63), got {o.seed}")
    check_router_flag(o.policy, o.router)
    if not re.fullmatch(r"none|full|top-[0-9]+", o.router_probs):
        raise MoekdError(f"--router-probs: {o.router_probs!r} is not none, full or top-R (e.g. top-4)")
    if o.shard is not None and o.overwrite:
        raise MoekdError(
            "--shard and --overwrite exclude each other: one job would delete the others' work; "
            "remove the old store once before starting the jobs, or build to a new --out"
        )
    parse_shard(o.shard)
    return flags


def gate_experts_kept(router_probs: str, num_experts: int | None) -> int | None:
    """Experts stored per layer for `--router-probs` (none | full | top-R); None stores no gates."""
    if router_probs == "none":
        return None
    if num_experts is None:
        raise MoekdError(
            f"--router-probs {router_probs} needs an MoE teacher; this one has no routers (use --router-probs none)"
        )
    if router_probs == "full":
        return num_experts
    r = router_probs.removeprefix("top-")
    if not router_probs.startswith("top-") or not r.isdigit() or not 1 <= int(r) < num_experts:
        raise MoekdError(f"--router-probs: {router_probs!r} is not none, full or top-R with 1 <= R < {num_experts}")
    return int(r)


def example_tables(examples) -> ExampleTables:
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    responses = np.array([len(e.input_ids) - e.prompt_len for e in examples], dtype=np.int64)
    return ExampleTables(
        input_ids=np.concatenate([e.input_ids for e in examples]).astype(np.int32),
        token_offsets=np.concatenate([[0], np.cumsum(lengths)]),
        position_offsets=np.concatenate([[0], np.cumsum(responses)]),
        prompt_len=np.array([e.prompt_len for e in examples], dtype=np.int32),
        source_index=np.array([e.source_index for e in examples], dtype=np.int64),
        target_positions=np.concatenate([e.target_positions for e in examples]).astype(np.int32),
    )


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[rate]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def build_cache(o: BuildOptions, console: Console | None = None) -> BuildSummary:
    """Build (or resume) the store of `o`; under torchrun, one call per rank (see split.py)."""
    started = time.perf_counter()
    flags = _check_options(o)
    if o.router is not None:
        read_router_file(o.router)  # a missing or damaged file is refused before the teacher loads
    ranks = Ranks.from_env()
    if ranks.world > 1 and o.shard:
        raise MoekdError(
            "--shard is for independent jobs; under torchrun the ranks already share the units out (drop --shard)"
        )
    console = console if console is not None and ranks.main else Console(stderr=True, quiet=True)
    ranks.start("gloo")  # only objects and counters travel between ranks: gloo serves CPU and GPU builds alike
    lock = WriterLock(o.out, "--out", parse_shard(o.shard))  # rank 0 takes it, for the whole job
    try:
        return _build(o, flags, ranks, console, started, lock)
    finally:
        lock.release()
        ranks.stop()


def _build(
    o: BuildOptions, flags: dict, ranks: Ranks, console: Console, started: float, lock: WriterLock
) -> BuildSummary:
    out = Path(o.out)
    shard = parse_shard(o.shard)
    device = ranks.device(resolve_device(o.device))
    dtype = resolve_dtype(o.dtype, device)
    policy = make_policy(o.policy, **o.policy_params)
    tokenizer_flag = "--tokenizer" if o.tokenizer else "--teacher"
    tokenizer = load_tokenizer(o.tokenizer or o.teacher, tokenizer_flag)
    loaded = load_records(o.data, o.fields, o.skip_invalid).first(o.max_examples)
    report = tokenize_records(
        loaded.records, loaded.source_index, tokenizer, o.max_prompt_len, o.max_len, o.chat_template, o.skip_invalid
    )
    tables = example_tables(report.examples)
    weights_sha256 = checkpoint_sha256(o.teacher)
    router_sha256 = sha256_file(o.router) if o.router else None
    settings = resume_settings(
        o, policy, flags, tokenizer, loaded, tables, device, dtype, weights_sha256, router_sha256
    )
    summary = partial(
        BuildSummary,
        out=str(out),
        examples=len(report.examples),
        positions=len(tables.target_positions),
        samples=policy.samples,
        truncated_responses=report.truncated_responses,
        ranks=ranks.world,
        shard=o.shard,
    )
    if ranks.share(lambda: o.resume and _complete_with(out, settings)):
        return summary(
            skipped={**loaded.skipped, **report.skipped},
            units_done=0,
            units_total=0,
            units_missing=0,
            teacher_tokens=0,
            teacher_seconds=0.0,
            wall_seconds=time.perf_counter() - started,
            already_complete=True,
        )
    ranks.share(lock.acquire)  # before the teacher loads: a second writer is refused at once
    model = load_causal_lm(o.teacher, dtype, device)
    check_tokenizer_fits(tokenizer, model, tokenizer_flag)
    router = load_router_file(model, o.router, o.teacher, weights_sha256) if o.router else None
    vocab = output_vocab_size(model)
    encoder = ENCODINGS[o.encoding].encoder(flags, model, vocab)
    controller = RouterController(model, policy, capture_gates=o.router_probs != "none")
    if controller.rewrites:
        console.print(
            f"--policy {policy.name} weights the selected experts by {controller.weighting_text()}", highlight=False
        )
    gate_r = gate_experts_kept(o.router_probs, controller.num_experts)
    meta = describe_store(
        o,
        model,
        tokenizer,
        controller,
        policy,
        encoder,
        gate_r,
        loaded,
        report,
        tables,
        device,
        dtype,
        weights_sha256,
        router,
    )
    shards = shard[1] if shard else None
    planned: list[CacheWriter] = []
    ranks.share(
        lambda: planned.append(
            CacheWriter.open(
                out, meta, settings, tables, o.resume, o.overwrite, shards, encoder.fixed_arrays(), recorded_options(o)
            )
        )
    )
    # the other ranks open rank 0's plan, checking it against their own settings (their data, teacher, versions)
    writer = planned[0] if ranks.main else _join_plan(out, settings)
    work = split_units(writer, ranks, shard)
    runner = UnitRunner(
        model,
        controller,
        tables,
        policy.samples,
        encoder,
        meta.layout.arrays,
        o.seed,
        tokenizer.pad_token_id,
        o.batch_tokens,
        gate_r,
    )
    resume = resume_command("cache", "build", "--out", str(out), "--resume", *(["--shard", o.shard] if o.shard else []))
    with resumable(
        lambda: f"{len(writer.units) - len(writer.missing_units())} of {len(writer.units)} units of {out} are written",
        resume,
    ):
        done_tokens, teacher_seconds = _run_units(runner, writer, work, tables, ranks, lock, console)
    per_rank = ranks.gather((len(work.mine), done_tokens, teacher_seconds))
    units_missing = 0
    if shard:
        units_missing = len(writer.missing_units())
    elif ranks.main:
        writer.finalize(lock, time.perf_counter() - started)
    ranks.barrier()  # the store is committed
    return summary(
        skipped=meta.dataset.skipped,
        units_done=sum(r[0] for r in per_rank),
        units_total=len(writer.units),
        units_missing=units_missing,
        teacher_tokens=sum(r[1] for r in per_rank),
        teacher_seconds=max(r[2] for r in per_rank),
        wall_seconds=time.perf_counter() - started,
    )


def _run_units(runner: UnitRunner, writer: CacheWriter, work, tables, ranks: Ranks, lock: WriterLock, console: Console):
    """This rank's units, each run by the teacher and written as it finishes, with a progress bar over every
    rank's tokens; returns (this rank's teacher tokens, its teacher seconds) once every rank is done."""
    total_tokens = sum(runner.tokens(examples_overlapping(tables.position_offsets, u)) for u in work.everyone)
    teacher_seconds, done_tokens = 0.0, 0
    progress_tokens, ranks_done = ranks.counter("build/tokens"), ranks.counter("build/ranks-done")
    with _progress(console) as progress:
        task = progress.add_task(
            "teacher" if ranks.world == 1 else f"teacher x {ranks.world} ranks", total=max(total_tokens, 1), rate="-"
        )
        clock = time.perf_counter()

        def show(everyone: int) -> None:
            rate = everyone / max(time.perf_counter() - clock, 1e-9)
            progress.update(task, completed=everyone, rate=f"{rate:,.0f}")

        def on_batch(tokens: int) -> None:
            nonlocal done_tokens
            done_tokens += tokens
            show(progress_tokens.add(tokens))

        for unit in work.mine:
            t0, tokens0 = time.perf_counter(), done_tokens
            arrays = runner.run(unit, on_batch)
            seconds = time.perf_counter() - t0
            teacher_seconds += seconds
            lock.verify()
            writer.write_unit(
                unit, arrays, {"tokens": done_tokens - tokens0, "seconds": round(seconds, 3), "by": work.by}
            )
        ranks_done.add(1)
        ranks_done.wait_until(ranks.world, on_poll=lambda _: show(progress_tokens.value()))
    return done_tokens, teacher_seconds


def _join_plan(out: Path, settings: dict, wait_seconds: float = 60.0) -> CacheWriter:
    """Rank 0's plan, seen from another rank; on a filesystem shared by several nodes, the rename that
    published it may take a moment (attribute caching) to be seen here."""
    deadline = time.monotonic() + wait_seconds
    while store_state(out) != "unfinished" and time.monotonic() < deadline:
        time.sleep(0.5)
    return CacheWriter.join(out, settings)


def _complete_with(out: Path, settings: dict) -> bool:
    """--resume on a complete store: True when it was built with these settings; a refusal naming the differences otherwise."""
    if store_state(out) != "complete":
        return False
    recorded = recorded_settings(out)
    if recorded is None:
        raise MoekdError(
            f"--resume: {out} is complete but was made by a moekd that did not record its build settings, "
            "so they cannot be compared; use it as it is, or pass --overwrite to rebuild it"
        )
    differ = setting_differences(recorded, settings, where="the store")
    if differ:
        raise MoekdError(
            f"--resume: the complete cache at {out} was built with other settings ({'; '.join(differ)}); "
            "rerun with the store's settings, choose another --out, or pass --overwrite to rebuild it"
        )
    return True
