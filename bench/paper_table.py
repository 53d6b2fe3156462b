"""The miniature of the published comparisons (Every Expert Matters: KD, ALL, KA, SAR; Figures 1, 2, 4
and 5; and B-Distill's MoE to MoE: a small MoE student by logit KD only and by Balanced Distillation).

    python bench/paper_table.py                       # the whole table; see docs/science.md for its wall time here
    python bench/paper_table.py --quick               # a few-minute subset of every part, for development
    python bench/paper_table.py --workdir /tmp/pt     # finished stages are reused on a rerun

Runs the `moekd demo` pipeline (moekd/demo.py) with this plan: one MoE teacher; caches of the
experts-K ablation (topk with K = 2 (native), 4, 6 and 8 (= all)), of KA's M ablation (M in
{1, 2, 4, 8}, λ = 0.05) and λ ablation (λ in {0.01, 0.05, 0.2}, M = 2), and the SAR cache (the
teacher's routers trained on the training split with the SFT seed-0 student's feedback, the demo
plan's `SarSpec`, then cached with `--policy sar`, all experts); a dense student per cache
and an SFT student; a small MoE student from the topk cache with the teacher's gates, by logit KD
and by Balanced Distillation (held-out KD loss, expert-load CV, gate entropy too); each trained with 3 training seeds and scored on 300 test prompts by ROUGE-L
over 5 sampling seeds, teacher-forced response NLL and KL from the native teacher; the teacher
under each K (its own ROUGE-L) and under each KA setting (KL from its native self). Then, on the
trained teacher: the gate mass of activated vs other experts per layer (published Figure 1,
`moekd routing stats`), the per-family expert load and the SAR routers' per-layer
KL(original || trained) (published Figure 5). Writes bench/results/paper_table.json
with the machine, the date, the library versions and the wall and CPU time of every part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from rich.console import Console
from rich.table import Table

from moekd.demo import (
    DEFAULT_PLAN,
    GATES_CACHE,
    KA,
    MOE_ROWS,
    QUICK_PLAN,
    CacheSpec,
    StudentSpec,
    TeacherProbe,
    results_table,
    routing_table,
    run_pipeline,
)

CACHES = (
    CacheSpec("topk", "topk"),
    CacheSpec("topk-K4", "topk", {"experts": 4}),
    CacheSpec("topk-K6", "topk", {"experts": 6}),
    CacheSpec("all", "all"),  # = topk with K = 8 (tested bit for bit)
    CacheSpec("ka-M1", "ka", {"samples": 1, **KA}),
    CacheSpec("ka-M2", "ka", {"samples": 2, **KA}),
    CacheSpec("ka-M4", "ka", {"samples": 4, **KA}),
    CacheSpec("ka-M8", "ka", {"samples": 8, **KA}),
    CacheSpec("ka-M2-l0.01", "ka", {"samples": 2, "ka_lambda": 0.01}),
    CacheSpec("ka-M2-l0.2", "ka", {"samples": 2, "ka_lambda": 0.2}),
    CacheSpec("sar", "sar"),  # routers of the plan's SarSpec
    GATES_CACHE,
)
ROWS = (
    StudentSpec("SFT"),
    StudentSpec("KD topk K=2", "topk"),
    StudentSpec("KD topk K=4", "topk-K4"),
    StudentSpec("KD topk K=6", "topk-K6"),
    StudentSpec("KD all (K=8)", "all"),
    StudentSpec("KD ka M=1", "ka-M1"),
    StudentSpec("KD ka M=2", "ka-M2"),
    StudentSpec("KD ka M=4", "ka-M4"),
    StudentSpec("KD ka M=8", "ka-M8"),
    StudentSpec("KD ka M=2 λ=0.01", "ka-M2-l0.01"),
    StudentSpec("KD ka M=2 λ=0.2", "ka-M2-l0.2"),
    StudentSpec("KD sar", "sar"),
    *MOE_ROWS,
)
PROBES = (
    TeacherProbe("topk K=4", "topk", {"experts": 4}),
    TeacherProbe("topk K=6", "topk", {"experts": 6}),
    TeacherProbe("all (K=8)", "all"),
    TeacherProbe("ka λ=0.01", "ka", {"ka_lambda": 0.01}, rouge=False),
    TeacherProbe("ka λ=0.05", "ka", KA, rouge=False),
    TeacherProbe("ka λ=0.2", "ka", {"ka_lambda": 0.2}, rouge=False),
)
PAPER_PLAN = replace(
    DEFAULT_PLAN, n_test=300, eval_batch_size=100, caches=CACHES, rows=ROWS, probes=PROBES, reference="KD topk K=2"
)
# --quick: the same parts on the demo's miniature (4-expert teacher: K = 2, 4 = all)
QUICK = replace(
    QUICK_PLAN,
    caches=(CACHES[0], CACHES[3], CACHES[4], CACHES[5], CACHES[10], GATES_CACHE),
    rows=(ROWS[0], ROWS[1], ROWS[4], ROWS[5], ROWS[6], ROWS[11], *MOE_ROWS),
    probes=(PROBES[2], PROBES[4]),
    reference="KD topk K=2",
)
RESULTS = Path(__file__).resolve().parent / "results" / "paper_table.json"


def versions() -> dict[str, str]:
    import torch
    import transformers
    import zarr

    import moekd

    return {
        "moekd": moekd.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "python": platform.python_version(),
    }


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def teacher_routing(work: Path, max_examples: int) -> dict:
    """Gate mass per layer on the training split, and the expert load per task family on the test split."""
    import numpy as np
    import torch

    from moekd.data.prompts import tokenize_records
    from moekd.data.records import load_records
    from moekd.experiments import expert_specialisation
    from moekd.models import load_causal_lm, load_tokenizer
    from moekd.routing.stats import compute_routing_stats

    teacher = work / "teacher" / "final"
    tokenizer = load_tokenizer(teacher)
    model = load_causal_lm(teacher, torch.float32, torch.device("cpu"))

    def tokenized(split: str, limit: int | None = None):
        loaded = load_records(work / "data" / f"{split}.jsonl")
        return tokenize_records(loaded.records[:limit], loaded.source_index[:limit], tokenizer, 256, 512).examples

    stats = compute_routing_stats(
        model, tokenized("train", max_examples), pad_token_id=tokenizer.pad_token_id, batch_size=16
    )
    families = [json.loads(line)["family"] for line in (work / "data" / "test.jsonl").read_text().splitlines()]
    test = tokenized("test")
    loads, counts = {}, {}
    for family in sorted(set(families)):
        members = [ex for ex in test if families[ex.source_index] == family]
        by_family = compute_routing_stats(model, members, pad_token_id=tokenizer.pad_token_id, batch_size=16)
        loads[family] = np.array([layer.load for layer in by_family.layers])
        counts[family] = by_family.tokens
    parameters = dict(model.named_parameters())
    expert_params = sum(p.numel() for name, p in parameters.items() if ".experts." in name)
    return {
        "gate_mass": stats.to_dict(),
        "specialisation": expert_specialisation(loads, counts),
        "family_load": {f: load.tolist() for f, load in loads.items()},
        "parameters": {"total": sum(p.numel() for p in parameters.values()), "experts": expert_params},
    }


def routing_tables(routing: dict) -> list[Table]:
    gate = Table(
        title=f"Teacher gate mass per MoE layer (native top-2, {routing['gate_mass']['tokens']} response tokens "
        "of the training split)"
    )
    for column in ("layer", "activated", "other", "load CV", "entropy", "I(family; expert)", "H(expert)"):
        gate.add_column(column, justify="left" if column == "layer" else "right")
    for layer, spec in zip(routing["gate_mass"]["layers"], routing["specialisation"]):
        gate.add_row(
            layer["layer"],
            f"{layer['activated_mass']:.3f}",
            f"{layer['dormant_mass']:.3f}",
            f"{layer['load_cv']:.3f}",
            f"{layer['gate_entropy']:.3f}",
            f"{spec['mutual_information']:.3f}",
            f"{spec['expert_entropy']:.3f}",
        )
    return [gate]


def sar_table(sar: dict) -> Table:
    """Published Figure 5: how far SAR moved each layer's gate distribution."""
    table = Table(
        title=f"SAR routers: mean KL(original || trained gate distribution) per MoE layer, test split "
        f"(teacher loss {sar['loss_start']:.4f} -> {sar['loss_end']:.4f})"
    )
    table.add_column("layer")
    table.add_column("KL (nats)", justify="right")
    for layer, kl in sar["kl_original_trained"].items():
        table.add_row(layer, f"{kl:.3g}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="default: bench-paper-table (bench-paper-table-quick)"
    )
    parser.add_argument("--out", type=Path, default=None, help=f"default: {RESULTS} (nothing is written with --quick)")
    parser.add_argument("--quick", action="store_true", help="a few-minute subset for development")
    parser.add_argument("--jobs", type=int, default=2, help="processes side by side (the numbers do not depend on it)")
    parser.add_argument(
        "--teacher-routing",
        type=Path,
        default=None,
        metavar="JSON",
        help="only the gate-mass and per-family tables of the trained teacher in --workdir, into JSON",
    )
    args = parser.parse_args()
    workdir = args.workdir or Path("bench-paper-table-quick" if args.quick else "bench-paper-table")
    if args.teacher_routing:
        routing = teacher_routing(workdir, max_examples=500)
        for table in routing_tables(routing):
            Console(width=200).print(table)
        args.teacher_routing.write_text(json.dumps(routing, indent=2) + "\n")
        return
    out = args.out or (None if args.quick else RESULTS)
    console = Console(stderr=True)
    started, cpu = time.perf_counter(), cpu_seconds()
    results = run_pipeline(workdir, QUICK if args.quick else PAPER_PLAN, console, args.jobs)
    pipeline_wall, pipeline_cpu = time.perf_counter() - started, cpu_seconds() - cpu
    results["teacher_routing"] = teacher_routing(workdir, max_examples=500)
    results.update(
        {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "date": time.strftime("%Y-%m-%d"),
            "versions": versions(),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(cpu_seconds() - cpu, 1),
            "pipeline_wall_seconds": round(pipeline_wall, 1),
            "pipeline_cpu_seconds": round(pipeline_cpu, 1),
            "load_average_at_end": os.getloadavg(),
        }
    )
    printer = Console(width=200)
    printer.print(results_table(results, "paper-table miniature"))
    if (routing := routing_table(results)) is not None:
        printer.print(routing)
    for table in routing_tables(results["teacher_routing"]):
        printer.print(table)
    printer.print(sar_table(results["sar"]))
    console.print(
        f"wall {results['wall_seconds']:.0f} s, CPU {results['cpu_seconds']:.0f} s, "
        f"load average at the end {results['load_average_at_end']}"
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
