"""What the demo runs: the teacher, the caches (`CacheSpec`), the student rows (`StudentSpec`), the
teacher probes and the SAR stage, bundled in a `DemoPlan`; the built-in plans DEFAULT_PLAN and QUICK_PLAN."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ConfigDict, TypeAdapter, ValidationError

from moekd.errors import MoekdError

STRICT = ConfigDict(extra="forbid")  # a misspelt key in a plan file is an error, not ignored


@dataclass(frozen=True)
class CacheSpec:
    __pydantic_config__ = STRICT

    name: str
    policy: str
    params: dict = field(default_factory=dict)  # make_policy parameters (m, ka_lambda, experts ...)
    router_probs: str = "none"  # also store the gate distributions (full, top-R) for MoE students


@dataclass(frozen=True)
class StudentSpec:
    __pydantic_config__ = STRICT

    name: str
    cache: str | None = None  # a CacheSpec name; None trains by SFT on the data
    init: str = "dense"  # a key of DemoPlan.students
    options: dict = field(default_factory=dict)  # TrainOptions fields beyond the plan's (loss, ce_weight ...)
    reference: str | None = None  # the row its paired differences are taken against (None: the plan's reference)


@dataclass(frozen=True)
class TeacherProbe:
    __pydantic_config__ = STRICT

    name: str
    policy: str
    params: dict = field(default_factory=dict)
    rouge: bool = True  # also sample and score ROUGE-L (else only NLL and KL)


@dataclass(frozen=True)
class SarSpec:
    """The `moekd sar train` run behind the plan's `sar` cache."""

    __pydantic_config__ = STRICT

    steps: int
    lr: float
    beta: float = 0.01
    teacher_kld: str = "reverse"
    responses: str = "student"
    feedback: str = "SFT"  # the SFT row whose first training-seed replicate gives the feedback
    compare_examples: int = 64  # test prompts on which the per-layer KL(original || trained) is measured


@dataclass(frozen=True)
class DemoPlan:
    __pydantic_config__ = STRICT

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
    threads: int = 1  # torch intra-op threads for every stage (numerics depend on it; see docs/science.md)
    sar: SarSpec | None = None  # the routers of the caches with policy sar


PLANS = Path(__file__).with_name("plans")  # the built-in plans, as `moekd demo --config` takes them


def load_plan(path: str | Path) -> DemoPlan:
    """A plan from a YAML file (the built-in ones are plans/default.yaml and plans/quick.yaml); one line
    naming the field at fault otherwise."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MoekdError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MoekdError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    try:
        return TypeAdapter(DemoPlan).validate_python(raw)
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:3])
        raise MoekdError(f"--config {path}: not a demo plan ({where})") from None


DEFAULT_PLAN = load_plan(PLANS / "default.yaml")
QUICK_PLAN = load_plan(PLANS / "quick.yaml")
# Pieces of the default plan that the benchmarks reuse in plans of their own.
GATES_CACHE = next(c for c in DEFAULT_PLAN.caches if c.router_probs != "none")
MOE_ROWS = tuple(row for row in DEFAULT_PLAN.rows if row.cache == GATES_CACHE.name)
KA = {k: v for k, v in next(c for c in DEFAULT_PLAN.caches if c.policy == "ka").params.items() if k != "m"}
