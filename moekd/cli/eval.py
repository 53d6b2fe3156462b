"""`moekd eval`: sample responses and score ROUGE-L; teacher-forced NLL and KL on request."""

from __future__ import annotations

from rich.console import Console

from moekd.cli.app import app, console
from moekd.eval.options import EvalOptions
from moekd.options import command


@command(app, "eval", EvalOptions)
def eval_command(options: EvalOptions) -> None:
    """Sample responses (temperature 1, top_k 0, top_p 1) and score ROUGE-L: mean and std over seeds.

    Example: moekd eval --model runs/student --data data/synth/test.jsonl --seeds 10,20 --max-new-tokens 64 --json eval.json
    Teacher-forced only: moekd eval --model runs/student --data test.jsonl --no-rouge --teacher runs/teacher/final

    Greedy decoding, with exact match: moekd eval --model runs/student --data test.jsonl --greedy

    The teacher under a SAR router: moekd eval --model ./teacher --data test.jsonl --policy sar --router router.safetensors
    """
    from rich.table import Table

    from moekd.eval.evaluate import evaluate, write_report

    report = evaluate(options, log=lambda line: console.print(line, highlight=False))
    model, rouge, nll, teacher, json_out = options.model, options.rouge, options.nll, options.teacher, options.json_out
    greedy = options.greedy
    seed_list = list(options.seeds) if rouge and not greedy else []
    title = (
        f"{model}: ROUGE-L (x100) and exact match of greedy generations"
        if greedy
        else f"{model}: ROUGE-L (x100, mean ± std over {len(seed_list)} seeds)"
        if rouge
        else f"{model}: teacher-forced scores"
    )
    table = Table(title=title)
    columns = ["dataset", "n"]
    if rouge:
        columns += ["ROUGE-L", "exact match"] if greedy else ["mean", "std", *(f"seed {s}" for s in seed_list)]
    columns += ["NLL"] if nll or teacher else []
    columns += ["KL from teacher"] if teacher else []
    for column in columns:
        table.add_column(column, justify="left" if column == "dataset" else "right", overflow="fold")
    for scores in report.datasets:
        cells = [scores.data, str(scores.n)]
        if greedy:
            cells += [f"{scores.mean:.2f}", f"{scores.exact_match:.3f}"]
        elif rouge:
            cells += [f"{scores.mean:.2f}", f"{scores.std:.2f}", *(f"{scores.per_seed[s]:.2f}" for s in seed_list)]
        cells += [f"{scores.nll:.4f}"] if nll or teacher else []
        cells += [f"{scores.kl_from_teacher:.4f}"] if teacher else []
        table.add_row(*cells)
    Console().print(table)
    if json_out is not None:
        json_path, gen_path = write_report(report, json_out)
        console.print(f"[green]wrote[/] {json_path} and {gen_path}", highlight=False)
