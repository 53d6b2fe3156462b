"""The miniature of the published comparison: teacher, SFT student, KD (topk), ALL, KA with M in {1, 2, 4}, SAR.

    python bench/paper_table.py                       # ~10-15 minutes on a 2-core CPU
    python bench/paper_table.py --workdir /tmp/pt     # finished stages are reused on a rerun

Runs the `moekd demo` pipeline with this plan (same teacher, same student initialisation and
steps for every KD row, forward KL over the cached top-k + tail; the SAR row's routers are
trained on the training split with the demo plan's SAR stage, then cached with `--policy sar`), evaluates every model with
5 sampling seeds, prints the table and writes bench/results/paper_table.json with the machine,
the date and the library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from rich.console import Console  # noqa: E402

from moekd.demo import DEFAULT_PLAN, KA, CacheSpec, results_table, run_pipeline  # noqa: E402

PAPER_PLAN = replace(
    DEFAULT_PLAN,
    n_test=500,  # as many prompts as the published Dolly test set: seed noise shrinks with it
    caches=(
        CacheSpec("topk", "topk"),
        CacheSpec("all", "all"),
        CacheSpec("ka-m1", "ka", {"m": 1, **KA}),
        CacheSpec("ka-m2", "ka", {"m": 2, **KA}),
        CacheSpec("ka-m4", "ka", {"m": 4, **KA}),
    ),
)
RESULTS = Path(__file__).resolve().parent / "results" / "paper_table.json"


def versions() -> dict[str, str]:
    import torch
    import transformers
    import zarr

    import moekd

    return {"moekd": moekd.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "zarr": zarr.__version__, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench-paper-table"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console(stderr=True)
    started = time.perf_counter()
    results = run_pipeline(args.workdir, PAPER_PLAN, console)
    results.update({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    })
    for row in results["rows"].values():
        row.pop("model", None)  # local paths mean nothing to a reader of the committed file
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    Console().print(results_table(results["rows"]))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
