"""The demo's stages (see moekd/demo/__init__.py), each skipped when its output is already complete."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path

from rich.console import Console

from moekd.cache_builder.build import BuildOptions, build_cache
from moekd.data.prompts import format_prompt
from moekd.data.records import load_records
from moekd.data.synth import write_suite
from moekd.data.tokenizer import train_tokenizer
from moekd.demo.plan import (
    CacheSpec,
    DemoPlan,
    StudentSpec,
    TeacherProbe,
)
from moekd.demo.report import plot_results
from moekd.distill.train import TrainOptions, train
from moekd.errors import MoekdError
from moekd.eval.evaluate import evaluate, write_report
from moekd.eval.options import EvalOptions
from moekd.experiments import Stopwatch, summarise_rows
from moekd.fsio import atomic_write
from moekd.paths import check_output_dir
from moekd.routing.router_file import read_router_file
from moekd.routing.stats import StatsOptions, routing_stats_for_files
from moekd.sar.options import run_dir as sar_run_dir
from moekd.sar.train import SarOptions, train_router
from moekd.store.info import store_info
from moekd.store.writer import store_state
from moekd.tiny_models import make_tiny_model
from moekd.training.checkpoint import is_complete
from moekd.training.metrics import read_metrics


def _train(console: Console, out: Path, **options) -> dict:
    """Train unless `out/final` is complete; the run's tokens/s either way."""
    if not is_complete(out / "final"):
        console.print(f"[bold]train[/] {out.parent.name}/{out.name} ({options.get('loss', 'fkl')})")
        resume = "auto" if (out / "config.json").exists() else None
        train(
            TrainOptions(out=str(out), resume=resume, save_every=0, eval_every=0, workers=0, **options), _quiet(console)
        )
    rates = [m["tokens_per_s"] for m in read_metrics(out) if m.get("tokens_per_s")]
    return {"model": str(out / "final"), "train_tokens_per_s": rates[-1] if rates else None}


def _cache(
    console: Console, out: Path, teacher: Path, data: Path, spec: CacheSpec, plan: DemoPlan, router: Path | None = None
) -> dict:
    state = store_state(out)
    if state != "complete":
        console.print(f"[bold]cache[/] {spec.name}: policy {spec.policy} {spec.params}")
        build_cache(
            BuildOptions(
                teacher=str(teacher),
                data=str(data),
                out=str(out),
                policy=spec.policy,
                policy_params=spec.params,
                k=plan.k,
                device="cpu",
                resume=state == "unfinished",
                batch_tokens=plan.batch_tokens,
                router_probs=spec.router_probs,
                router=str(router) if spec.policy == "sar" else None,
            ),
            _quiet(console),
        )
    info = store_info(str(out))
    return {"cache_bytes": info["bytes_total"], "build_seconds": info["meta"].build.wall_seconds}


def _eval(
    console: Console,
    model: str,
    test: Path,
    out: Path,
    plan: DemoPlan,
    rouge: bool = True,
    teacher: Path | None = None,
    probe: TeacherProbe | None = None,
) -> dict:
    """ROUGE-L (per-seed and mean over sampling seeds), NLL and KL from `teacher` of one model, cached in `out`."""
    if not out.exists():
        console.print(f"[bold]eval[/] {out.stem}")
        options = EvalOptions(
            str(model),
            [str(test)],
            tuple(plan.seeds),
            max_new_tokens=plan.max_new_tokens,
            device="cpu",
            batch_size=plan.eval_batch_size,
            rouge=rouge,
            nll=True,
            teacher=str(teacher) if teacher else None,
            policy=probe.policy if probe else None,
            policy_params=dict(probe.params) if probe else {},
        )
        report = evaluate(options)
        write_report(report, out)
    scores = json.loads(out.read_text())["datasets"][0]
    return {
        "rougeL": scores["mean"],
        "rougeL_sampling_std": scores["std"],
        "rougeL_per_seed": scores["per_seed"],
        "nll": scores["nll"],
        "kl": scores["kl_from_teacher"],
    }


