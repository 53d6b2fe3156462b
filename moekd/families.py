"""The MoE causal-LM families of the installed transformers, and what moekd does with each.

A family is a model type that `AutoModelForCausalLM` builds (transformers'
`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`) whose modeling module declares a router class for
`router_logits` (read from the module's source, so listing the families imports no model). `family_report` builds the family small (`tiny_models.make_tiny_family_model`),
recognises its routers (`moekd.routing.routers`) and runs one short forward under every routing policy.
`moekd routing families` prints the reports; the conformance suite (tests/test_families.py)
checks every family the same builder can build.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moekd.options import option

ALL_POLICIES = ("topk", "all", "ka", "topp", "mc")


@dataclass
class FamiliesOptions:
    """The settings of `moekd routing families`."""

    family: list[str] | None = option(None, "Only this model type (repeatable); default: every MoE family.")
    markdown: bool = option(False, "Print the table as Markdown (as in docs/families.md) instead.")
    as_json: bool = option(False, "Print the reports as JSON on stdout instead of a table.", flag="--json")


@dataclass(frozen=True)
class Family:
    model_type: str
    causal_lm: str  # the AutoModelForCausalLM class name
    router_classes: tuple[str, ...]  # declared for router_logits in its modeling module


@dataclass
class FamilyReport:
    model_type: str
    causal_lm: str
    router_class: str
    built: bool  # a tiny model of it builds and runs on CPU (so the conformance suite runs it)
    kind: str = ""  # score function and top-k, or "none fits"
    g: str = ""  # gate distribution g
    weighting: str = ""  # native weighting of the selected experts
    policy_weighting: str = (
        ""  # what all, ka, topp, mc weight by: native (and how it differs from published) or published
    )
    quirks: str = ""
    policies: tuple[str, ...] = ()  # policies a forward ran under
    reason: str = ""  # why it is unsupported or not built

    @property
    def supported(self) -> bool:
        return set(ALL_POLICIES) <= set(self.policies)

    def to_dict(self) -> dict:
        return {**asdict(self), "supported": self.supported}


ROUTER_RECORDER = re.compile(r'"router_logits":\s*\[?\s*(?:OutputRecorder\(\s*(?:target_class=)?)?([A-Z]\w*)')


def moe_families() -> list[Family]:
    """Every MoE causal-LM model type of the installed transformers, in the library's order.

    Read from the library's source without importing the models: the modeling module of each
    `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` class and its `"router_logits"` recorders.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = Path(transformers.__file__).parent
    families = []
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        module = transformers._class_to_module.get(class_name)
        source = root.joinpath(*module.split(".")).with_suffix(".py") if module else None
        if source is None or not source.exists():
            continue
        routers = ROUTER_RECORDER.findall(source.read_text())
        if routers:
            families.append(Family(model_type, class_name, tuple(dict.fromkeys(routers))))
    return families


def first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}"


