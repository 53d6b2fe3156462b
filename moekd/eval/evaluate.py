"""`moekd eval`: sample responses for each dataset and seed, score ROUGE-L, report mean and std over seeds.

Protocol of the published work (docs/methods.md §7): prompts built exactly as in training, one sampled
response per prompt per seed (temperature 1, top_k 0, top_p 1), ROUGE-L F-measure x100 with
stemming, max over a record's references, averaged over the dataset; then mean and std over
seeds. std is the population std (ddof=0, numpy's default), recorded in the report. `greedy` decodes
one argmax generation per prompt instead. Every generation is also scored by exact match (equal to a
reference up to case and whitespace).

Beside it, on request, the deterministic teacher-forced scores of likelihood.py on the first
reference of each record: response NLL and the exact KL from a reference teacher. `policy`
routes the evaluated model's MoE layers by a routing policy (routing/policies.py) for all
of it, e.g. a teacher with `--policy topk --experts 4`; stochastic policies draw per record from
derive_seed(routing_seed, data row, 0). `--policy sar` first loads the router file `router`
into the model's routers, checked against it, as `cache build --policy sar --router` does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moekd.data.prompts import format_prompt, prompt_ids, tokenize_records
from moekd.data.records import Record, detect_fields, read_rows, row_problem
from moekd.data.tokenizer import tokenizer_fingerprint
from moekd.errors import MoekdError
from moekd.eval.generate import SAMPLING, generate_responses, load_model
from moekd.eval.likelihood import response_scores
from moekd.eval.options import EvalOptions
from moekd.eval.rouge import rouge_l
from moekd.models import checkpoint_sha256, output_vocab_size
from moekd.paths import check_output_file
from moekd.routing.policies import check_router_flag, make_policy
from moekd.routing.router_file import load_router_file, read_router_file
from moekd.seeds import derive_seed


@dataclass
class EvalExample:
    record: Record
    references: list[str]
    row: int  # row number in the data file


@dataclass
class DatasetScores:
    data: str
    n: int
    per_seed: dict[int, float]  # seed -> mean ROUGE-L over the dataset (empty without ROUGE-L, or with --greedy)
    mean: float | None  # over seeds; with --greedy the greedy generations' ROUGE-L
    std: float | None  # None with --greedy
    exact_match: float | None = None  # share of generations equal to a reference (normalised); None without ROUGE-L
    nll: float | None = None  # teacher-forced response NLL, nats per response token
    kl_from_teacher: float | None = None  # KL(teacher || model), nats per response token
    response_positions: int | None = None  # positions the two above average over


@dataclass
class EvalReport:
    model: str
    settings: dict
    datasets: list[DatasetScores]
    generations: list[dict] = field(repr=False)  # one row per dataset, example and seed

    def summary(self) -> dict:
        """The report without the generations, as written to the --json file."""
        return {"model": self.model, "settings": self.settings, "datasets": [asdict(d) for d in self.datasets]}


def exact_match(response: str, references: list[str]) -> float:
    """1.0 when the response equals one of the references up to case and whitespace, else 0.0."""

    def normal(text: str) -> str:
        return " ".join(text.split()).casefold()

    return float(any(normal(response) == normal(r) for r in references))


def load_eval_examples(path: str | Path, limit: int | None = None) -> list[EvalExample]:
    """Records of a Dolly/Alpaca-form file whose response field is one reference or a list of them."""
    rows, _ = read_rows(path)
    rows = rows[:limit] if limit else rows
    if not rows:
        raise MoekdError(f"--data: {path} holds no rows")
    fields = detect_fields(rows)
    examples = []
    for n, row in enumerate(rows):
        problem = row_problem(row, fields, reference_lists=True)
        if problem is not None:
            raise MoekdError(f"--data: {path} row {n}: {problem[1]}")
        references = row[fields.response]
        references = [references] if isinstance(references, str) else references
        context = (row.get(fields.context) if fields.context else None) or ""
        examples.append(EvalExample(Record(row[fields.instruction], context, references[0]), references, n))
    return examples


def evaluate(o: EvalOptions, log: Callable[[str], None] | None = None) -> EvalReport:
    """ROUGE-L of `o.model`'s sampled responses on each dataset, per seed and as mean/std over seeds;
    with `nll` its teacher-forced response NLL, with `teacher` also the exact KL from that teacher;
    `policy` routes it (with `router`, the router file of `sar` written by `moekd sar train`)."""
    model_dir, data_paths, seeds, router, teacher = o.model, o.data, o.seeds if o.rouge else (), o.router, o.teacher
    max_new_tokens, max_prompt_len, max_len, batch_size = o.max_new_tokens, o.max_prompt_len, o.max_len, o.batch_size
    limit, device, chat_template, rouge, nll, routing_seed = (
        o.limit,
        o.device,
        o.chat_template,
        o.rouge,
        o.nll,
        o.routing_seed,
    )
    if o.json_out is not None:
        check_output_file(o.json_out, "--json")
    policy = _policy(o)
    check_router_flag(policy.name if policy is not None else None, router)
    for flag, value in (
        ("--max-new-tokens", max_new_tokens),
        ("--max-prompt-len", max_prompt_len),
        ("--batch-size", batch_size),
    ):
        if value < 1:
            raise MoekdError(f"{flag} must be at least 1, got {value}")
    if limit is not None and limit < 1:
        raise MoekdError(f"--limit must be at least 1, got {limit}")
    if rouge and not seeds:
        raise MoekdError("--seeds: give at least one seed")
    if o.greedy and not rouge:
        raise MoekdError("--greedy decodes the generations ROUGE-L scores; drop --no-rouge (or --greedy)")
    if not (rouge or nll or teacher):
        raise MoekdError("--no-rouge leaves nothing to compute: add --nll or --teacher PATH")
    if not data_paths:
        raise MoekdError("--data: give at least one data file")
    datasets = {str(path): load_eval_examples(path, limit) for path in data_paths}  # read all before the slow part
    if router is not None:
        read_router_file(router)  # a missing or damaged file is refused before the model loads
    model, tokenizer = load_model(model_dir, device)
    loaded_router = load_router_file(model, router, str(model_dir), checkpoint_sha256(model_dir)) if router else None
    rows = output_vocab_size(model)
    routing = _routing(model, policy)
    reference = _reference_teacher(teacher, device, model, tokenizer) if teacher else None
    prompted = {}
    for name, examples in datasets.items():  # every prompt is checked before the first generation
        prompts = [format_prompt(ex.record, tokenizer, chat_template) for ex in examples]
        ids = [prompt_ids(tokenizer, prompt, chat_template) for prompt in prompts]
        for ex, prompt in zip(examples, ids):
            if len(prompt) > max_prompt_len:
                raise MoekdError(
                    f"--data {name} row {ex.row}: the prompt is {len(prompt)} tokens, over --max-prompt-len "
                    f"{max_prompt_len}; raise --max-prompt-len"
                )
            if max(prompt) >= rows:
                raise MoekdError(
                    f"--model {model_dir}: its output layer has {rows} entries but the prompt of --data {name} row "
                    f"{ex.row} holds token id {max(prompt)}: the tokenizer saved with it is not the model's"
                )
        prompted[name] = prompts, ids

    scores, generations = [], []
    passes = () if not rouge else (None,) if o.greedy else seeds  # None: the one greedy pass
    for name, examples in datasets.items():
        prompts, ids = prompted[name]
        row_seeds = [derive_seed(routing_seed, ex.row, 0) for ex in examples] if routing and policy.stochastic else None
        per_seed, matches = {}, []
        for seed in passes:
            with progress_bar(f"{name}" + (" greedy" if seed is None else f" seed {seed}"), len(ids)) as advance:
                responses = generate_responses(
                    model,
                    tokenizer,
                    ids,
                    seed or 0,
                    max_new_tokens,
                    batch_size,
                    greedy=o.greedy,
                    routing=routing,
                    row_seeds=row_seeds,
                    on_batch=advance,
                )
            rouge_scores = [rouge_l(response, ex.references) for response, ex in zip(responses, examples)]
            match = [exact_match(response, ex.references) for response, ex in zip(responses, examples)]
            per_seed[seed], matches = float(np.mean(rouge_scores)), matches + match
            for ex, prompt, response, score, m in zip(examples, prompts, responses, rouge_scores, match):
                reference_text = ex.references[0] if len(ex.references) == 1 else ex.references
                generations.append(
                    {
                        "dataset": name,
                        "index": ex.row,
                        "seed": seed,
                        "prompt": prompt,
                        "reference": reference_text,
                        "generation": response,
                        "rougeL": score,
                        "exact_match": m,
                    }
                )
            if log:
                what = "greedy" if seed is None else f"seed {seed}"
                log(
                    f"{name} {what}: ROUGE-L {per_seed[seed]:.2f}, exact match {np.mean(match):.3f} "
                    f"over {len(examples)} prompts"
                )
        values = list(per_seed.values())
        dataset = DatasetScores(
            name,
            len(examples),
            {} if o.greedy else per_seed,
            float(np.mean(values)) if values else None,
            float(np.std(values)) if values and not o.greedy else None,
            float(np.mean(matches)) if matches else None,
        )
        if nll or teacher:
            tokenized = tokenize_records(
                [ex.record for ex in examples],
                [ex.row for ex in examples],
                tokenizer,
                max_prompt_len,
                max_len,
                chat_template,
            ).examples
            forced = response_scores(
                model, tokenized, tokenizer.pad_token_id, batch_size, reference, routing, row_seeds
            )
            dataset.nll, dataset.kl_from_teacher = forced["nll"], forced["kl_from_teacher"]
            dataset.response_positions = forced["positions"]
            if log:
                kl = f", KL from the teacher {dataset.kl_from_teacher:.4f}" if teacher else ""
                log(f"{name}: response NLL {dataset.nll:.4f} nats/token{kl} over {forced['positions']} positions")
        scores.append(dataset)

    return EvalReport(str(model_dir), _settings(o, policy, loaded_router), scores, generations)


def _settings(o: EvalOptions, policy, loaded_router) -> dict:
    """What a report records of how it was made."""
    return {
        **({"do_sample": False} if o.greedy else SAMPLING),
        "greedy": o.greedy,
        "max_new_tokens": o.max_new_tokens,
        "max_prompt_len": o.max_prompt_len,
        "batch_size": o.batch_size,
        "seeds": list(o.seeds) if o.rouge and not o.greedy else [],
        "limit": o.limit,
        "device": o.device,
        "chat_template": o.chat_template,
        "metric": "rougeL_fmeasure_x100_stemmed_max_over_references" if o.rouge else None,
        "std_ddof": 0,
        "teacher_forced": "response NLL and KL(teacher || model) in nats per response token, first reference"
        if o.nll or o.teacher
        else None,
        "max_len": o.max_len,
        "teacher": str(o.teacher) if o.teacher else None,
        "policy": None
        if policy is None
        else {"name": policy.name, "params": policy.describe(), "seed": o.routing_seed},
        "router": None if loaded_router is None else {"path": loaded_router.path, "sha256": loaded_router.sha256},
    }


@contextmanager
def progress_bar(label: str, total: int):
    """A transient bar on stderr over `total` prompts; yields the function that advances it."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def _policy(o: EvalOptions):
    """The routing policy of --policy and its parameters (None: the model's own routing)."""
    params = {key: value for key, value in o.policy_params.items() if value is not None}
    if o.policy is None and params:
        raise MoekdError(
            "--experts, --ka-lambda, --ka-drop and --top-p need --policy; add it (e.g. --policy topk --experts 4)"
        )
    return make_policy(o.policy, **params) if o.policy is not None else None