def _sar(console: Console, work: Path, plan: DemoPlan, teacher: Path, train_data: Path, test_data: Path) -> dict:
    """The SAR stage: the feedback student (a replicate the student stage then reuses), the routers
    trained on the training split, and how far each layer's gate distribution moved on the test split."""
    spec, rows = plan.sar, {row.name: row for row in plan.rows}
    if rows.get(spec.feedback) is None or rows[spec.feedback].cache is not None:
        raise MoekdError(f"plan: the SAR feedback row {spec.feedback!r} is not an SFT row of the plan")
    feedback = _student_run(
        console, work, plan, rows[spec.feedback], plan.train_seeds[0], {"data": str(train_data), "loss": "ce"}
    )
    router = work / "sar" / "router.safetensors"
    if not router.exists():
        console.print(f"[bold]sar[/] routers: {spec.steps} steps, lr {spec.lr}, responses {spec.responses}")
        train_router(
            SarOptions(
                teacher=str(teacher),
                student=feedback["model"],
                data=str(train_data),
                out=str(router),
                steps=spec.steps,
                lr=spec.lr,
                beta=spec.beta,
                teacher_kld=spec.teacher_kld,
                responses=spec.responses,
                batch_tokens=plan.batch_tokens,
                max_new_tokens=plan.max_new_tokens,
                device="cpu",
                save_every=50,
                seed=plan.train_seeds[0],
                resume="auto" if (sar_run_dir(router) / "config.json").exists() else None,
            ),
            _quiet(console),
        )
    meta = read_router_file(router)[1]
    moved = routing_stats_for_files(
        StatsOptions(
            str(teacher), str(test_data), "all", max_examples=spec.compare_examples, device="cpu", compare=str(router)
        )
    )
    return {
        "router": str(router),
        "train_seconds": meta.train_seconds,
        "loss_start": meta.loss_start,
        "loss_end": meta.loss_end,
        "kl_original_trained": {s.layer: s.kl_to_trained for s in moved.layers},
    }


def _student_dir(work: Path, spec: StudentSpec, seed: int) -> Path:
    return work / "students" / _slug(spec.name) / f"seed-{seed}"


def _student_run(console: Console, work: Path, plan: DemoPlan, spec: StudentSpec, seed: int, source: dict) -> dict:
    """Train one replicate of a student row: initialised with `seed`, batches ordered by `seed`."""
    init = work / "init" / f"{spec.init}-seed{seed}"
    return _train(
        console,
        _student_dir(work, spec, seed),
        student=str(init),
        epochs=plan.student_epochs,
        lr=plan.student_lr,
        batch_tokens=plan.batch_tokens,
        warmup=plan.warmup,
        seed=seed,
        **{**source, **spec.options},
    )


def _student(
    console: Console, work: Path, plan: DemoPlan, spec: StudentSpec, seed: int, source: dict, teacher: Path, test: Path
) -> dict:
    """One replicate of a student row: initialise with `seed`, train with `seed`, evaluate."""
    out = _student_dir(work, spec, seed)
    run = _student_run(console, work, plan, spec, seed, source)
    scores = _eval(
        console, run["model"], test, work / "eval" / f"{_slug(spec.name)}-seed{seed}.json", plan, teacher=teacher
    )
    if spec.cache:  # the KD term alone, without CE or router terms, on the cache's held-out examples at the end
        last = read_metrics(out)[-1]
        scores["heldout_kd"] = last.get("eval_kd_loss", last.get("eval_logit_loss", last.get("eval_loss")))
    if "experts" in plan.students[spec.init]:
        scores.update(
            _routing(console, run["model"], test, work / "routing" / f"{_slug(spec.name)}-seed{seed}.json", plan)
        )
    return {**scores, "train_tokens_per_s": run["train_tokens_per_s"]}


def _routing(console: Console, model: str, test: Path, out: Path, plan: DemoPlan) -> dict:
    """Mean over MoE layers of the expert-load CV and gate entropy on the test prompts and references."""
    if not out.exists():
        console.print(f"[bold]routing[/] {out.stem}")
        out.parent.mkdir(parents=True, exist_ok=True)
        stats = routing_stats_for_files(StatsOptions(str(model), str(test), max_examples=plan.n_test, device="cpu"))
        atomic_write(out, json.dumps(stats.to_dict()).encode())
    layers = json.loads(out.read_text())["layers"]
    return {
        "load_cv": sum(s["load_cv"] for s in layers) / len(layers),
        "gate_entropy": sum(s["gate_entropy"] for s in layers) / len(layers),
    }


