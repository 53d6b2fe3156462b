"""What the demo runs: the teacher, the caches (`CacheSpec`), the student rows (`StudentSpec`), the
teacher probes and the SAR stage, bundled in a `DemoPlan`; the built-in plans DEFAULT_PLAN and QUICK_PLAN."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CacheSpec:
    name: str
    policy: str
    params: dict = field(default_factory=dict)  # make_policy parameters (m, ka_lambda, experts ...)
    router_probs: str = "none"  # also store the gate distributions (full, top-R) for MoE students


@dataclass(frozen=True)
class StudentSpec:
    name: str
    cache: str | None = None  # a CacheSpec name; None trains by SFT on the data
    init: str = "dense"  # a key of DemoPlan.students
    options: dict = field(default_factory=dict)  # TrainOptions fields beyond the plan's (loss, ce_weight ...)
    reference: str | None = None  # the row its paired differences are taken against (None: the plan's reference)


@dataclass(frozen=True)
class TeacherProbe:
    name: str
    policy: str
    params: dict = field(default_factory=dict)
    rouge: bool = True  # also sample and score ROUGE-L (else only NLL and KL)


@dataclass(frozen=True)
class SarSpec:
    """The `moekd sar train` run behind the plan's `sar` cache."""

    steps: int
    lr: float
    beta: float = 0.01
    teacher_kld: str = "reverse"
    responses: str = "student"
    feedback: str = "SFT"  # the SFT row whose first training-seed replicate gives the feedback
    compare_examples: int = 64  # test prompts on which the per-layer KL(original || trained) is measured


@dataclass(frozen=True)
class DemoPlan:
    n_train: int
    n_valid: int
    n_test: int
    vocab: int
    teacher: dict  # tiny_config arguments of the MoE teacher
    students: dict  # name -> tiny_config arguments of a student architecture
    teacher_epochs: int
    student_epochs: int
    teacher_lr: float
    student_lr: float
    batch_tokens: int
    warmup: int
    k: int
    seeds: tuple[int, ...]  # sampling seeds of ROUGE-L
    train_seeds: tuple[int, ...]  # student replicates: initialisation and batch order
    max_new_tokens: int
    eval_batch_size: int
    caches: tuple[CacheSpec, ...]
    rows: tuple[StudentSpec, ...]
    reference: str  # the row the paired differences are taken against
    probes: tuple[TeacherProbe, ...] = ()
    threads: int = 1  # torch intra-op threads for every stage (numerics depend on it; see README)
    sar: SarSpec | None = None  # the routers of the caches with policy sar


KA = {"ka_lambda": 0.05}
# The published SAR runs take 200 steps at lr 1e-6 .. 5e-6 on teachers of hidden size ~4096. Adam
# moves every weight by about lr per step, and a gate logit sums hidden-size such moves, so the
# same change of the gate logits takes a rate 4096 / 96 ~ 40 times larger at this teacher's size.
SAR_STEPS, SAR_LR = 100, 2e-4
# MoE to MoE: the topk cache with the teacher's gate distributions, one MoE student by logit KD and by B-Distill
GATES_CACHE = CacheSpec("topk-gates", "topk", router_probs="full")
BDISTILL = {"router_loss": "bdistill", "expert_weight": 0.1}
MOE_ROWS = (
    StudentSpec("MoE KD", "topk-gates", init="moe"),
    StudentSpec("MoE B-Distill", "topk-gates", init="moe", options=BDISTILL, reference="MoE KD"),
)
DEFAULT_CACHES = (
    CacheSpec("topk", "topk"),
    CacheSpec("all", "all"),
    CacheSpec("ka", "ka", {"m": 2, **KA}),
    CacheSpec("sar", "sar"),
    GATES_CACHE,
)
DEFAULT_ROWS = (
    StudentSpec("SFT"),
    StudentSpec("KD topk", "topk"),
    StudentSpec("KD all", "all"),
    StudentSpec("KD ka", "ka"),
    StudentSpec("KD sar", "sar"),
    *MOE_ROWS,
)
# The teacher: its MoE layers hold most of its weights (8 experts of width 4 x hidden, top-2); see README.
TEACHER = dict(family="mixtral", hidden=96, layers=4, experts=8, top_k=2, intermediate_size=384, init="training")
DEFAULT_PLAN = DemoPlan(
    n_train=1500,
    n_valid=100,
    n_test=200,
    vocab=1024,
    teacher=TEACHER,
    students={
        "dense": dict(family="llama", hidden=64, layers=2),
        "moe": dict(family="mixtral", hidden=64, layers=2, experts=4, top_k=2, init="training"),
    },
    teacher_epochs=8,
    student_epochs=3,
    teacher_lr=3e-3,
    student_lr=3e-3,
    batch_tokens=4096,
    warmup=20,
    k=32,
    seeds=(10, 20, 30, 40, 50),
    train_seeds=(0, 1, 2),
    max_new_tokens=64,
    eval_batch_size=100,
    caches=DEFAULT_CACHES,
    rows=DEFAULT_ROWS,
    reference="KD topk",
    sar=SarSpec(steps=SAR_STEPS, lr=SAR_LR),
)
QUICK_PLAN = DemoPlan(
    n_train=320,
    n_valid=16,
    n_test=32,
    vocab=512,
    teacher=dict(family="mixtral", hidden=48, layers=2, experts=4, top_k=2, intermediate_size=96, init="training"),
    students={
        "dense": dict(family="llama", hidden=32, layers=1),
        "moe": dict(family="mixtral", hidden=32, layers=1, experts=2, top_k=1, init="training"),
    },
    teacher_epochs=4,
    student_epochs=2,
    teacher_lr=3e-3,
    student_lr=3e-3,
    batch_tokens=2048,
    warmup=4,
    k=16,
    seeds=(10, 20),
    train_seeds=(0, 1),
    max_new_tokens=32,
    eval_batch_size=32,
    caches=DEFAULT_CACHES,
    rows=DEFAULT_ROWS,
    reference="KD topk",
    probes=(TeacherProbe("all", "all"),),
    sar=SarSpec(steps=4, lr=1e-3, compare_examples=8),
)