def _routing(model, policy):
    """A RouterController routing `model` by `policy`, or None for native routing."""
    if policy is None:
        return None
    from moekd.routing.controller import RouterController

    controller = RouterController(model, policy)
    return controller if controller.rewrites else None


def _reference_teacher(teacher: str | Path, device: str, model, tokenizer):
    """The --teacher model, checked to share the evaluated model's tokens and output vocabulary."""
    reference, reference_tokenizer = load_model(teacher, device)
    if tokenizer_fingerprint(reference_tokenizer)["vocab_sha256"] != tokenizer_fingerprint(tokenizer)["vocab_sha256"]:
        raise MoekdError(f"--teacher: {teacher} has another tokenizer than --model; the KL needs the same token ids")
    if output_vocab_size(reference) != output_vocab_size(model):
        raise MoekdError(
            f"--teacher: {teacher} has {output_vocab_size(reference)} output tokens, --model "
            f"{output_vocab_size(model)}; the KL needs the same vocabulary"
        )
    return reference


def generations_path(json_path: str | Path) -> Path:
    """`out.json` -> `out.generations.jsonl`, beside it."""
    json_path = Path(json_path)
    return json_path.with_name(f"{json_path.stem}.generations.jsonl")


def write_report(report: EvalReport, json_path: str | Path) -> tuple[Path, Path]:
    """Write the scores to `json_path` and every generation to `<stem>.generations.jsonl` beside it."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report.summary(), indent=2) + "\n", encoding="utf-8")
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in report.generations)
    gen_path = generations_path(json_path)
    gen_path.write_text(lines, encoding="utf-8")
    return json_path, gen_path
