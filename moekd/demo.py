"""`moekd demo`: the whole pipeline on the built-in suite, ending in the comparison table.

Stages (each is skipped when its output is already complete, so a rerun picks up where it stopped):
1. the synthetic instruction suite and a BPE tokenizer trained on its training split;
2. a small MoE teacher trained by SFT, and a dense student baseline trained by SFT;
3. teacher caches under the routing policies of the plan (topk, all, ka ...);
   with a SAR stage in the plan, also the Student-Aware Router: the teacher's routers trained on
   the training split with the SFT student's feedback, then a `sar` cache built with them;
4. one student distilled from each cache, from the same initialisation and for the same steps;
5. `moekd eval` (ROUGE-L, sampled, several seeds) of the teacher and every student;
6. the table: ROUGE-L mean ± std, cache size, build time, training tokens/s (JSON + PNG too).
`bench/paper_table.py` runs the same pipeline with a larger plan.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moekd.cache_builder.build import BuildOptions, build_cache
from moekd.cache_builder.policies import make_policy
from moekd.cache_builder.routing_stats import routing_stats_for_files
from moekd.data.prompts import format_prompt
from moekd.data.records import load_records
from moekd.data.synth import write_suite
from moekd.data.tokenizer import train_tokenizer
from moekd.distill.checkpoint import is_complete
from moekd.distill.metrics import read_metrics
from moekd.distill.train import TrainOptions, train
from moekd.errors import MoekdError
from moekd.eval.evaluate import evaluate, write_report
from moekd.sar.options import run_dir as sar_run_dir
from moekd.sar.router_file import read_router_file
from moekd.sar.train import SarOptions, train_router
from moekd.store.verify import store_info
from moekd.store.writer import store_state
from moekd.tiny_models import make_tiny_model


@dataclass(frozen=True)
class CacheSpec:
    name: str
    policy: str
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SarSpec:
    """The `moekd sar train` settings of the demo's SAR stage (the feedback comes from the SFT student)."""

    steps: int
    lr: float
    beta: float = 0.01
    teacher_kld: str = "reverse"
    responses: str = "student"
    compare_examples: int = 64  # test prompts on which the router's per-layer KL(original || trained) is measured


@dataclass(frozen=True)
class DemoPlan:
    n_train: int
    n_valid: int
    n_test: int
    vocab: int
    teacher: dict  # tiny_config arguments of the MoE teacher
    student: dict  # tiny_config arguments of the dense student
    teacher_epochs: int
    student_epochs: int
    teacher_lr: float
    student_lr: float
    batch_tokens: int
    warmup: int
    k: int
    seeds: tuple[int, ...]
    max_new_tokens: int
    caches: tuple[CacheSpec, ...]
    sar: SarSpec | None = None


KA = {"ka_lambda": 0.05}
# The published SAR runs take 200 steps at lr 1e-6 .. 5e-6 on teachers of hidden size ~4096. Adam
# moves every weight by about lr per step, and a gate logit sums hidden-size such moves, so the
# same change of the gate logits takes a rate 4096 / 96 ~ 40 times larger at this teacher's size.
SAR_STEPS, SAR_LR = 100, 2e-4
DEFAULT_CACHES = (CacheSpec("topk", "topk"), CacheSpec("all", "all"), CacheSpec("ka", "ka", {"m": 2, **KA}))
DEFAULT_PLAN = DemoPlan(
    n_train=2000, n_valid=100, n_test=200, vocab=1024,
    teacher=dict(family="mixtral", hidden=96, layers=4, experts=8, top_k=2, router_std=None),
    student=dict(family="llama", hidden=64, layers=2),
    teacher_epochs=6, student_epochs=6, teacher_lr=3e-3, student_lr=3e-3, batch_tokens=4096, warmup=20, k=32,
    seeds=(10, 20, 30, 40, 50), max_new_tokens=64, caches=DEFAULT_CACHES, sar=SarSpec(steps=SAR_STEPS, lr=SAR_LR),
)
QUICK_PLAN = DemoPlan(
    n_train=320, n_valid=16, n_test=32, vocab=512,
    teacher=dict(family="mixtral", hidden=48, layers=2, experts=4, top_k=2, router_std=None),
    student=dict(family="llama", hidden=32, layers=1),
    teacher_epochs=4, student_epochs=2, teacher_lr=3e-3, student_lr=3e-3, batch_tokens=2048, warmup=4, k=16,
    seeds=(10, 20), max_new_tokens=32, caches=DEFAULT_CACHES, sar=SarSpec(steps=4, lr=1e-3, compare_examples=8),
)


