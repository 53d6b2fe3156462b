"""`moekd eval`: sample responses and score ROUGE-L; teacher-forced NLL and KL on request."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from moekd.cli.app import app, console


@app.command("eval")
def eval_command(
    model: Path = typer.Option(
        ..., help="Model checkpoint directory (saved with save_pretrained, tokenizer included)."
    ),
    data: list[Path] = typer.Option(..., help="Test data in Dolly or Alpaca form; repeat --data for several datasets."),
    seeds: str = typer.Option(
        "10,20,30,40,50", help="Comma-separated sampling seeds; one generation per prompt per seed."
    ),
    max_new_tokens: int = typer.Option(256, help="Longest response in tokens."),
    max_prompt_len: int = typer.Option(256, help="Longest prompt in tokens; a longer prompt is an error."),
    max_len: int = typer.Option(
        512,
        help="--nll/--teacher: longest prompt+reference in tokens (longer references are truncated, as in training).",
    ),
    batch_size: int = typer.Option(
        16, help="Prompts per generate() call (left padded); part of what makes a run reproducible."
    ),
    json_out: Path | None = typer.Option(
        None, "--json", help="Write scores here and generations to <stem>.generations.jsonl beside it."
    ),
    limit: int | None = typer.Option(None, help="Use only the first N rows of each dataset."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    chat_template: bool = typer.Option(
        False,
        "--chat-template",
        help="Build prompts with the tokenizer's chat template (as a cache built with --chat-template).",
    ),
    rouge: bool = typer.Option(
        True, "--rouge/--no-rouge", help="Sample and score ROUGE-L (--no-rouge: only the teacher-forced scores)."
    ),
    nll: bool = typer.Option(
        False,
        "--nll",
        help="Also the teacher-forced NLL of the reference responses (nats per response token, deterministic).",
    ),
    teacher: Path | None = typer.Option(
        None,
        help="Also the exact KL(teacher || model) on the reference responses, the teacher routed natively (implies --nll).",
    ),
    policy: str | None = typer.Option(
        None,
        help="Route the evaluated MoE model by a policy (topk, all, ka, topp, mc, sar) for generation and scoring; sar: all experts under the routers of --router.",
    ),
    router: Path | None = typer.Option(
        None,
        help="--policy sar: the router file of `moekd sar train --out` for this --model (checked against it), loaded into its routers.",
    ),
    experts: int | None = typer.Option(None, help="--policy topk: activate the K experts with the largest gates."),
    ka_lambda: float | None = typer.Option(
        None, help="--policy ka: probability of sampling the kept experts (default 0.05)."
    ),
    ka_drop: int | None = typer.Option(None, help="--policy ka: experts left out per token and layer (default 1)."),
    top_p: float | None = typer.Option(
        None, help="--policy topp: gate mass the selected experts must reach (default 0.9)."
    ),
    routing_seed: int = typer.Option(
        0, help="Base seed of a stochastic --policy (one draw per data row, derived as in cache build)."
    ),
) -> None:
    """Sample responses (temperature 1, top_k 0, top_p 1) and score ROUGE-L: mean and std over seeds.

    Example: moekd eval --model runs/student --data data/synth/test.jsonl --seeds 10,20 --max-new-tokens 64 --json eval.json
    Teacher-forced only: moekd eval --model runs/student --data test.jsonl --no-rouge --teacher runs/teacher/final

    The teacher under a SAR router: moekd eval --model ./teacher --data test.jsonl --policy sar --router router.safetensors
    """
    from rich.table import Table

    from moekd.eval.evaluate import evaluate, parse_seeds, write_report
    from moekd.paths import check_output_file

    if json_out is not None:
        check_output_file(json_out, "--json")
    seed_list = parse_seeds(seeds) if rouge else []
    chosen = None
    if policy is not None:
        from moekd.routing.policies import make_policy

        chosen = make_policy(policy, ka_lambda=ka_lambda, ka_drop=ka_drop, top_p=top_p, experts=experts)
    elif any(v is not None for v in (experts, ka_lambda, ka_drop, top_p)):
        from moekd.errors import MoekdError

        raise MoekdError(
            "--experts, --ka-lambda, --ka-drop and --top-p need --policy; add it (e.g. --policy topk --experts 4)"
        )
    report = evaluate(
        model,
        data,
        seed_list,
        max_new_tokens=max_new_tokens,
        max_prompt_len=max_prompt_len,
        batch_size=batch_size,
        limit=limit,
        device=device,
        chat_template=chat_template,
        log=lambda line: console.print(line, highlight=False),
        rouge=rouge,
        nll=nll,
        teacher=teacher,
        policy=chosen,
        routing_seed=routing_seed,
        max_len=max_len,
        router=router,
    )
    title = (
        f"{model}: ROUGE-L (x100, mean ± std over {len(seed_list)} seeds)"
        if rouge
        else f"{model}: teacher-forced scores"
    )
    table = Table(title=title)
    columns = ["dataset", "n"] + (["mean", "std", *(f"seed {s}" for s in seed_list)] if rouge else [])
    columns += ["NLL"] if nll or teacher else []
    columns += ["KL from teacher"] if teacher else []
    for column in columns:
        table.add_column(column, justify="left" if column == "dataset" else "right", overflow="fold")
    for scores in report.datasets:
        cells = [scores.data, str(scores.n)]
        if rouge:
            cells += [f"{scores.mean:.2f}", f"{scores.std:.2f}", *(f"{scores.per_seed[s]:.2f}" for s in seed_list)]
        cells += [f"{scores.nll:.4f}"] if nll or teacher else []
        cells += [f"{scores.kl_from_teacher:.4f}"] if teacher else []
        table.add_row(*cells)
    Console().print(table)
    if json_out is not None:
        json_path, gen_path = write_report(report, json_out)
        console.print(f"[green]wrote[/] {json_path} and {gen_path}", highlight=False)