def family_report(family: Family, tokens: int = 12) -> FamilyReport:
    """Build `family` small, recognise its routers and run a forward under each policy."""
    from moekd.errors import MoekdError
    from moekd.routing.controller import RouterController
    from moekd.routing.policies import make_policy
    from moekd.routing.routers import recognise_routers
    from moekd.tiny_models import make_tiny_family_model

    report = FamilyReport(family.model_type, family.causal_lm, ", ".join(family.router_classes), built=False)
    try:
        model = make_tiny_family_model(family.model_type)
        ids = torch.randint(
            0, model.get_input_embeddings().num_embeddings, (1, tokens), generator=torch.Generator().manual_seed(0)
        )
        infos = recognise_routers(model)
    except Exception as e:
        report.reason = f"does not build small on CPU ({first_line(e)})"
        return report
    report.built = True
    report.router_class = ", ".join(dict.fromkeys(type(i.module).__name__ for i in infos)) or report.router_class
    adapters = [i.adapter for i in infos if i.adapter is not None]
    unsupported = [i for i in infos if i.adapter is None]
    if not infos:
        report.reason = "no router ran in a forward of the tiny model"
        return report
    if unsupported:
        report.kind = "none fits"
        report.reason = unsupported[0].reason
    else:
        described = adapters[0].describe()
        report.kind, report.g, report.weighting = described["kind"], described["g"], described["weighting"]
        report.policy_weighting = policy_weighting(adapters[0])
        if adapters[0].score == "score_fn":  # name the activation
            activation = type(infos[0].module.score_fn).__name__
            report.g = report.g.replace("score_fn", activation)
            report.policy_weighting = report.policy_weighting.replace("score_fn", activation)
        quirks = [f"top-{a.top_k} routing" for a in adapters[:1] if a.top_k == 1]
        report.quirks = "; ".join(dict.fromkeys([*quirks, *(q for i in infos for q in i.quirks)]))
    ran = []
    for name in ALL_POLICIES:
        try:
            controller = RouterController(model, make_policy(name, samples=1))
            with torch.no_grad(), controller.active(row_seeds=[0]):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            if torch.isfinite(logits).all():
                ran.append(name)
        except MoekdError:
            pass
        except Exception as e:
            report.reason = report.reason or f"--policy {name} breaks its forward ({first_line(e)})"
    report.policies = tuple(ran)
    return report


def policy_weighting(adapter) -> str:
    """What the rewriting policies weight the selected experts by, and how that compares with the published weighting."""
    if adapter.weighting == "published":
        return "published: softmax over the kept experts' logits"
    expanding, mc = adapter.published_difference(renormalise=True), adapter.published_difference(renormalise=False)
    if expanding is None and mc is None:
        return "native (= published)"
    if expanding is None:
        return f"native (= published; mc: {mc})"
    return f"native (differs from published: {expanding})"


COLUMNS = (
    "family",
    "router class",
    "kind",
    "g",
    "native weighting",
    "policy weighting",
    "quirks",
    "policies",
    "tested",
)


def table_rows(reports: list[FamilyReport]) -> list[tuple[str, ...]]:
    """One row of `COLUMNS` per family."""
    rows = []
    for r in reports:
        policies = ", ".join(r.policies) if r.supported else f"{', '.join(r.policies) or 'none'} only: {r.reason}"
        tested = "yes" if r.built else f"no: {r.reason}"
        rows.append(
            (r.model_type, r.router_class, r.kind, r.g, r.weighting, r.policy_weighting, r.quirks, policies, tested)
        )
    return rows


def markdown_table(reports: list[FamilyReport]) -> str:
    """The table of docs/families.md."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(reports)]
    return "\n".join(lines)


def family_reports(model_types: list[str] | None = None, on_family=lambda family: None) -> list[FamilyReport]:
    """Reports for the installed transformers' MoE families (or those named), one thread: tiny models are faster so."""
    from moekd.errors import MoekdError

    families = moe_families()
    if model_types:
        known = {f.model_type for f in families}
        unknown = [m for m in model_types if m not in known]
        if unknown:
            raise MoekdError(
                f"--family: {', '.join(unknown)} is not an MoE causal-LM model type of the installed "
                f"transformers; choose from {', '.join(sorted(known))}"
            )
        families = [f for f in families if f.model_type in model_types]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reports = []
        for family in families:
            on_family(family)
            reports.append(family_report(family))
        return reports
    finally:
        torch.set_num_threads(threads)


def summary(reports: list[FamilyReport]) -> str:
    """The figure: families supported / MoE causal-LM families, and router classes likewise."""
    import transformers

    classes = {c for r in reports for c in r.router_class.split(", ")}
    unsupported_classes = {c for r in reports if not r.supported for c in r.router_class.split(", ")}
    return (
        f"{sum(r.supported for r in reports)} / {len(reports)} MoE causal-LM families of transformers "
        f"{transformers.__version__} take every routing policy and gate capture "
        f"({len(classes - unsupported_classes)} / {len(classes)} router classes)"
    )
