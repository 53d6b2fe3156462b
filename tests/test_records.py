import json

import pytest

from moekd.data.prompts import tokenize_records
from moekd.data.records import ALPACA, DOLLY, load_records
from moekd.errors import MoekdError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_formats_agree_and_fields_are_detected(tmp_path, data_file):
    import datasets

    rows = [json.loads(line) for line in data_file.read_text().splitlines()][:10]
    jsonl = load_records(_jsonl(tmp_path / "d.jsonl", rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    as_json = load_records(tmp_path / "d.json")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    parquet = load_records(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    saved = load_records(tmp_path / "saved")
    assert jsonl.fields == DOLLY
    assert jsonl.fingerprint() == as_json.fingerprint() == parquet.fingerprint() == saved.fingerprint()
    assert [jsonl.format, as_json.format, parquet.format, saved.format] == ["jsonl", "json", "parquet", "datasets"]
    alpaca = [{"instruction": r["instruction"], "input": r["context"], "output": r["response"]} for r in rows]
    loaded = load_records(_jsonl(tmp_path / "a.jsonl", alpaca))
    assert loaded.fields == ALPACA and loaded.fingerprint() == jsonl.fingerprint()


def test_field_override(tmp_path):
    rows = [{"q": "Say hi.", "a": "hi"}]
    loaded = load_records(_jsonl(tmp_path / "d.jsonl", rows), {"instruction": "q", "response": "a", "context": ""})
    assert loaded.records[0].instruction == "Say hi." and loaded.records[0].context == ""


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"instruction": "x"}], "row 0: field 'response' is missing"),
        ([{"instruction": "x", "response": "  "}], "row 0: field 'response' is empty"),
        ([{"instruction": "x", "response": 3}], "row 0: field 'response' must be a string"),
        ([{"instruction": "x", "response": "y", "context": ["a"]}], "field 'context' must be a string"),
        ([{"instruction": "ok", "response": "ok"}, 5], "row 1: expected a JSON object"),
    ],
)
def test_bad_rows_are_named(tmp_path, rows, message):
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(MoekdError, match=message):
        load_records(path)


def test_skip_invalid_counts_rows(tmp_path):
    rows = [{"instruction": "a", "response": "b"}, {"instruction": "a"}, {"instruction": "c", "response": ""}]
    loaded = load_records(_jsonl(tmp_path / "d.jsonl", rows), skip_invalid=True)
    assert len(loaded.records) == 1 and loaded.source_index == [0]
    assert loaded.skipped == {"missing_response": 1, "empty_response": 1}


def test_unreadable_files(tmp_path):
    with pytest.raises(MoekdError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(MoekdError, match="holds no rows"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "response": "b"}\n{oops\n')
    with pytest.raises(MoekdError, match="line 2 is not valid JSON"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(MoekdError, match="unknown extension"):
        load_records(tmp_path / "x.csv")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(MoekdError, match="not a readable Parquet"):
        load_records(tmp_path / "bad.parquet")


def test_tokenize_alignment_and_limits(tmp_path, tokenizer):
    rows = [{"instruction": "Add two and two.", "response": "four " * 40}]
    loaded = load_records(_jsonl(tmp_path / "d.jsonl", rows))
    report = tokenize_records(loaded.records, loaded.source_index, tokenizer, max_prompt_len=64, max_len=70)
    ex = report.examples[0]
    assert report.truncated_responses == 1 and len(ex.input_ids) == 70
    positions = ex.target_positions
    assert positions[0] == ex.prompt_len - 1 and positions[-1] == len(ex.input_ids) - 2
    full = tokenize_records(loaded.records, loaded.source_index, tokenizer, 64, 512).examples[0]
    assert full.input_ids[-1] == tokenizer.eos_token_id
    with pytest.raises(MoekdError, match="over --max-prompt-len 4"):
        tokenize_records(loaded.records, loaded.source_index, tokenizer, max_prompt_len=4, max_len=70)
    with pytest.raises(MoekdError, match="no row fits"):
        tokenize_records(loaded.records, loaded.source_index, tokenizer, 4, 70, skip_invalid=True)