def run_pipeline(workdir: str | Path, plan: DemoPlan, console: Console | None = None, jobs: int = 2) -> dict:
    """Run (or finish) every stage in `workdir`; return the results and write results.json/.png.

    `jobs` processes build the caches, train and evaluate the students and evaluate the teacher
    side by side (each with `plan.threads` threads); the numbers do not depend on it.
    """
    import torch

    if jobs < 1:
        raise MoekdError(f"--jobs must be at least 1, got {jobs}")
    threads = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        return _run_pipeline(check_output_dir(workdir, "--workdir"), plan, console or Console(stderr=True), jobs)
    finally:
        torch.set_num_threads(threads)


def _run_pipeline(work: Path, plan: DemoPlan, console: Console, jobs: int) -> dict:
    plan_file = work / "plan.json"
    plan_json = json.dumps(asdict(plan), indent=2)
    if plan_file.exists() and plan_file.read_text() != plan_json:
        raise MoekdError(f"--workdir: {work} holds a run of another plan (see {plan_file}); choose another --workdir")
    if not plan_file.exists() and work.exists() and any(work.iterdir()):
        raise MoekdError(f"--workdir: {work} is not empty and holds no moekd demo; choose a new or empty directory")
    work.mkdir(parents=True, exist_ok=True)
    for spec in plan.rows:
        if spec.cache is not None and spec.cache not in {c.name for c in plan.caches}:
            raise MoekdError(f"plan: row {spec.name!r} names cache {spec.cache!r}, which the plan does not build")
        if spec.reference is not None and spec.reference not in {r.name for r in plan.rows}:
            raise MoekdError(
                f"plan: row {spec.name!r} takes its differences against {spec.reference!r}, which is not a row"
            )
    if any(c.policy == "sar" for c in plan.caches) and plan.sar is None:
        raise MoekdError("plan: a cache with policy sar needs the plan's SarSpec (DemoPlan.sar)")
    plan_file.write_text(plan_json)
    train_data, test_data = work / "data" / "train.jsonl", work / "data" / "test.jsonl"
    clock = Stopwatch()  # this run's time per part (finished stages that are reused cost ~0)
    run = partial(_run_jobs, console, jobs, plan.threads)

    with clock.part("teacher training"):
        trained = prepare_teacher(work, plan, console)
    teacher = Path(trained["model"])
    replicates = [(spec, seed) for spec in plan.rows for seed in plan.train_seeds]
    for spec, seed in replicates:  # before the jobs start, so that no two write one
        _init(work / "init" / f"{spec.init}-seed{seed}", plan.students[spec.init], seed)
    sar = None
    if plan.sar is not None:
        with clock.part("SAR router training"):
            sar = _sar(console, work, plan, teacher, train_data, test_data)
    caches = {spec.name: work / "caches" / f"{spec.name}.zarr" for spec in plan.caches}
    with clock.part("cache builds"):
        built = run(
            [
                (
                    _cache,
                    dict(
                        out=caches[spec.name],
                        teacher=teacher,
                        data=train_data,
                        spec=spec,
                        plan=plan,
                        router=Path(sar["router"]) if sar else None,
                    ),
                )
                for spec in plan.caches
            ]
        )
    cache_info = dict(zip(caches, built))

    with clock.part("student training and evaluation"):
        scores = run(
            [
                (
                    _student,
                    dict(
                        work=work,
                        plan=plan,
                        spec=spec,
                        seed=seed,
                        teacher=teacher,
                        test=test_data,
                        source={"cache": str(caches[spec.cache]), "loss": "fkl"}
                        if spec.cache
                        else {"data": str(train_data), "loss": "ce"},
                    ),
                )
                for spec, seed in replicates
            ]
        )
    by_row = {spec.name: {} for spec in plan.rows}
    for (spec, seed), score in zip(replicates, scores):
        by_row[spec.name][seed] = score
    summary = {spec.name: _summary(by_row, spec.name, spec.reference or plan.reference) for spec in plan.rows}
    rows = {
        spec.name: {
            "cache": spec.cache,
            **(cache_info.get(spec.cache) or {}),
            **summary[spec.name],
            "replicates": by_row[spec.name],
        }
        for spec in plan.rows
    }

    evals = [(_eval, dict(model=str(teacher), test=test_data, out=work / "eval" / "teacher.json", plan=plan))]
    evals += [
        (
            _eval,
            dict(
                model=str(teacher),
                test=test_data,
                out=work / "eval" / f"teacher-{_slug(probe.name)}.json",
                plan=plan,
                rouge=probe.rouge,
                teacher=teacher,
                probe=probe,
            ),
        )
        for probe in plan.probes
    ]
    with clock.part("teacher evaluation"):
        teacher_scores = run(evals)
    teachers = {"native": {**teacher_scores[0], "train_tokens_per_s": trained["train_tokens_per_s"]}}
    for probe, score in zip(plan.probes, teacher_scores[1:]):
        teachers[probe.name] = {"policy": probe.policy, "params": probe.params, **score}
    results = {
        "plan": asdict(plan),
        "teacher": teachers,
        "rows": rows,
        "timings": clock.parts,
        **({"sar": sar} if sar else {}),
    }
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_results(results, work / "results.png")
    return results


