"""The built-in instruction suite: deterministic, disjoint splits, balanced families, short and correct records."""

import json
import re

import pytest
from typer.testing import CliRunner

from moekd.cli import app
from moekd.data.prompts import DOLLY_TEMPLATE_WITH_CONTEXT, format_prompt
from moekd.data.records import Record, load_records
from moekd.data.synth import FAMILIES, generate_suite, write_suite
from moekd.errors import MoekdError

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def suite():
    return generate_suite(seed=0, n_train=800, n_valid=80, n_test=160)


def test_same_seed_writes_byte_identical_files(tmp_path):
    write_suite(tmp_path / "a", seed=3, n_train=64, n_valid=16, n_test=32)
    write_suite(tmp_path / "b", seed=3, n_train=64, n_valid=16, n_test=32)
    write_suite(tmp_path / "c", seed=4, n_train=64, n_valid=16, n_test=32)
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "synth_info.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_splits_are_disjoint_and_families_balanced(suite):
    keys = {split: {(r["instruction"], r["context"]) for r in suite[split]} for split in SPLITS}
    assert [len(keys[s]) for s in SPLITS] == [800, 80, 160]  # no duplicates within a split either
    assert not keys["train"] & keys["valid"] and not keys["train"] & keys["test"] and not keys["valid"] & keys["test"]
    assert len(FAMILIES) >= 12
    for split in SPLITS:
        counts = [sum(r["family"] == family for r in suite[split]) for family in FAMILIES]
        assert min(counts) >= 1 and max(counts) - min(counts) <= 1


def test_test_split_does_not_depend_on_train_size():
    assert (
        generate_suite(0, n_train=10, n_valid=5, n_test=40)["test"]
        == generate_suite(0, n_train=300, n_valid=5, n_test=40)["test"]
    )


def test_records_are_short(suite):
    from moekd.data.tokenizer import train_tokenizer

    texts = [" ".join((r["instruction"], r["context"], r["response"])) for r in suite["train"]]
    tok = train_tokenizer(texts + [DOLLY_TEMPLATE_WITH_CONTEXT] * 20, vocab_size=1000)
    for r in suite["train"] + suite["test"]:
        assert len(r["response"].split()) <= 30, r
        prompt = format_prompt(Record(r["instruction"], r["context"], r["response"]))
        assert len(tok(prompt + r["response"])["input_ids"]) <= 120, r


def _numbers(text):
    return [int(n) for n in re.findall(r"\d+", text)]


def test_answers_are_right(suite):
    for r in suite["train"]:
        if r["family"] == "sort_numbers":
            descending = "descending" in r["instruction"] or "largest to smallest" in r["instruction"]
            assert _numbers(r["response"]) == sorted(_numbers(r["context"]), reverse=descending)
        elif r["family"] == "list_extreme" and "largest" in r["instruction"] and "smallest" not in r["instruction"]:
            assert _numbers(r["response"]) == [max(_numbers(r["context"]))]
        elif r["family"] == "arithmetic" and "plus" in r["instruction"]:
            a, b = _numbers(r["instruction"])
            assert _numbers(r["response"]) == [a, b, a + b]
        elif r["family"] == "spell_backwards" and r["instruction"].endswith("' backwards."):
            assert r["instruction"].split("'")[1][::-1] == r["response"]


def test_files_load_and_info_counts(tmp_path):
    info = write_suite(tmp_path, seed=0, n_train=48, n_valid=16, n_test=32)
    for split, n in (("train", 48), ("valid", 16), ("test", 32)):
        loaded = load_records(tmp_path / f"{split}.jsonl")
        assert len(loaded.records) == n and loaded.fields.context == "context"
        assert sum(info["counts_per_family"][split].values()) == n
    saved = json.loads((tmp_path / "synth_info.json").read_text())
    assert saved == info and saved["seed"] == 0 and saved["generator_version"] >= 1


def test_too_many_records_or_negative_counts_are_errors():
    with pytest.raises(MoekdError, match="--n-train"):
        generate_suite(0, n_train=len(FAMILIES) * 600, n_valid=0, n_test=0)
    with pytest.raises(MoekdError, match="--n-valid"):
        generate_suite(0, n_train=10, n_valid=-1, n_test=0)


def test_cli_synth(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "data",
            "synth",
            "--out",
            str(tmp_path),
            "--seed",
            "1",
            "--n-train",
            "32",
            "--n-valid",
            "16",
            "--n-test",
            "16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "arithmetic" in result.output
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 32
    assert json.loads((tmp_path / "synth_info.json").read_text())["counts"] == {"train": 32, "valid": 16, "test": 16}
