"""MoE to MoE in a few minutes: a small MoE student by logit KD only and by Balanced Distillation.

    python bench/bdistill_short.py                    # ~4 minutes of wall time on the shared 2-core CPU
    python bench/bdistill_short.py --workdir /tmp/bd  # finished stages are reused on a rerun

Runs the `moekd demo` pipeline (moekd/demo.py) with a short plan of its MoE-student rows only:
a Mixtral-style teacher (4 layers, 8 experts, top-2) trained by SFT on 640 examples of the
built-in suite, one `topk` cache that also stores its gate distributions (`--router-probs full`),
and a smaller MoE student (2 layers, 4 experts, top-2) distilled from it by forward KL only and
by Balanced Distillation (`--expert-weight` 0.1, the default, and 0.5, the top of the published
range), each with 3 training seeds (shared initialisations); Δ is the paired difference to
logit KD. Prints the demo's two tables (ROUGE-L, NLL, KL; held-out KD, load CV, gate entropy).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from rich.console import Console

from moekd.demo import GATES_CACHE, MOE_ROWS, QUICK_PLAN, StudentSpec, results_table, routing_table, run_pipeline

PLAN = replace(
    QUICK_PLAN,
    n_train=640,
    teacher_epochs=6,
    student_epochs=4,
    train_seeds=(0, 1, 2),
    probes=(),
    teacher=dict(family="mixtral", hidden=48, layers=4, experts=8, top_k=2, intermediate_size=96, init="training"),
    students={"moe": dict(family="mixtral", hidden=32, layers=2, experts=4, top_k=2, init="training")},
    caches=(GATES_CACHE,),
    reference="MoE KD",
    rows=(
        *MOE_ROWS,
        StudentSpec(
            "MoE B-Distill w=0.5",
            "topk-gates",
            init="moe",
            options={"router_loss": "bdistill", "expert_weight": 0.5},
            reference="MoE KD",
        ),
    ),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bdistill-short")
    results = run_pipeline(parser.parse_args().workdir, PLAN)
    console = Console(width=220)
    console.print(results_table(results, "B-Distill, short run"))
    console.print(routing_table(results))
    print({part: round(t["wall_seconds"]) for part, t in results["timings"].items()})


if __name__ == "__main__":
    main()