def prepare_teacher(work: Path, plan: DemoPlan, console: Console) -> dict:
    """Stages 1-2: the suite in work/data, the tokenizer, and the teacher trained by SFT in work/teacher
    (each skipped when already there). Returns the teacher's model directory and training tokens/s."""
    data = work / "data"
    if not (data / "synth_info.json").exists():
        write_suite(data, seed=0, n_train=plan.n_train, n_valid=plan.n_valid, n_test=plan.n_test)
    _tokenizer(work, data / "train.jsonl", plan.vocab)
    teacher_init = _init(work / "init" / "teacher", plan.teacher, seed=0)
    return _train(
        console,
        work / "teacher",
        student=str(teacher_init),
        data=str(data / "train.jsonl"),
        loss="ce",
        epochs=plan.teacher_epochs,
        lr=plan.teacher_lr,
        batch_tokens=plan.batch_tokens,
        warmup=plan.warmup,
        seed=0,
    )


def _summary(by_row: dict, name: str, reference: str) -> dict:
    """One row's statistics, its paired differences taken against `reference`."""
    return summarise_rows(
        {name: by_row[name], **({reference: by_row[reference]} if reference in by_row else {})}, reference
    )[name]


def _run_jobs(console: Console, jobs: int, threads: int, calls: list[tuple]) -> list:
    """Results of fn(console, **kwargs) for each (fn, kwargs), in order: here, or in `jobs` processes."""
    if jobs == 1 or len(calls) < 2:
        return [fn(console, **kwargs) for fn, kwargs in calls]
    import multiprocessing

    with ProcessPoolExecutor(
        min(jobs, len(calls)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_job_process,
        initargs=(threads,),
    ) as pool:
        futures = [pool.submit(_in_job, fn, kwargs) for fn, kwargs in calls]
        return [future.result() for future in futures]


def _in_job(fn, kwargs: dict):
    return fn(Console(stderr=True, force_terminal=False), **kwargs)


def _job_process(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _quiet(console: Console) -> Console:
    """Progress bars only where one process writes to the terminal."""
    return console if console.is_terminal else Console(stderr=True, quiet=True)


def _slug(name: str) -> str:
    return name.replace(" ", "-").replace("=", "").replace(".", "")


def _tokenizer(work: Path, train_data: Path, vocab: int) -> None:
    if not (work / "tokenizer" / "tokenizer.json").exists():
        texts = [format_prompt(r) + r.response for r in load_records(train_data).records]
        train_tokenizer(texts, vocab, work / "tokenizer")


def _init(out: Path, config: dict, seed: int) -> Path:
    """A randomly initialised model of `config` drawn with `seed`, saved once to `out` (tokenizer beside it)."""
    if not (out / "config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(out.parent.parent / "tokenizer"))
        make_tiny_model(
            config["family"], tokenizer, out, seed=seed, **{k: v for k, v in config.items() if k != "family"}
        )
    return out
