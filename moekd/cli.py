"""The `moekd` command line: thin typed commands; the work happens in the modules they call.

Each command group lives in its own block below. Errors a user can fix raise `MoekdError`,
which `main` prints as one red line (exit code 2) instead of a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from moekd.errors import MoekdError

app = typer.Typer(
    help="Distil Mixture-of-Experts teachers into students from an offline, shareable teacher cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(help="Build, inspect and verify teacher caches.", no_args_is_help=True)
routing_app = typer.Typer(help="Inspect a teacher's MoE routing.", no_args_is_help=True)
data_app = typer.Typer(help="Built-in instruction data.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(routing_app, name="routing")
app.add_typer(data_app, name="data")

console = Console(stderr=True)


def main() -> None:
    # moekd draws its own progress bars; transformers' per-load bars would only clutter them
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    except MoekdError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: finished units and checkpoints are kept; rerun with --resume to continue")
        sys.exit(130)


# ---------------------------------------------------------------- cache


@cache_app.command("build")
def cache_build(
    teacher: str = typer.Option(..., help="Teacher checkpoint: a local Hugging Face directory (or a hub id when online)."),
    data: Path = typer.Option(..., help="Instruction data: .jsonl, .json, .parquet or a datasets save_to_disk directory."),
    out: Path = typer.Option(..., help="Store to write, e.g. run.zarr."),
    policy: str = typer.Option("topk", help="Teacher routing policy: topk, all, ka, topp, mc."),
    m: Optional[int] = typer.Option(None, "--m", help="Teacher samples per example (stochastic policies; ka default 2)."),
    ka_lambda: Optional[float] = typer.Option(None, help="ka: probability of sampling the kept experts instead of taking the top ones (default 0.05)."),
    ka_drop: Optional[int] = typer.Option(None, help="ka: experts left out per token and layer (default 1: N-1 kept)."),
    top_p: Optional[float] = typer.Option(None, help="topp: gate mass the selected experts must reach."),
    k: int = typer.Option(64, help="Teacher token ids stored per position and sample (top-k, plus a tail bucket)."),
    max_prompt_len: int = typer.Option(256, help="Longest prompt in tokens; longer rows are an error (or skipped with --skip-invalid)."),
    max_len: int = typer.Option(512, help="Longest prompt+response in tokens; longer responses are truncated and counted."),
    dtype: str = typer.Option("auto", help="Teacher dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    batch_tokens: int = typer.Option(8192, help="Padded tokens per teacher forward."),
    seed: int = typer.Option(0, help="Base seed; each (example, sample) draws from its own seed derived from it."),
    resume: bool = typer.Option(False, "--resume", help="Continue an unfinished build (same settings required), or start one if there is none."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store at --out."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer directory, when it is not in the teacher's."),
    chat_template: bool = typer.Option(False, "--chat-template", help="Build prompts with the tokenizer's chat template instead of the Dolly template."),
    instruction_field: Optional[str] = typer.Option(None, help="Field holding the instruction (default: instruction)."),
    context_field: Optional[str] = typer.Option(None, help="Field holding the context (default: context or input; '' for none)."),
    response_field: Optional[str] = typer.Option(None, help="Field holding the response (default: response or output)."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Leave out bad or over-long rows (counted in the summary) instead of stopping."),
    positions_per_shard: int = typer.Option(65536, help="Stored positions per shard file, the unit of resumable work."),
    router_probs: str = typer.Option("none", help="Also store each MoE layer's gate distribution: none, full, or top-R (R largest + rest mass)."),
) -> None:
    """Run the teacher once per example and sample and write its sparse distributions to a Zarr store.

    Example: moekd cache build --teacher ./teacher --data train.jsonl --out run.zarr --k 64
    """
    from moekd.cache_builder.build import BuildOptions, build_cache

    params = {"m": m, "ka_lambda": ka_lambda, "ka_drop": ka_drop, "top_p": top_p}
    options = BuildOptions(
        teacher=teacher, data=str(data), out=str(out), policy=policy,
        policy_params={key: value for key, value in params.items() if value is not None},
        k=k, max_prompt_len=max_prompt_len, max_len=max_len, dtype=dtype, device=device, batch_tokens=batch_tokens,
        seed=seed, resume=resume, overwrite=overwrite, tokenizer=tokenizer, chat_template=chat_template,
        fields={"instruction": instruction_field, "context": context_field, "response": response_field},
        skip_invalid=skip_invalid, positions_per_shard=positions_per_shard, router_probs=router_probs,
    )
    s = build_cache(options, console=Console(stderr=True))
    console.print(
        f"[green]wrote[/] {s.out}: {s.examples} examples, {s.positions} positions x {s.samples} sample(s); "
        f"units {s.units_done}/{s.units_total} computed this run; {s.teacher_tokens:,} teacher tokens at "
        f"{s.tokens_per_second:,.0f} tok/s; {s.wall_seconds:.1f} s total. "
        f"Truncated responses: {s.truncated_responses}. Skipped rows: {s.skipped or 'none'}.",
        highlight=False,
    )


@cache_app.command("info")
def cache_info(store: str = typer.Argument(..., help="Store path or fsspec URL.")) -> None:
    """Summarise a store: metadata, examples, stored positions, sizes on disk.

    Example: moekd cache info run.zarr
    """
    from rich.table import Table

    from moekd.store.verify import store_info

    info = store_info(store)
    meta = info["meta"]
    table = Table(title=f"moekd cache {store}", show_header=False)
    rows = [
        ("status", meta.build.status),
        ("schema", meta.schema_version),
        ("teacher", f"{meta.teacher.name_or_path} ({meta.teacher.architecture}, vocab {meta.teacher.vocab_size})"),
        ("experts", f"{meta.teacher.num_experts} per layer, top-{meta.teacher.experts_per_token}, {len(meta.teacher.moe_layers)} MoE layers"
         if meta.teacher.num_experts else "dense teacher"),
        ("policy", f"{meta.policy.name} {meta.policy.params} M={meta.policy.samples} seed={meta.policy.seed}"),
        ("encoding", f"top-{meta.encoding.k} + tail, {meta.encoding.logprob_codec} (max error {meta.encoding.max_abs_error_nats:.5f} nat)"),
        ("dataset", f"{meta.dataset.source} ({meta.dataset.format}, {meta.dataset.template} template)"),
        ("examples", f"{meta.layout.num_examples:,}"),
        ("tokens", f"{meta.layout.num_tokens:,}"),
        ("stored positions", f"{meta.layout.num_positions:,} x {meta.layout.num_samples} sample(s)"),
        ("truncated / skipped", f"{meta.dataset.truncated_responses} / {meta.dataset.skipped or 0}"),
        ("size on disk", f"{info['bytes_total']:,} B"),
        ("bytes per position", f"{info['bytes_per_position']:.1f}"),
        ("bytes per position-sample", f"{info['distribution_bytes_per_position_sample']:.1f} (top-k ids, log-probs, tail)"
         + (f" + {info['gate_bytes_per_position_sample']:.1f} (gates)" if meta.gates else "")),
        ("built", f"{meta.build.created_at} -> {meta.build.completed_at} on {meta.build.device}"),
    ]
    for name, size in info["bytes_per_array"].items():
        rows.append((f"  {name}", f"{size:,} B"))
    for key, value in rows:
        table.add_row(key, str(value))
    Console().print(table)


@cache_app.command("verify")
def cache_verify(
    store: str = typer.Argument(..., help="Store path or fsspec URL."),
    deep: bool = typer.Option(False, "--deep", help="Also decode every value and check its range."),
) -> None:
    """Check schema, structure and per-file checksums (and, with --deep, every value). Exit 1 on any problem.

    Example: moekd cache verify run.zarr --deep
    """
    from moekd.store.verify import verify_store

    report = verify_store(store, deep=deep)
    if report.ok:
        checked = f", {report.positions_checked:,} positions decoded" if deep else ""
        Console().print(f"[green]OK[/] {store}: {report.files_checked} files match the manifest{checked}")
        return
    for problem in report.problems:
        console.print(f"[red]FAIL[/] {problem}", highlight=False)
    console.print(f"[bold red]{store}: {len(report.problems)} problem(s)[/]")
    raise typer.Exit(1)


# ---------------------------------------------------------------- routing


@routing_app.command("stats")
def routing_stats(
    teacher: str = typer.Option(..., help="Teacher checkpoint directory (Hugging Face MoE causal LM)."),
    data: Path = typer.Option(..., help="Instruction data: .jsonl, .json, .parquet or a datasets save_to_disk directory."),
    policy: str = typer.Option("topk", help="Routing policy to measure: topk, all, ka, topp, mc."),
    ka_lambda: Optional[float] = typer.Option(None, help="ka: probability of sampling the kept experts (default 0.05)."),
    ka_drop: Optional[int] = typer.Option(None, help="ka: experts left out per token and layer (default 1)."),
    top_p: Optional[float] = typer.Option(None, help="topp: gate mass the selected experts must reach (default 0.9)."),
    scope: str = typer.Option("response", help="Tokens counted: response (the positions the cache stores) or all."),
    max_examples: int = typer.Option(64, help="Examples read from the start of --data."),
    batch_size: int = typer.Option(8, help="Examples per teacher forward."),
    max_prompt_len: int = typer.Option(256, help="Longest prompt in tokens."),
    max_len: int = typer.Option(512, help="Longest prompt+response in tokens; longer responses are truncated."),
    seed: int = typer.Option(0, help="Base seed of the stochastic policies (derived per example like cache build, sample 0)."),
    dtype: str = typer.Option("auto", help="Teacher dtype: auto, float32, bfloat16, float16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    plot: Optional[Path] = typer.Option(None, help="Also save a per-layer plot (PNG) here."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON on stdout instead of a table."),
) -> None:
    """Per MoE layer: gate mass of the activated and non-activated experts, expert load CV, gate entropy.

    Example: moekd routing stats --teacher ./teacher --data train.jsonl --plot routing.png
    """
    import json

    from moekd.cache_builder.policies import make_policy
    from moekd.cache_builder.routing_stats import plot_stats, render_table, routing_stats_for_files

    chosen = make_policy(policy, ka_lambda=ka_lambda, ka_drop=ka_drop, top_p=top_p)
    stats = routing_stats_for_files(
        teacher, data, chosen, max_examples=max_examples, batch_size=batch_size, max_prompt_len=max_prompt_len,
        max_len=max_len, seed=seed, scope=scope, device=device, dtype=dtype,
    )
    if plot is not None:
        plot_stats(stats, plot)
    if as_json:
        typer.echo(json.dumps(stats.to_dict(), indent=2))
    else:
        Console().print(render_table(stats))


# ---------------------------------------------------------------- data


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., help="Directory to write train.jsonl, valid.jsonl, test.jsonl and synth_info.json into."),
    seed: int = typer.Option(0, help="Generator seed; the same seed writes byte-identical files."),
    n_train: int = typer.Option(2000, help="Records in train.jsonl (families balanced)."),
    n_valid: int = typer.Option(200, help="Records in valid.jsonl."),
    n_test: int = typer.Option(400, help="Records in test.jsonl."),
) -> None:
    """Write the built-in instruction suite: short Dolly-form tasks from 16 task families, disjoint splits.

    Example: moekd data synth --out data/synth --seed 0 --n-train 2000
    """
    from rich.table import Table

    from moekd.data.synth import write_suite

    info = write_suite(out, seed=seed, n_train=n_train, n_valid=n_valid, n_test=n_test)
    splits = list(info["counts"])
    table = Table(title=f"moekd data synth -> {out} (seed {seed})")
    table.add_column("family")
    for split in splits:
        table.add_column(split, justify="right")
    for family in info["families"]:
        table.add_row(family, *(str(info["counts_per_family"][split].get(family, 0)) for split in splits))
    table.add_row("total", *(str(info["counts"][split]) for split in splits), style="bold")
    Console().print(table)


# ---------------------------------------------------------------- eval


@app.command("eval")
def eval_command(
    model: Path = typer.Option(..., help="Model checkpoint directory (saved with save_pretrained, tokenizer included)."),
    data: list[Path] = typer.Option(..., help="Test data in Dolly or Alpaca form; repeat --data for several datasets."),
    seeds: str = typer.Option("10,20,30,40,50", help="Comma-separated sampling seeds; one generation per prompt per seed."),
    max_new_tokens: int = typer.Option(256, help="Longest response in tokens."),
    max_prompt_len: int = typer.Option(256, help="Longest prompt in tokens; a longer prompt is an error."),
    batch_size: int = typer.Option(16, help="Prompts per generate() call (left padded); part of what makes a run reproducible."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write scores here and generations to <stem>.generations.jsonl beside it."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N rows of each dataset."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    chat_template: bool = typer.Option(False, "--chat-template", help="Build prompts with the tokenizer's chat template (as a cache built with --chat-template)."),
) -> None:
    """Sample responses (temperature 1, top_k 0, top_p 1) and score ROUGE-L: mean and std over seeds.

    Example: moekd eval --model runs/student --data data/synth/test.jsonl --seeds 10,20 --max-new-tokens 64 --json eval.json
    """
    from rich.table import Table

    from moekd.eval.evaluate import evaluate, parse_seeds, write_report

    seed_list = parse_seeds(seeds)
    report = evaluate(
        model, data, seed_list, max_new_tokens=max_new_tokens, max_prompt_len=max_prompt_len, batch_size=batch_size,
        limit=limit, device=device, chat_template=chat_template, log=lambda line: console.print(line, highlight=False),
    )
    table = Table(title=f"ROUGE-L of {model} (x100, mean ± std over {len(seed_list)} seeds)")
    for column in ("dataset", "n", "mean", "std", *(f"seed {s}" for s in seed_list)):
        table.add_column(column, justify="left" if column == "dataset" else "right", overflow="fold")
    for scores in report.datasets:
        per_seed = (f"{scores.per_seed[s]:.2f}" for s in seed_list)
        table.add_row(scores.data, str(scores.n), f"{scores.mean:.2f}", f"{scores.std:.2f}", *per_seed)
    Console().print(table)
    if json_out is not None:
        json_path, gen_path = write_report(report, json_out)
        console.print(f"[green]wrote[/] {json_path} and {gen_path}", highlight=False)


# ---------------------------------------------------------------- train


@app.command("train")
def train_command(
    student: str = typer.Option(..., help="Student checkpoint: a local Hugging Face causal LM directory (dense or MoE)."),
    out: Path = typer.Option(..., help="Run directory: config.json, metrics.jsonl/.csv, step-XXXXXX/ checkpoints, final/."),
    cache: Optional[str] = typer.Option(None, help="Teacher cache (path or fsspec URL) to distil from."),
    data: Optional[Path] = typer.Option(None, help="Instruction data for plain SFT with --loss ce, instead of --cache."),
    loss: str = typer.Option("fkl", help="fkl, rkl, skl, srkl, jsd, tvd (over the k stored ids + tail bucket), or ce."),
    skew_lambda: float = typer.Option(0.1, help="Mixing weight λ of skl and srkl."),
    jsd_beta: float = typer.Option(0.5, help="β of jsd."),
    temperature: float = typer.Option(1.0, help="Divides student logits and teacher log-probs (loss not scaled by T²)."),
    ce_weight: float = typer.Option(0.0, help="w in (1-w)·KD + w·CE, CE on the ground-truth response tokens."),
    samples: str = typer.Option("mean", help="With M > 1 teacher samples: mean (average the losses) or random (one per example and epoch)."),
    lr: float = typer.Option(1e-4, help="Peak AdamW learning rate."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    schedule: str = typer.Option("cosine", help="constant or cosine (to 0), after the warmup."),
    warmup: int = typer.Option(0, help="Optimizer steps of linear warmup."),
    max_grad_norm: float = typer.Option(1.0, help="Gradient clipping norm."),
    batch_tokens: int = typer.Option(8192, help="Padded tokens per micro-batch (rows x longest row)."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps to train (instead of --epochs)."),
    epochs: Optional[int] = typer.Option(None, help="Passes over the training examples (default 1 when --max-steps is not given)."),
    eval_every: int = typer.Option(100, help="Held-out evaluation every N steps (also before the first and after the last); 0: only those."),
    eval_fraction: float = typer.Option(0.05, help="Share of the examples held out for evaluation (at least 1; 0 for none); fixed for a given dataset."),
    save_every: int = typer.Option(500, help="Resumable checkpoint every N steps; 0: only final/."),
    resume: Optional[str] = typer.Option(None, help="auto (newest complete checkpoint in --out, or a fresh start) or a step-XXXXXX directory."),
    seed: int = typer.Option(0, help="Seed of the batch order, the --samples random draws and torch."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (bf16 autocast on CUDA)."),
    workers: int = typer.Option(2, help="Loader processes reading the cache ahead of training (0: read in the training process)."),
    allow_tokenizer_mismatch: bool = typer.Option(False, "--allow-tokenizer-mismatch", help="Train although the tokenizers differ, when their token-to-id mappings are the same."),
    max_prompt_len: int = typer.Option(256, help="--data: longest prompt in tokens."),
    max_len: int = typer.Option(512, help="--data: longest prompt+response in tokens (responses are truncated)."),
    chat_template: bool = typer.Option(False, "--chat-template", help="--data: build prompts with the tokenizer's chat template, as cache build does."),
    instruction_field: Optional[str] = typer.Option(None, help="--data: field holding the instruction."),
    context_field: Optional[str] = typer.Option(None, help="--data: field holding the context ('' for none)."),
    response_field: Optional[str] = typer.Option(None, help="--data: field holding the response."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="--data: leave out bad or over-long rows instead of stopping."),
) -> None:
    """Train a student on a teacher cache (KD), or on instruction data (--loss ce).

    Example: moekd train --cache run.zarr --student ./student --out runs/kd --loss fkl --max-steps 1000 --lr 5e-5 --warmup 50
    """
    from moekd.distill.train import TrainOptions, train

    options = TrainOptions(
        student=student, out=str(out), cache=cache, data=str(data) if data else None, loss=loss, skew_lambda=skew_lambda,
        jsd_beta=jsd_beta, temperature=temperature, ce_weight=ce_weight, samples=samples, lr=lr, weight_decay=weight_decay,
        schedule=schedule, warmup=warmup, max_grad_norm=max_grad_norm, batch_tokens=batch_tokens, grad_accum=grad_accum,
        max_steps=max_steps, epochs=epochs, eval_every=eval_every, eval_fraction=eval_fraction, save_every=save_every,
        resume=resume, seed=seed, device=device, workers=workers, allow_tokenizer_mismatch=allow_tokenizer_mismatch,
        max_prompt_len=max_prompt_len, max_len=max_len, chat_template=chat_template, skip_invalid=skip_invalid,
        fields={"instruction": instruction_field, "context": context_field, "response": response_field},
    )
    s = train(options, console=Console(stderr=True))
    evals = f"held-out loss {s.eval_loss_start:.4f} -> {s.eval_loss:.4f}; " if s.eval_loss_start is not None else (
        f"held-out loss {s.eval_loss:.4f}; " if s.eval_loss is not None else "")
    console.print(
        f"[green]trained[/] {s.steps} steps, {s.tokens:,} tokens at {s.tokens_per_second:,.0f} tok/s; {evals}"
        f"model in {s.final_dir}" + (f" (resumed from {s.resumed_from})" if s.resumed_from else ""),
        highlight=False,
    )


# ---------------------------------------------------------------- demo


@app.command("demo")
def demo(
    workdir: Optional[Path] = typer.Option(None, help="Where the stages write (default: moekd-demo, or moekd-demo-quick with --quick)."),
    quick: bool = typer.Option(False, "--quick", help="A few-minute miniature of the pipeline (a smoke test; its numbers mean little)."),
) -> None:
    """Run the whole pipeline on the built-in suite: teacher, SFT student, caches (topk, all, ka), KD students, eval.

    Finished stages are reused when it is run again. Example: moekd demo --quick
    """
    from moekd.demo import DEFAULT_PLAN, QUICK_PLAN, results_table, run_pipeline

    workdir = workdir or Path("moekd-demo-quick" if quick else "moekd-demo")
    results = run_pipeline(workdir, QUICK_PLAN if quick else DEFAULT_PLAN, console)
    Console().print(results_table(results["rows"]))
    console.print(f"results: {workdir / 'results.json'}, chart: {workdir / 'results.png'}", highlight=False)
