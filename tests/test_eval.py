"""Evaluation: ROUGE-L by hand, the sampling protocol, left padding, EOS cut, reports and bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moekd.cli import app
from moekd.data.prompts import format_prompt, prompt_ids
from moekd.data.synth import write_suite
from moekd.errors import MoekdError
from moekd.eval import evaluate as evaluate_module
from moekd.eval.evaluate import evaluate, generations_path, load_eval_examples, write_report
from moekd.eval.generate import generate_responses, load_model
from moekd.eval.options import EvalOptions, parse_seeds
from moekd.eval.rouge import rouge_l

# ---------------------------------------------------------------- ROUGE-L


def test_rouge_l_hand_computed():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides: P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(500 / 6)
    # LCS 2: P = 2/4, R = 2/2, F = 2PR / (P + R) = 2/3
    assert rouge_l("red green blue yellow", "red blue") == pytest.approx(200 / 3)
    # Stemming: dogs -> dog, running / runs -> run; LCS "the dog run" = 3, P = 3/4, R = 3/3, F = 6/7
    assert rouge_l("The dogs are running", "the dog runs") == pytest.approx(600 / 7)
    assert rouge_l("running", "run") == pytest.approx(100)
    assert rouge_l("", "run") == 0.0
    assert rouge_l("Paris.", "paris") == pytest.approx(100)  # case and punctuation are ignored


def test_rouge_l_takes_the_best_reference():
    assert rouge_l("red blue", ["green", "red blue"]) == pytest.approx(100)
    refs = ["the cat is on the mat", "red blue"]
    assert rouge_l("red green blue yellow", refs) == max(rouge_l("red green blue yellow", r) for r in refs)


# ---------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def teacher(make_teacher):
    return load_model(make_teacher("mixtral"))


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_suite(out, seed=0, n_train=16, n_valid=16, n_test=16)
    return out


def _prompts(tokenizer, path, n):
    return [prompt_ids(tokenizer, format_prompt(ex.record), False) for ex in load_eval_examples(path, limit=n)]


def test_sampling_is_plain_softmax_sampling_whatever_the_checkpoint_says(make_teacher, tmp_path, synth_dir):
    """The checkpoint's decoding defaults (top_k, top_p, temperature, ...) must not reach generate()."""
    model_dir = tmp_path / "teacher"
    shutil.copytree(make_teacher("mixtral"), model_dir)
    config = json.loads((model_dir / "generation_config.json").read_text())
    config.update(do_sample=True, top_k=3, top_p=0.3, temperature=0.2, min_p=0.5, repetition_penalty=2.0)
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    model, tokenizer = load_model(model_dir)

    calls = []
    plain_generate = model.generate

    def generate_with_scores(**kwargs):
        out = plain_generate(**kwargs, output_scores=True, output_logits=True, return_dict_in_generate=True)
        calls.append(out)
        return out.sequences

    model.generate = generate_with_scores
    generate_responses(model, tokenizer, _prompts(tokenizer, synth_dir / "test.jsonl", 3), seed=10, max_new_tokens=6)
    assert calls
    for out in calls:  # processed scores equal the raw logits: no warper touched them
        for scores, logits in zip(out.scores, out.logits, strict=True):
            assert torch.equal(scores, logits)
    assert model.generation_config.top_k == 3  # restored afterwards


def test_same_seed_same_generations(teacher, synth_dir):
    model, tokenizer = teacher
    prompts = _prompts(tokenizer, synth_dir / "test.jsonl", 5)
    first = generate_responses(model, tokenizer, prompts, seed=10, max_new_tokens=8, batch_size=2)
    assert generate_responses(model, tokenizer, prompts, seed=10, max_new_tokens=8, batch_size=2) == first
    assert generate_responses(model, tokenizer, prompts, seed=20, max_new_tokens=8, batch_size=2) != first


def test_left_padding_matches_generating_alone(teacher, synth_dir):
    model, tokenizer = teacher
    prompts = _prompts(tokenizer, synth_dir / "test.jsonl", 5)
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    batched = generate_responses(model, tokenizer, prompts, seed=0, max_new_tokens=8, batch_size=5, greedy=True)
    alone = [generate_responses(model, tokenizer, [p], seed=0, max_new_tokens=8, greedy=True)[0] for p in prompts]
    assert batched == alone


