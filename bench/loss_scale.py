"""The loss step at real vocabulary sizes: chunked KD against full-logits cross-entropy and the previous KD.

    python bench/loss_scale.py --json bench/results/loss_scale.json     # the whole grid: hours on 2 CPU cores
    python bench/loss_scale.py --vocab 32000 --positions 2048 --kinds fkl --samples 1,4   # a few minutes
    python bench/loss_scale.py --chunk-sweep                            # the measurement behind --loss-chunk

One step = forward + backward of the loss from the student's final hidden states [P, d] through
an output layer [V, d] (d = --hidden; no bias), the gradients of both, as in training:
    CE full      HF-style cross-entropy: logits = h·Wᵀ [P, V], F.cross_entropy, backward
    CE chunked   moekd's objective with --loss ce (chunked.py: logits chunk by chunk, never [P, V])
    KD chunked   moekd's objective with --loss KIND over M teacher samples of k ids + tail
    KD previous  the previous implementation on full logits: h·Wᵀ, then per sample a masked [P, V]
                 copy for the tail (tests/reference_losses.py, the exact reference of the tests)
Teacher samples: k sorted distinct ids per sample, consecutive samples sharing k - 4 of them (as
Knowledge-Augmentation samples share most of their top-k), random log-probs; labels random.

Time: the cases of one (V, P) run interleaved, round-robin in one process, --repeats rounds;
each case's time is its minimum over the rounds (this machine's speed drifts 2-10x over minutes,
and other work only ever adds time). Peak memory: each case alone in a fresh process, the
resident set size's peak during one step minus its size just before (inputs allocated):
the memory the step itself needs. A case whose memory, predicted from the first (smallest)
vocabulary's measurements, would take the process above --memory-budget GB is skipped, and
the table says so; CE full is the baseline of the ratios, so where it is skipped the ratios
are to CE chunked instead. Targets: KD chunked / CE full time <= 1.15 at M = 1 and <= 1.3 at
M = 4 for every kind; KD chunked / CE full step memory <= 0.5. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests/reference_losses.py

from peak_memory import PeakMemory

from moekd.distill.chunked import OutputLayer, chunked_output_loss
from moekd.distill.losses import KD_LOSSES
from moekd.distill.objective import SparseObjective
from moekd.distill.options import LOSS_CHUNK, TrainOptions
from tests.reference_losses import exact_sparse_kd_loss

VOCABS = (32000, 128256, 151936, 201088)
METHODS = {"ce-full": "CE full", "ce-chunked": "CE chunked", "kd-chunked": "KD chunked", "kd-previous": "KD previous"}
SWEEP_CHUNKS = (128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class Case:
    method: str
    vocab: int
    positions: int
    samples: int = 0  # 0 for the CE methods
    kind: str = "ce"
    chunk: int = LOSS_CHUNK

    @property
    def label(self) -> str:
        chunk = f" chunk {self.chunk}" if self.method.endswith("chunked") else ""
        kd = f" {self.kind} M={self.samples}" if self.samples else ""
        return f"{METHODS[self.method]}{kd}{chunk}"

    @property
    def full_logits(self) -> bool:
        return self.method in ("ce-full", "kd-previous")


def make_inputs(case: Case, hidden_size: int, k: int) -> dict:
    g = torch.Generator().manual_seed(0)
    positions, vocab = case.positions, case.vocab
    inputs = {
        "hidden": torch.randn(positions, hidden_size, generator=g),
        "weight": torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5,
        "labels": torch.randint(vocab, (positions,), generator=g),
    }
    if case.samples:
        pool_size = k + 4 * (case.samples - 1)
        step = vocab // pool_size
        start = torch.randint(0, vocab - (pool_size - 1) * step, (positions, 1), generator=g)
        pool = start + torch.arange(pool_size) * step  # sorted, distinct
        ids = torch.stack([pool[:, 4 * m : 4 * m + k] for m in range(case.samples)], dim=1)
        logprobs = torch.log_softmax(2 * torch.randn(positions, case.samples, k + 1, generator=g), dim=-1)
        inputs.update(topk_ids=ids, topk_logprobs=logprobs[..., :k], tail_logprob=logprobs[..., k])
    return inputs


def make_step(case: Case, inputs: dict):
    """A function running one forward + backward of `case` on fresh leaf tensors of the inputs."""
    hidden = inputs["hidden"].clone().requires_grad_()
    weight = inputs["weight"].clone().requires_grad_()
    options = TrainOptions(student="", out="", cache="", loss=case.kind, loss_chunk=case.chunk).kd_loss()

    def step() -> None:
        hidden.grad = weight.grad = None
        if case.method == "ce-full":
            loss = F.cross_entropy(hidden @ weight.T, inputs["labels"])
        elif case.method == "kd-previous":
            loss = exact_sparse_kd_loss(
                hidden @ weight.T, inputs["topk_ids"], inputs["topk_logprobs"], inputs["tail_logprob"], case.kind
            ).mean()
        else:
            objective = SparseObjective(inputs, options, torch.device("cpu"))
            loss = chunked_output_loss(hidden, OutputLayer(weight), objective, case.chunk)["loss"]
        loss.backward()

    return step


def measure_memory(case: Case, hidden_size: int, k: int, threads: int, results) -> None:
    """(RSS before the step, step peak - before) in MB, the case alone in this fresh process."""
    torch.set_num_threads(threads)
    step = make_step(case, make_inputs(case, hidden_size, k))
    memory = PeakMemory(torch.device("cpu"))
    before = memory.start()
    step()
    results.put((before, memory.stop() - before))


def memory_in_fresh_process(case: Case, a, threads: int) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=measure_memory, args=(case, a.hidden, a.k, threads, results))
    proc.start()
    measured = results.get()
    proc.join()
    return measured


def interleaved_times(cases: list[Case], a) -> dict[Case, float]:
    """Minimum seconds per step of each case over a.repeats round-robin rounds, each starting one case later.

    No warm-up steps: a step's large buffers are mapped afresh every time (glibc returns blocks
    above 32 MB to the system), so the first step costs what the others do; warm_up() ran once."""
    inputs = {}
    for case in cases:
        key = (case.samples, case.kind != "ce")
        if key not in inputs:
            inputs[key] = make_inputs(case, a.hidden, a.k)
    steps = {case: make_step(case, inputs[(case.samples, case.kind != "ce")]) for case in cases}
    times = {case: [] for case in cases}
    for round_ in range(a.repeats):
        shift = round_ % len(cases)
        for case in cases[shift:] + cases[:shift]:
            start = time.perf_counter()
            steps[case]()
            times[case].append(time.perf_counter() - start)
    return {case: min(t) for case, t in times.items()}


def warm_up(a) -> None:
    """One small step of each method: thread pools, kernels and autograd set up before anything is timed."""
    for method in METHODS:
        case = Case(method, 4096, 256, 1 if method.startswith("kd") else 0, "fkl" if method.startswith("kd") else "ce")
        make_step(case, make_inputs(case, a.hidden, a.k))()


class MemoryModel:
    """Predicts a case's step memory from the measurements at the first vocabulary: proportional to
    P·V for the full-logits methods, to V for the chunked ones (their buffers are [chunk, V] and [V, d])."""

    def __init__(self):
        self.per_unit: dict[tuple, float] = {}
        self.baseline_mb = 0.0

    @staticmethod
    def key(case: Case) -> tuple:
        return case.method, case.samples, case.kind

    @staticmethod
    def units(case: Case) -> float:
        return case.positions * case.vocab if case.full_logits else min(case.positions, case.chunk) * case.vocab

    def learn(self, case: Case, before_mb: float, step_mb: float) -> None:
        self.per_unit[self.key(case)] = step_mb / self.units(case)
        self.baseline_mb = max(self.baseline_mb, before_mb)

    def predict(self, case: Case, hidden_size: int) -> float | None:
        """Peak RSS (MB) of a process running the case, or None before the first vocabulary was measured."""
        per_unit = self.per_unit.get(self.key(case))
        if per_unit is None:
            return None
        inputs_mb = 3 * case.vocab * hidden_size * 4 / 2**20  # weight, its gradient, a copy
        return self.baseline_mb + inputs_mb + per_unit * self.units(case)


def grid(a) -> list[list[Case]]:
    """The groups of cases (one (V, P) each), in the order they run."""
    groups = []
    for vocab in a.vocab:
        for positions in a.positions:
            cases = [Case("ce-full", vocab, positions), Case("ce-chunked", vocab, positions)]
            for samples in a.samples:
                cases += [Case("kd-chunked", vocab, positions, samples, kind) for kind in a.kinds]
                cases += [Case("kd-previous", vocab, positions, samples, kind) for kind in a.previous_kinds]
            groups.append(cases)
    return groups


def sweep_grid(a) -> list[list[Case]]:
    vocab, positions = a.vocab[0], a.positions[0]
    cases = [Case("ce-full", vocab, positions)]
    for chunk in SWEEP_CHUNKS:
        cases += [
            Case("ce-chunked", vocab, positions, chunk=chunk),
            Case("kd-chunked", vocab, positions, 1, "fkl", chunk),
            Case("kd-chunked", vocab, positions, 4, "rkl", chunk),
        ]
    return [cases]


def run_group(cases: list[Case], a, threads: int, model: MemoryModel) -> list[dict]:
    vocab, positions = cases[0].vocab, cases[0].positions
    print(f"\nV {vocab:,}, P {positions:,}: memory (fresh process per case) ...", flush=True)
    rows, kept = [], []
    for case in cases:
        predicted = model.predict(case, a.hidden)
        if predicted is not None and predicted > 1024 * a.memory_budget:
            rows.append(
                {
                    **asdict(case),
                    "label": case.label,
                    "skipped": f"needs about {predicted / 1024:.1f} GB > --memory-budget {a.memory_budget:g} GB",
                }
            )
            continue
        before, step_mb = memory_in_fresh_process(case, a, threads)
        if predicted is None:
            model.learn(case, before, step_mb)
        rows.append({**asdict(case), "label": case.label, "step_mb": step_mb, "rss_before_mb": before})
        kept.append(case)
    print(f"V {vocab:,}, P {positions:,}: time ({len(kept)} cases interleaved, {a.repeats} rounds) ...", flush=True)
    times = interleaved_times(kept, a)
    for row in rows:
        case = Case(**{f: row[f] for f in ("method", "vocab", "positions", "samples", "kind", "chunk")})
        if case in times:
            row["seconds"] = times[case]
    add_ratios(rows)
    print_group(rows, vocab, positions)
    return rows


def add_ratios(rows: list[dict]) -> None:
    measured = {(r["method"], r["samples"], r["kind"], r["chunk"]): r for r in rows if "seconds" in r}
    ce_full = next((r for r in rows if r["method"] == "ce-full" and "seconds" in r), None)
    ce_chunked = next(
        (r for r in rows if r["method"] == "ce-chunked" and "seconds" in r and r["chunk"] == LOSS_CHUNK),
        next((r for r in rows if r["method"] == "ce-chunked" and "seconds" in r), None),
    )
    baseline = ce_full or ce_chunked
    for r in rows:
        if "seconds" not in r or baseline is None:
            continue
        r["baseline"] = baseline["method"]
        r["time_vs_ce"] = r["seconds"] / baseline["seconds"]
        r["memory_vs_ce"] = r["step_mb"] / baseline["step_mb"]
        # KD previous of the same kind and M; where only fkl was measured, fkl's (its cost hardly depends on the kind)
        previous = measured.get(("kd-previous", r["samples"], r["kind"], LOSS_CHUNK)) or measured.get(
            ("kd-previous", r["samples"], "fkl", LOSS_CHUNK)
        )
        if r["method"] == "kd-chunked" and previous is not None:
            r["previous_kind"] = previous["kind"]
            r["time_vs_previous"] = r["seconds"] / previous["seconds"]
            r["memory_vs_previous"] = r["step_mb"] / previous["step_mb"]


def print_group(rows: list[dict], vocab: int, positions: int) -> None:
    base = next((r["baseline"] for r in rows if "baseline" in r), "ce-full")
    print(
        f"V {vocab:,}, P {positions:,}: ratios to {METHODS[base]} and to KD previous of the same M "
        "(and kind; * of fkl, where only fkl was measured)"
    )
    print(f"  {'case':<34} {'step s':>8} {'/CE':>6} {'/prev':>6} {'step MB':>9} {'/CE':>6} {'/prev':>6}")
    for r in rows:
        if "skipped" in r:
            print(f"  {r['label']:<34} skipped: {r['skipped']}")
            continue

        def ratio(key):
            mark = "*" if key.endswith("previous") and r.get("previous_kind", r["kind"]) != r["kind"] else " "
            return f"{r[key]:5.2f}{mark}" if key in r else " " * 6

        print(
            f"  {r['label']:<34} {r['seconds']:8.2f} {ratio('time_vs_ce')} {ratio('time_vs_previous')} "
            f"{r['step_mb']:9,.0f} {ratio('memory_vs_ce')} {ratio('memory_vs_previous')}",
            flush=True,
        )


def print_targets(rows: list[dict]) -> None:
    kd = [
        r for r in rows if r["method"] == "kd-chunked" and r.get("baseline") == "ce-full" and r["chunk"] == LOSS_CHUNK
    ]
    if not kd:
        return
    print("\nTargets (KD chunked against CE full, every kind):")
    for samples, target in ((1, 1.15), (2, None), (4, 1.3)):
        chosen = [r for r in kd if r["samples"] == samples]
        if chosen:
            worst = max(chosen, key=lambda r: r["time_vs_ce"])
            goal = f"  (target <= {target})" if target else ""
            print(
                f"  time, M = {samples}: worst {worst['time_vs_ce']:.2f} ({worst['kind']}, V {worst['vocab']:,}, "
                f"P {worst['positions']:,}){goal}"
            )
    worst = max(kd, key=lambda r: r["memory_vs_ce"])
    print(
        f"  step memory: worst {worst['memory_vs_ce']:.2f} ({worst['kind']} M={worst['samples']}, V {worst['vocab']:,}, "
        f"P {worst['positions']:,})  (target <= 0.5)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument(
        "--vocab",
        type=ints,
        default=list(VOCABS),
        help="Vocabulary sizes, comma-separated (ascending: the first calibrates the memory model).",
    )
    p.add_argument("--positions", type=ints, default=[2048, 8192], help="Positions per step P, comma-separated.")
    p.add_argument("--samples", type=ints, default=[1, 2, 4], help="Teacher samples M, comma-separated.")
    p.add_argument(
        "--kinds", type=lambda s: s.split(","), default=list(KD_LOSSES), help="KD kinds of the chunked loss."
    )
    p.add_argument(
        "--previous-kinds",
        type=lambda s: s.split(",") if s else [],
        default=list(KD_LOSSES),
        help="KD kinds of the previous implementation ('' for none): its time hardly depends on the kind.",
    )
    p.add_argument("--k", type=int, default=64, help="Stored ids per position and sample.")
    p.add_argument("--hidden", type=int, default=256, help="Hidden size d of the output layer.")
    p.add_argument("--repeats", type=int, default=2, help="Timed rounds of every case.")
    p.add_argument("--memory-budget", type=float, default=12.0, help="GB a measuring process may use.")
    p.add_argument(
        "--chunk-sweep",
        action="store_true",
        help=f"Time and memory of chunks {SWEEP_CHUNKS} at the first --vocab and --positions (default 151936, 2048).",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="Torch threads (default: all cores). On a machine shared with other jobs, 1: with more, every "
        "operator waits at its fork/join for threads the other jobs hold off the cores.",
    )
    p.add_argument("--json", type=Path, help="Also write the results here.")
    a = p.parse_args()
    if a.chunk_sweep and a.vocab == list(VOCABS):
        a.vocab, a.positions = [151936], [2048]
    threads = a.threads
    torch.set_num_threads(threads)
    print(
        f"loss step at real vocabularies: d {a.hidden}, k {a.k}, chunk {LOSS_CHUNK} (--loss-chunk default), "
        f"{threads} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}",
        flush=True,
    )
    meta = {
        "machine": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "threads": threads,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "hidden": a.hidden,
        "k": a.k,
        "loss_chunk": LOSS_CHUNK,
        "repeats": a.repeats,
        "command": "python " + " ".join(sys.argv),
    }
    model, rows = MemoryModel(), []
    started = time.perf_counter()
    warm_up(a)
    for cases in sweep_grid(a) if a.chunk_sweep else grid(a):
        rows += run_group(cases, a, threads, model)
        if a.json:  # after every group, so that a long run interrupted keeps what it measured
            a.json.write_text(
                json.dumps(
                    {"meta": {**meta, "minutes": round((time.perf_counter() - started) / 60)}, "cases": rows}, indent=2
                )
                + "\n"
            )
    if not a.chunk_sweep:
        print_targets(rows)
    print(f"\n{(time.perf_counter() - started) / 60:.0f} minutes")


if __name__ == "__main__":
    main()