def _train(console: Console, out: Path, **options) -> dict:
    """Train unless `out/final` is complete; the run's tokens/s either way."""
    if not is_complete(out / "final"):
        console.print(f"[bold]train[/] {out.name} ({options.get('loss', 'fkl')})")
        resume = "auto" if (out / "config.json").exists() else None
        train(TrainOptions(out=str(out), resume=resume, save_every=0, eval_every=0, workers=0, seed=0, **options), console)
    rates = [m["tokens_per_s"] for m in read_metrics(out) if m.get("tokens_per_s")]
    return {"model": str(out / "final"), "train_tokens_per_s": rates[-1] if rates else None}


def _cache(console: Console, out: Path, teacher: Path, data: Path, spec: CacheSpec, plan: DemoPlan,
           router: Path | None = None) -> dict:
    state = store_state(out)
    if state != "complete":
        console.print(f"[bold]cache[/] {spec.name}: policy {spec.policy} {spec.params}")
        build_cache(BuildOptions(teacher=str(teacher), data=str(data), out=str(out), policy=spec.policy,
                                 policy_params=spec.params, k=plan.k, device="cpu", resume=state == "unfinished",
                                 batch_tokens=plan.batch_tokens, router=str(router) if router else None), console)
    info = store_info(str(out))
    return {"cache_bytes": info["bytes_total"], "build_seconds": info["meta"].build.wall_seconds}


def _sar(console: Console, work: Path, teacher: Path, feedback: str, train_data: Path, test_data: Path,
         plan: DemoPlan, student: dict) -> dict:
    """The SAR stage: routers trained on the training split, a `sar` cache, a student distilled from it."""
    spec = plan.sar
    router = work / "sar" / "router.safetensors"
    if not router.exists():
        console.print(f"[bold]sar[/] routers: {spec.steps} steps, lr {spec.lr}, responses {spec.responses}")
        train_router(SarOptions(
            teacher=str(teacher), student=feedback, data=str(train_data), out=str(router), steps=spec.steps, lr=spec.lr,
            beta=spec.beta, teacher_kld=spec.teacher_kld, responses=spec.responses, batch_tokens=plan.batch_tokens,
            max_new_tokens=plan.max_new_tokens, device="cpu", save_every=50,
            resume="auto" if (sar_run_dir(router) / "config.json").exists() else None,
        ), console)
    meta = read_router_file(router)[1]
    moved = routing_stats_for_files(teacher, test_data, make_policy("all"), max_examples=spec.compare_examples,
                                    device="cpu", compare=router)
    cache = work / "caches" / "sar.zarr"
    cache_row = _cache(console, cache, teacher, train_data, CacheSpec("sar", "sar"), plan, router=router)
    trained = _train(console, work / "students" / "sar", cache=str(cache), loss="fkl", **student)
    return {**trained, **cache_row, "sar_train_seconds": meta.train_seconds, "sar_loss_start": meta.loss_start,
            "sar_loss_end": meta.loss_end, "router_kl": {s.layer: s.kl_to_trained for s in moved.layers}}


def _eval(console: Console, model: str, test: Path, out: Path, plan: DemoPlan) -> dict:
    if not out.exists():
        console.print(f"[bold]eval[/] {model}")
        report = evaluate(model, [str(test)], seeds=plan.seeds, max_new_tokens=plan.max_new_tokens, device="cpu",
                          batch_size=32)
        write_report(report, out)
    scores = json.loads(out.read_text())["datasets"][0]
    return {"rougeL_mean": scores["mean"], "rougeL_std": scores["std"], "rougeL_per_seed": scores["per_seed"]}


