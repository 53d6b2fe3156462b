"""`moekd cache build`: run the teacher once per example and sample, write the sparse cache.

Flow: load and tokenize the data -> plan the store (sizes are known before the teacher runs;
metadata.py) -> for each unfinished unit (one position shard): teacher forward x M under the
routing policy, sparsify, encode (runner.py), write the unit and its marker -> finalize
(manifest, commit). See store/writer.py for the crash-safety protocol.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from moekd.cache_builder.metadata import describe_store, resume_settings
from moekd.cache_builder.policies import make_policy
from moekd.cache_builder.routing import RouterController
from moekd.cache_builder.runner import UnitRunner
from moekd.data.prompts import tokenize_records
from moekd.data.records import load_records
from moekd.errors import MoekdError
from moekd.models import checkpoint_sha256, load_causal_lm, load_tokenizer, output_vocab_size, resolve_device, resolve_dtype
from moekd.sar.router_file import load_router_file, read_router_file
from moekd.store.layout import POSITIONS_PER_CHUNK, POSITIONS_PER_SHARD, examples_overlapping
from moekd.store.writer import CacheWriter, ExampleTables, store_state


@dataclass
class BuildOptions:
    teacher: str
    data: str
    out: str
    policy: str = "topk"
    policy_params: dict = field(default_factory=dict)
    k: int = 64
    max_prompt_len: int = 256
    max_len: int = 512
    dtype: str = "auto"
    device: str = "auto"
    batch_tokens: int = 8192
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    tokenizer: str | None = None
    chat_template: bool = False
    fields: dict = field(default_factory=dict)
    skip_invalid: bool = False
    positions_per_shard: int = POSITIONS_PER_SHARD
    router_probs: str = "none"
    router: str | None = None  # --policy sar: the router file of `moekd sar train`


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
    wall_seconds: float
    teacher_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.teacher_tokens / max(self.teacher_seconds, 1e-9)


def _check_options(o: BuildOptions) -> None:
    if o.k < 1:
        raise MoekdError(f"--k must be at least 1, got {o.k}")
    if o.batch_tokens < 1:
        raise MoekdError(f"--batch-tokens must be positive, got {o.batch_tokens}")
    if o.positions_per_shard < 1 or o.positions_per_shard % min(POSITIONS_PER_CHUNK, o.positions_per_shard):
        raise MoekdError(f"--positions-per-shard must be a positive multiple of {POSITIONS_PER_CHUNK} (or smaller than it)")
    if o.resume and o.overwrite:
        raise MoekdError("--resume and --overwrite exclude each other")
    if not 0 <= o.seed < 2**63:
        raise MoekdError(f"--seed must be in [0, 2**63), got {o.seed}")
    if o.policy == "sar" and o.router is None:
        raise MoekdError("--policy sar needs --router FILE: the router file `moekd sar train --out` wrote")
    if o.router is not None and o.policy != "sar":
        raise MoekdError(f"--router applies only to --policy sar, not --policy {o.policy}; drop it or use --policy sar")
    if not re.fullmatch(r"none|full|top-[0-9]+", o.router_probs):
        raise MoekdError(f"--router-probs: {o.router_probs!r} is not none, full or top-R (e.g. top-4)")


def gate_experts_kept(router_probs: str, num_experts: int | None) -> int | None:
    """Experts stored per layer for `--router-probs` (none | full | top-R); None stores no gates."""
    if router_probs == "none":
        return None
    if num_experts is None:
        raise MoekdError(f"--router-probs {router_probs} needs an MoE teacher; this one has no routers (use --router-probs none)")
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
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[rate]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=False,
    )


def build_cache(o: BuildOptions, console: Console | None = None) -> BuildSummary:
    console = console or Console(stderr=True, quiet=True)
    started = time.perf_counter()
    _check_options(o)
    if o.router is not None:
        read_router_file(o.router)  # a missing or damaged file is refused before the teacher loads
    out = Path(o.out)
    if o.resume and store_state(out) == "complete":
        raise MoekdError(f"--resume: {out} is already complete; nothing to do (pass --overwrite to rebuild it)")
    device = resolve_device(o.device)
    dtype = resolve_dtype(o.dtype, device)
    policy = make_policy(o.policy, **o.policy_params)
    tokenizer = load_tokenizer(o.tokenizer or o.teacher, "--tokenizer" if o.tokenizer else "--teacher")
    loaded = load_records(o.data, o.fields, o.skip_invalid)
    report = tokenize_records(loaded.records, loaded.source_index, tokenizer, o.max_prompt_len, o.max_len,
                              o.chat_template, o.skip_invalid)
    model = load_causal_lm(o.teacher, dtype, device)
    teacher_sha256 = checkpoint_sha256(o.teacher)
    router = load_router_file(model, o.router, o.teacher, teacher_sha256) if o.router else None
    vocab = output_vocab_size(model)
    if len(tokenizer) > vocab:
        raise MoekdError(f"--teacher: the tokenizer has {len(tokenizer)} tokens but the teacher's output layer only {vocab}; "
                         "they do not belong together (pass the teacher's own tokenizer with --tokenizer)")
    if o.k > vocab:
        raise MoekdError(f"--k {o.k} exceeds the teacher's vocabulary of {vocab}")
    controller = RouterController(model, policy, capture_gates=o.router_probs != "none")
    gate_r = gate_experts_kept(o.router_probs, controller.num_experts)
    tables = example_tables(report.examples)
    samples = policy.samples
    meta = describe_store(o, model, tokenizer, controller, policy, gate_r, loaded, report, tables, device, dtype,
                          teacher_sha256, router)
    settings = resume_settings(o, meta, tables)
    skipped = meta.dataset.skipped
    writer = CacheWriter.open(out, meta, settings, tables, resume=o.resume, overwrite=o.overwrite)
    pending = writer.pending_units()
    runner = UnitRunner(model, controller, tables, samples, o.k, o.seed, tokenizer.pad_token_id, o.batch_tokens, gate_r)
    total_tokens = sum(runner.tokens(examples_overlapping(tables.position_offsets, u)) for u in pending)
    teacher_seconds, done_tokens = 0.0, 0
    with _progress(console) as progress:
        task = progress.add_task("teacher", total=max(total_tokens, 1), rate="-")
        clock = time.perf_counter()

        def on_batch(tokens: int) -> None:
            nonlocal done_tokens
            done_tokens += tokens
            rate = done_tokens / max(time.perf_counter() - clock, 1e-9)
            progress.update(task, advance=tokens, rate=f"{rate:,.0f}")

        for unit in pending:
            t0 = time.perf_counter()
            arrays = runner.run(unit, on_batch)
            teacher_seconds += time.perf_counter() - t0
            writer.write_unit(unit, arrays)
    writer.finalize(time.perf_counter() - started)
    return BuildSummary(
        out=str(out), examples=len(report.examples), positions=len(tables.target_positions), samples=samples,
        teacher_tokens=done_tokens, truncated_responses=report.truncated_responses, skipped=skipped,
        units_done=len(pending), units_total=len(writer.units), wall_seconds=time.perf_counter() - started,
        teacher_seconds=teacher_seconds,
    )
