"""`moekd cache build`: run the teacher once per example and sample, write the sparse cache.

Flow: load and tokenize the data -> plan the store (sizes are known before the teacher runs)
-> for each unfinished unit (one position shard): teacher forward x M under the routing policy,
sparsify, write the unit and its marker -> finalize (manifest, commit). See store/writer.py for
the crash-safety protocol.
"""

from __future__ import annotations

import inspect
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from moekd import __version__
from moekd.cache_builder.policies import SEED_DERIVATION, derive_seed, make_policy
from moekd.cache_builder.routing import RouterController
from moekd.cache_builder.sparsify import sparse_next_token
from moekd.data.prompts import tokenize_records
from moekd.data.records import load_records
from moekd.data.tokenizer import tokenizer_fingerprint
from moekd.encoding import MAX_ABS_ERROR, MAX_GAP, SCALE, encode_logprobs
from moekd.errors import MoekdError
from moekd.models import checkpoint_sha256, load_causal_lm, load_tokenizer, output_vocab_size, resolve_device, resolve_dtype
from moekd.schemas.cache import (
    BuildInfo, CacheMetadata, DatasetInfo, EncodingInfo, GateInfo, LayoutInfo, PolicyInfo, TeacherInfo, TokenizerInfo,
)
from moekd.store.layout import (
    POSITIONS_PER_CHUNK, POSITIONS_PER_SHARD, Unit, array_specs, examples_overlapping, gate_specs,
)
from moekd.store.writer import CacheWriter, ExampleTables, store_state


GATE_DEFINITION = (
    "softmax(router logits) for softmax routers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE); sigmoid(router logits) "
    "normalised to sum 1 for DeepSeek-V3-style routers; taken at the stored position, under the sample's routing policy"
)


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


def length_batches(indices, lengths: np.ndarray, batch_tokens: int) -> list[list[int]]:
    """Examples grouped longest first so that rows x longest row stays within `batch_tokens`."""
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class UnitRunner:
    """Teacher passes for the examples of one unit, M samples each, encoded for the store."""

    def __init__(self, model, controller, tables: ExampleTables, samples: int, k: int, seed: int, pad_id: int,
                 batch_tokens: int, gate_r: int | None = None):
        self.model, self.controller, self.gate_r = model, controller, gate_r
        self.tables, self.samples, self.k, self.seed = tables, samples, k, seed
        self.pad_id, self.batch_tokens = pad_id, batch_tokens
        self.lengths = np.diff(tables.token_offsets)
        self.device = next(model.parameters()).device
        self.slices_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def tokens(self, unit_examples: range) -> int:
        return int(self.lengths[list(unit_examples)].sum()) * self.samples

    @torch.no_grad()
    def run(self, unit: Unit, on_batch=lambda tokens: None) -> dict[str, np.ndarray]:
        t = self.tables
        examples = examples_overlapping(t.position_offsets, unit)
        first = int(t.position_offsets[examples.start])
        span = int(t.position_offsets[examples.stop]) - first
        ids = np.zeros((span, self.samples, self.k), np.int32)
        logprobs = np.zeros((span, self.samples, self.k), np.float32)
        tails = np.zeros((span, self.samples), np.float32)
        if self.gate_r:
            gates = np.zeros((span, self.samples, len(self.controller.moe_layers), self.controller.num_experts), np.float32)
        for batch in length_batches(examples, self.lengths, self.batch_tokens):
            width = int(self.lengths[batch[0]])
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            targets = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, e in enumerate(batch):
                n = int(self.lengths[e])
                input_ids[row, :n] = torch.from_numpy(t.input_ids[t.token_offsets[e]:t.token_offsets[e + 1]])
                attention[row, :n] = 1
                targets[row, int(t.prompt_len[e]) - 1:n - 1] = True
            input_ids, attention = input_ids.to(self.device), attention.to(self.device)
            rows = np.concatenate([
                np.arange(t.position_offsets[e], t.position_offsets[e + 1]) - first for e in batch
            ])
            targets = targets.to(self.device)
            # The lm_head runs on the target positions only (a boolean `logits_to_keep` returns their
            # logits flattened, in row-major order); prompt logits would be thrown away.
            keep = {"logits_to_keep": targets} if self.slices_logits else {}
            for m in range(self.samples):
                seeds = [derive_seed(self.seed, int(t.source_index[e]), m) for e in batch]
                with self.controller.active(row_seeds=seeds):
                    logits = self.model(input_ids=input_ids, attention_mask=attention, use_cache=False, **keep).logits
                top_id, top_lp, tail = sparse_next_token(logits if logits.dim() == 2 else logits[targets], self.k)
                ids[rows, m] = top_id.cpu().numpy()
                logprobs[rows, m] = top_lp.cpu().numpy()
                tails[rows, m] = tail.cpu().numpy()
                if self.gate_r:  # routers see every token: [B*T, N] per layer -> [P_b, L, N]
                    per_layer = torch.stack(self.controller.gate_probs(), dim=1)
                    gates[rows, m] = per_layer.view(*targets.shape, *per_layer.shape[1:])[targets].cpu().numpy()
                on_batch(int(attention.sum()))
        lo, hi = unit.start - first, unit.stop - first
        top1, gaps = encode_logprobs(logprobs[lo:hi])
        arrays = {
            "target_positions": t.target_positions[unit.start:unit.stop],
            "topk_ids": ids[lo:hi],
            "topk_gaps": gaps,
            "top1_logprob": top1,
            "tail_logprob": tails[lo:hi],
        }
        if self.gate_r:
            arrays.update(encode_gates(gates[lo:hi], self.gate_r))
        return arrays