def run_pipeline(workdir: str | Path, plan: DemoPlan, console: Console | None = None) -> dict:
    """Run (or finish) every stage in `workdir`; return the table rows and write results.json/.png."""
    console = console or Console(stderr=True)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    plan_file = work / "plan.json"
    plan_json = json.dumps(asdict(plan), indent=2)
    if plan_file.exists() and plan_file.read_text() != plan_json:
        raise MoekdError(f"--workdir: {work} holds a run of another plan (see {plan_file}); choose another --workdir")
    plan_file.write_text(plan_json)
    data = work / "data"
    if not (data / "synth_info.json").exists():
        write_suite(data, seed=0, n_train=plan.n_train, n_valid=plan.n_valid, n_test=plan.n_test)
    train_data, test_data = data / "train.jsonl", data / "test.jsonl"
    if not (work / "tokenizer" / "tokenizer.json").exists():
        texts = [format_prompt(r) + r.response for r in load_records(train_data).records]
        train_tokenizer(texts, plan.vocab, work / "tokenizer")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    for role, config in (("teacher", plan.teacher), ("student", plan.student)):
        if not (work / "init" / role / "config.json").exists():
            make_tiny_model(config["family"], tokenizer, work / "init" / role, seed=0,
                            **{k: v for k, v in config.items() if k != "family"})

    rows = {}
    rows["teacher (MoE, SFT)"] = _train(console, work / "teacher", student=str(work / "init" / "teacher"),
                                        data=str(train_data), loss="ce", epochs=plan.teacher_epochs,
                                        lr=plan.teacher_lr, batch_tokens=plan.batch_tokens, warmup=plan.warmup)
    teacher = Path(rows["teacher (MoE, SFT)"]["model"])
    student = dict(student=str(work / "init" / "student"), epochs=plan.student_epochs, lr=plan.student_lr,
                   batch_tokens=plan.batch_tokens, warmup=plan.warmup)
    rows["student SFT"] = _train(console, work / "students" / "sft", data=str(train_data), loss="ce", **student)
    for spec in plan.caches:
        cache = work / "caches" / f"{spec.name}.zarr"
        cache_row = _cache(console, cache, teacher, train_data, spec, plan)
        trained = _train(console, work / "students" / spec.name, cache=str(cache), loss="fkl", **student)
        rows[f"student KD {spec.name}"] = {**trained, **cache_row}
    if plan.sar is not None:
        rows["student KD sar"] = _sar(console, work, teacher, rows["student SFT"]["model"], train_data, test_data, plan,
                                      student)
    for name, row in rows.items():
        slug = name.split(" (")[0].replace(" ", "_")
        row.update(_eval(console, row["model"], test_data, work / "eval" / f"{slug}.json", plan))
    results = {"plan": asdict(plan), "rows": rows}
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_results(rows, work / "results.png")
    return results


def results_table(rows: dict) -> Table:
    table = Table(title="moekd demo: ROUGE-L on the built-in test split (sampled, mean ± std over seeds)")
    for column in ("model", "ROUGE-L", "cache size", "build time", "train tok/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, row in rows.items():
        size = f"{row['cache_bytes'] / 1e6:.2f} MB" if "cache_bytes" in row else "-"
        build = f"{row['build_seconds']:.1f} s" if row.get("build_seconds") else "-"
        if row.get("sar_train_seconds"):
            build += f" + {row['sar_train_seconds']:.0f} s SAR"
        rate = f"{row['train_tokens_per_s']:,.0f}" if row.get("train_tokens_per_s") else "-"
        table.add_row(name, f"{row['rougeL_mean']:.2f} ± {row['rougeL_std']:.2f}", size, build, rate)
    return table


def plot_results(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    ax.bar(range(len(names)), [rows[n]["rougeL_mean"] for n in names], yerr=[rows[n]["rougeL_std"] for n in names],
           capsize=4, color=["#888888"] + ["#4c72b0"] * (len(names) - 1))
    ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=8)
    ax.set_ylabel("ROUGE-L (x100)")
    ax.set_title("moekd demo: teacher and students on the built-in test split")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
