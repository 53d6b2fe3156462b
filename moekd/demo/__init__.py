"""`moekd demo`: the whole pipeline on the built-in suite, ending in the comparison table.

Stages (each is skipped when its output is already complete, so a rerun picks up where it stopped):
1. the synthetic instruction suite and a BPE tokenizer trained on its training split;
2. a small MoE teacher trained by SFT;
3. with a SAR stage in the plan (`SarSpec`), the Student-Aware Router: the teacher's routers
   trained on the training split with the feedback of the first replicate of an SFT row, and
   their per-layer KL(original || trained) on the test split; then teacher caches under the
   routing policies of the plan (`CacheSpec`: topk, all, ka ..., and sar with those routers);
4. the student rows (`StudentSpec`: SFT, or KD from one cache), each trained once per training
   seed s from an initialisation drawn with seed s and with batches ordered by seed s; among them
   MoE to MoE: a small MoE student (fewer layers and experts than the teacher) distilled from a
   cache that also stores the teacher's gates, by logit KD only and by Balanced Distillation;
5. `moekd eval` of the teacher, of the teacher under other routing policies (`TeacherProbe`:
   its own ROUGE-L, NLL and KL from its native self) and of every student replicate: ROUGE-L over
   the sampling seeds, teacher-forced response NLL and KL(native teacher || student) on the test split;
   the held-out KD loss of every row trained from a cache (forward KL on that cache's held-out
   examples), and the expert-load CV and gate entropy of every MoE student on the test split;
6. the table (experiments.py): per row, mean ± std over training seeds and the paired difference
   to the reference row with a 95% t-interval; results.json and results.png.
A new method is one more entry: a `CacheSpec` for a teacher-side policy, a `StudentSpec` for a
student-side one (another architecture in `DemoPlan.students`, other training options).
`bench/paper_table.py` runs the same pipeline with a larger plan.
"""

from moekd.demo.pipeline import prepare_teacher, run_pipeline
from moekd.demo.plan import (
    DEFAULT_PLAN,
    GATES_CACHE,
    KA,
    MOE_ROWS,
    QUICK_PLAN,
    CacheSpec,
    DemoPlan,
    SarSpec,
    StudentSpec,
    TeacherProbe,
)
from moekd.demo.report import plot_results, results_table, routing_table

__all__ = [
    "DEFAULT_PLAN",
    "GATES_CACHE",
    "KA",
    "MOE_ROWS",
    "QUICK_PLAN",
    "CacheSpec",
    "DemoPlan",
    "SarSpec",
    "StudentSpec",
    "TeacherProbe",
    "plot_results",
    "prepare_teacher",
    "results_table",
    "routing_table",
    "run_pipeline",
]