def encode_gates(gates: np.ndarray, r: int) -> dict[str, np.ndarray]:
    """Gate distributions [..., N] as stored: all of them, or the r largest (ids, probs) and the rest mass."""
    if r == gates.shape[-1]:
        return {"gate_probs": gates.astype(np.float16)}
    order = np.argsort(-gates, axis=-1, kind="stable")[..., :r]
    top = np.take_along_axis(gates, order, axis=-1)
    rest = np.clip(1.0 - top.astype(np.float64).sum(-1), 0.0, 1.0)
    return {"gate_ids": order.astype(np.uint16), "gate_probs": top.astype(np.float16), "gate_rest": rest.astype(np.float32)}


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
    num_positions = len(tables.target_positions)
    arrays = array_specs(len(report.examples), len(tables.input_ids), num_positions, samples, o.k)
    gate_info = None
    if gate_r:
        extra = gate_specs(num_positions, samples, len(controller.moe_layers), controller.num_experts, gate_r)
        arrays.update(extra)
        gate_info = GateInfo(
            mode="full" if gate_r == controller.num_experts else "top", r=gate_r, num_experts=controller.num_experts,
            layers=controller.moe_layers, definition=GATE_DEFINITION, arrays=sorted(extra),
        )
    skipped = {**loaded.skipped, **report.skipped}
    meta = CacheMetadata(
        teacher=TeacherInfo(
            name_or_path=str(o.teacher), architecture=type(model).__name__, model_type=model.config.model_type,
            revision=getattr(model.config, "_commit_hash", None), weights_sha256=checkpoint_sha256(o.teacher),
            vocab_size=vocab, dtype=str(dtype).removeprefix("torch."), moe_layers=controller.moe_layers,
            router_class=controller.router_class, num_experts=controller.num_experts,
            experts_per_token=controller.top_k,
        ),
        tokenizer=TokenizerInfo(
            name_or_path=str(o.tokenizer or o.teacher), size=len(tokenizer), **tokenizer_fingerprint(tokenizer),
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        ),
        policy=PolicyInfo(
            name=policy.name, samples=samples, stochastic=policy.stochastic, params=policy.describe(), seed=o.seed,
            seed_derivation=SEED_DERIVATION,
        ),
        encoding=EncodingInfo(
            k=o.k, scale=SCALE, max_abs_error_nats=MAX_ABS_ERROR, max_gap_nats=MAX_GAP,
            normalisation="log_softmax over the teacher's full output vocabulary at temperature 1, in float32",
            tail="tail_logprob = log of the probability mass outside the top-k (exact, from the full distribution)",
        ),
        dataset=DatasetInfo(
            source=str(o.data), format=loaded.format, fingerprint_sha256=loaded.fingerprint(),
            fields=asdict(loaded.fields), template="chat" if o.chat_template else "dolly",
            max_prompt_len=o.max_prompt_len, max_len=o.max_len,
            rows_read=len(loaded.records) + sum(loaded.skipped.values()), examples=len(report.examples),
            skipped=skipped, truncated_responses=report.truncated_responses,
        ),
        layout=LayoutInfo(
            num_examples=len(report.examples), num_tokens=len(tables.input_ids), num_positions=len(tables.target_positions),
            num_samples=samples, positions_per_chunk=min(POSITIONS_PER_CHUNK, o.positions_per_shard),
            positions_per_shard=o.positions_per_shard,
            arrays=arrays,
        ),
        build=BuildInfo(
            status="building", created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            units=-(-len(tables.target_positions) // o.positions_per_shard), batch_tokens=o.batch_tokens,
            device=str(device), versions=_versions(),
        ),
        gates=gate_info,
    )
    settings = {
        "teacher_weights_sha256": meta.teacher.weights_sha256 or meta.teacher.name_or_path,
        "tokenizer_sha256": meta.tokenizer.sha256, "data_fingerprint": meta.dataset.fingerprint_sha256,
        "fields": meta.dataset.fields, "template": meta.dataset.template, "max_prompt_len": o.max_prompt_len,
        "max_len": o.max_len, "skip_invalid": o.skip_invalid, "policy": policy.name, "policy_params": meta.policy.params,
        "samples": samples, "seed": o.seed, "k": o.k, "dtype": meta.teacher.dtype, "batch_tokens": o.batch_tokens,
        "positions_per_shard": o.positions_per_shard, "router_probs": o.router_probs,
    }
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


def _versions() -> dict[str, str]:
    import transformers
    import zarr

    return {"moekd": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "zarr": zarr.__version__}