class ScriptedModel(torch.nn.Module):
    """Answers every prompt with the same token ids, to check how responses are cut."""

    def __init__(self, continuation):
        from transformers import GenerationConfig

        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = GenerationConfig()
        self.continuation = continuation

    def generate(self, input_ids, attention_mask, generation_config):
        tail = torch.tensor([self.continuation] * len(input_ids))
        return torch.cat([input_ids, tail], dim=1)


def test_responses_are_cut_at_eos(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    answer, junk = tokenizer.encode("red kite"), tokenizer.encode("Ada")
    model = ScriptedModel(answer + [eos] + junk + [pad])
    prompts = [tokenizer.encode("Sort the numbers."), tokenizer.encode("Hi")]
    assert generate_responses(model, tokenizer, prompts, seed=0) == ["red kite", "red kite"]
    # an extra EOS id from the checkpoint's generation config (e.g. end of turn) also ends a response
    model.generation_config.eos_token_id = junk[0]
    model.continuation = answer + junk + [eos]
    assert generate_responses(model, tokenizer, prompts, seed=0) == ["red kite"] * 2


# ---------------------------------------------------------------- evaluate, reports, errors


def test_copying_the_reference_scores_100(make_teacher, synth_dir, monkeypatch, tokenizer):
    examples = load_eval_examples(synth_dir / "test.jsonl")
    reference_of = {
        tuple(prompt_ids(tokenizer, format_prompt(ex.record), False)): ex.record.response for ex in examples
    }

    def copy_reference(model, tokenizer, prompts, seed, *args, **kwargs):
        return [reference_of[tuple(p)] for p in prompts]

    monkeypatch.setattr(evaluate_module, "generate_responses", copy_reference)
    report = evaluate(EvalOptions(str(make_teacher("mixtral")), [str(synth_dir / "test.jsonl")], seeds=(10, 20)))
    (scores,) = report.datasets
    assert scores.per_seed == {10: pytest.approx(100), 20: pytest.approx(100)}
    assert scores.mean == pytest.approx(100) and scores.std == 0


def test_evaluate_writes_report_and_generations(make_teacher, synth_dir, tmp_path):
    data = [synth_dir / "test.jsonl", synth_dir / "valid.jsonl"]
    options = EvalOptions(
        str(make_teacher("mixtral")), [str(p) for p in data], (10, 20), max_new_tokens=6, batch_size=3, limit=4
    )
    report = evaluate(options)
    json_path, gen_path = write_report(report, tmp_path / "scores.json")
    assert gen_path == generations_path(json_path) == tmp_path / "scores.generations.jsonl"

    summary = json.loads(json_path.read_text())
    assert summary["settings"]["top_k"] == 0 and summary["settings"]["std_ddof"] == 0
    assert [d["data"] for d in summary["datasets"]] == [str(p) for p in data]
    rows = [json.loads(line) for line in gen_path.read_text().splitlines()]
    assert len(rows) == 2 * 2 * 4
    assert set(rows[0]) == {"dataset", "index", "seed", "prompt", "reference", "generation", "rougeL", "exact_match"}
    for row in rows:
        assert row["prompt"].endswith("### Response:\n")
        assert row["rougeL"] == pytest.approx(rouge_l(row["generation"], row["reference"]))
    for scores in report.datasets:
        per_seed = [
            np.mean([r["rougeL"] for r in rows if r["dataset"] == scores.data and r["seed"] == s]) for s in (10, 20)
        ]
        assert list(scores.per_seed.values()) == pytest.approx(per_seed)
        assert scores.mean == pytest.approx(np.mean(per_seed)) and scores.std == pytest.approx(np.std(per_seed))

    again = evaluate(options)
    assert again.generations == report.generations


def test_greedy_generates_once_per_prompt_by_argmax(make_teacher, synth_dir, tokenizer, teacher):
    data = synth_dir / "test.jsonl"
    options = EvalOptions(str(make_teacher("mixtral")), [str(data)], greedy=True, max_new_tokens=6, batch_size=3)
    report = evaluate(EvalOptions(**{**vars(options), "limit": 5}))
    model, _ = teacher
    expected = generate_responses(model, tokenizer, _prompts(tokenizer, data, 5), 0, 6, 3, greedy=True)
    assert [r["generation"] for r in report.generations] == expected
    assert [r["seed"] for r in report.generations] == [None] * 5
    (scores,) = report.datasets
    assert scores.per_seed == {} and scores.std is None
    assert scores.mean == pytest.approx(np.mean([r["rougeL"] for r in report.generations]))
    assert report.settings["do_sample"] is False and report.settings["seeds"] == []


def test_exact_match_ignores_case_and_whitespace(make_teacher, synth_dir, monkeypatch, tokenizer):
    examples = load_eval_examples(synth_dir / "test.jsonl", limit=4)
    reference_of = {
        tuple(prompt_ids(tokenizer, format_prompt(ex.record), False)): ex.record.response for ex in examples
    }

    def shout_reference_or_not(model, tokenizer, prompts, seed, *args, greedy=False, **kwargs):
        assert greedy
        answers = [reference_of[tuple(p)] for p in prompts]
        return [f"  {a.upper()}\n" if i % 2 else a + " extra" for i, a in enumerate(answers)]

    monkeypatch.setattr(evaluate_module, "generate_responses", shout_reference_or_not)
    options = EvalOptions(str(make_teacher("mixtral")), [str(synth_dir / "test.jsonl")], greedy=True, limit=4)
    report = evaluate(options)
    assert [r["exact_match"] for r in report.generations] == [0.0, 1.0, 0.0, 1.0]
    assert report.datasets[0].exact_match == 0.5
    assert evaluate_module.exact_match("a  B", ["x", "A b"]) == 1.0 and evaluate_module.exact_match("a", ["b"]) == 0


def test_several_references_per_record(tmp_path):
    path = tmp_path / "multi.jsonl"
    rows = [
        {"instruction": "Name a colour.", "input": "", "output": ["red", "blue"]},
        {"instruction": "Name a fruit.", "input": "", "output": "plum"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_eval_examples(path)
    assert [ex.references for ex in examples] == [["red", "blue"], ["plum"]]
    path.write_text(json.dumps({"instruction": "x", "output": []}) + "\n")
    with pytest.raises(MoekdError, match="'output'"):
        load_eval_examples(path)


def test_bad_input_names_the_flag(make_teacher, synth_dir, tmp_path):
    assert parse_seeds("10, 20,30") == (10, 20, 30)
    for text in ("", "10,x", "10;20", "10,,20", "10,10", "-1"):
        with pytest.raises(MoekdError, match="--seeds"):
            parse_seeds(text)
    with pytest.raises(MoekdError, match="--model"):
        load_model(tmp_path / "missing")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(make_teacher("mixtral") / name, no_tokenizer / name)
    with pytest.raises(MoekdError, match="--model.*tokenizer"):
        load_model(no_tokenizer)
    with pytest.raises(MoekdError, match="--max-prompt-len"):
        evaluate(EvalOptions(str(make_teacher("mixtral")), [str(synth_dir / "test.jsonl")], (10,), max_prompt_len=8))


def test_cli_eval(make_teacher, synth_dir, tmp_path):
    out = tmp_path / "eval.json"
    args = [
        "eval",
        "--model",
        str(make_teacher("mixtral")),
        "--data",
        str(synth_dir / "test.jsonl"),
        "--data",
        str(synth_dir / "valid.jsonl"),
        "--seeds",
        "10,20",
        "--max-new-tokens",
        "4",
        "--limit",
        "3",
        "--json",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ROUGE-L" in result.output and "mean" in result.output
    assert len(json.loads(out.read_text())["datasets"]) == 2
    assert generations_path(out).exists()

    bad = CliRunner().invoke(app, args[:5] + ["--seeds", "ten"])
    assert isinstance(bad.exception, MoekdError) and "--seeds" in str(bad.exception)

    greedy = CliRunner().invoke(app, [*args[:5], "--greedy", "--max-new-tokens", "4", "--limit", "3"])
    assert greedy.exit_code == 0, greedy.output
    assert "exact match" in greedy.output and "greedy" in greedy.output
