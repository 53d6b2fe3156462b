"""How far Student-Aware Router training moves each layer's gate distribution (published Figure 5).

    python bench/sar_router_kl.py --workdir moekd-demo                  # after `moekd demo`
    python bench/sar_router_kl.py --workdir moekd-demo --steps 100 --responses student

Takes the teacher (`teacher/final`) and the SFT student of training seed 0
(`students/SFT/seed-0/final`) of a `moekd demo` workdir, trains the teacher's routers with
`moekd sar train` on the demo's training split, then measures on the test split, per MoE layer,
the mean over response tokens of KL(g || g') (g the original gate distribution, g' the trained
one, both with all experts active: `moekd routing stats --policy all --compare`). Prints the
table and writes it, with the run's settings, wall time, machine and versions, to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from rich.console import Console
from rich.table import Table

from moekd.errors import MoekdError
from moekd.routing.stats import StatsOptions, routing_stats_for_files
from moekd.sar.train import SarOptions, train_router

RESULTS = Path(__file__).resolve().parent / "results" / "sar_router_kl.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="a finished `moekd demo` workdir")
    parser.add_argument(
        "--router",
        type=Path,
        default=Path("bench-sar-router-kl/router.safetensors"),
        help="where the router file goes (must not exist)",
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-4, help="default: the demo's SAR rate (see moekd/demo.py)")
    parser.add_argument("--responses", default="data", help="data (fast) or student (published, on-policy)")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--examples", type=int, default=64, help="test prompts the KL is measured on")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    teacher, student = args.workdir / "teacher" / "final", args.workdir / "students" / "SFT" / "seed-0" / "final"
    for what, path in (("teacher", teacher), ("SFT student", student)):
        if not (path / "config.json").is_file():
            raise SystemExit(f"--workdir {args.workdir}: no {what} at {path}; run `moekd demo` first")
    console = Console(stderr=True)
    started = time.perf_counter()
    try:
        summary = train_router(
            SarOptions(
                teacher=str(teacher),
                student=str(student),
                data=str(args.workdir / "data" / "train.jsonl"),
                out=str(args.router),
                steps=args.steps,
                lr=args.lr,
                responses=args.responses,
                batch_tokens=args.batch_tokens,
                max_new_tokens=64,
                device="cpu",
                save_every=0,
            ),
            console,
        )
        stats = routing_stats_for_files(
            StatsOptions(
                str(teacher),
                str(args.workdir / "data" / "test.jsonl"),
                "all",
                max_examples=args.examples,
                device="cpu",
                compare=str(args.router),
            )
        )
    except MoekdError as e:
        raise SystemExit(f"error: {e}") from None
    table = Table(
        title=f"SAR routers after {summary.steps} steps (lr {args.lr}, responses {args.responses}): "
        f"mean KL(original || trained gates) over {stats.tokens} response tokens of "
        f"{args.examples} test prompts, all experts"
    )
    for column in ("layer", "KL (nats)", "entropy (original)"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in stats.layers:
        table.add_row(layer.layer, f"{layer.kl_to_trained:.3g}", f"{layer.gate_entropy:.3f}")
    Console(width=160).print(table)
    console.print(
        f"teacher loss on the probe batch {summary.loss_start:.4f} -> {summary.loss_end:.4f}; "
        f"{summary.tokens:,} teacher tokens at {summary.tokens_per_second:,.0f} tok/s; "
        f"wall {time.perf_counter() - started:.0f} s",
        highlight=False,
    )
    import torch
    import transformers

    result = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "loss_start": summary.loss_start,
        "loss_end": summary.loss_end,
        "tokens": summary.tokens,
        "kl_original_trained": {layer.layer: layer.kl_to_trained for layer in stats.layers},
        "gate_entropy": {layer.layer: layer.gate_entropy for layer in stats.layers},
        "response_tokens": stats.tokens,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "load_average_at_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
