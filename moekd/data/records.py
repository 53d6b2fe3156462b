"""Load instruction records from JSONL, JSON, Parquet or a `datasets` directory.

Rows in Dolly form (instruction, context, response) or Alpaca form (instruction, input, output)
are recognised; `FieldMap` overrides the names. Every row is validated, and a bad row is
reported by number and field instead of being skipped silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from moekd.errors import MoekdError


@dataclass(frozen=True)
class FieldMap:
    instruction: str
    context: str | None
    response: str


DOLLY = FieldMap("instruction", "context", "response")
ALPACA = FieldMap("instruction", "input", "output")


@dataclass(frozen=True)
class Record:
    instruction: str
    context: str
    response: str


@dataclass
class LoadedRecords:
    records: list[Record]
    source_index: list[int]  # row number in the file of each kept record
    fields: FieldMap
    format: str
    skipped: dict[str, int]  # reason -> rows left out (only with skip_invalid)

    def first(self, n: int | None) -> LoadedRecords:
        """The first `n` records (all when None): --max-examples of a smoke run."""
        return self if n is None else replace(self, records=self.records[:n], source_index=self.source_index[:n])

    def fingerprint(self) -> str:
        """sha256 of the records' content, independent of the file format they came in."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(json.dumps([r.instruction, r.context, r.response], ensure_ascii=False).encode())
            h.update(b"\n")
        return h.hexdigest()


def read_rows(path: str | Path) -> tuple[list[dict], str]:
    """Rows of a JSONL, JSON or Parquet file or of a `save_to_disk` directory, and the format's name."""
    path = Path(path)
    if not path.exists():
        raise MoekdError(f"--data: {path} does not exist")
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise MoekdError(f"--data: {path} is a directory but not a `datasets` save_to_disk directory")
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise MoekdError(f"--data: {path} holds splits {list(ds)}; point --data at one split's directory")
            ds = ds["train"]
        return ds.to_list(), "datasets"
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise MoekdError(f"--data: {path} line {n} is not valid JSON ({e.msg})") from None
            return rows, "jsonl"
        if suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise MoekdError(f"--data: {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))  # {"train": [...]} or {"data": [...]}
            if not isinstance(data, list):
                raise MoekdError(f"--data: {path} must hold a JSON list of objects")
            return data, "json"
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist(), "parquet"
    except (OSError, UnicodeDecodeError) as e:
        raise MoekdError(f"--data: cannot read {path}: {e}") from None
    except Exception as e:  # pyarrow raises its own types for a corrupt file
        if type(e).__module__.startswith("pyarrow"):
            raise MoekdError(f"--data: {path} is not a readable Parquet file: {e}") from None
        raise
    raise MoekdError(
        f"--data: {path} has unknown extension {suffix!r}; use .jsonl, .json, .parquet or a save_to_disk directory"
    )


def detect_fields(rows: list[dict], override: dict[str, str | None] | None = None) -> FieldMap:
    """Dolly or Alpaca field names, from the first row, with explicit overrides applied."""
    first = rows[0] if rows and isinstance(rows[0], dict) else {}
    base = ALPACA if ("output" in first and "response" not in first) else DOLLY
    if base is DOLLY and "context" not in first and "input" in first:
        base = FieldMap("instruction", "input", "response")
    fields = {"instruction": base.instruction, "context": base.context, "response": base.response}
    for key, value in (override or {}).items():
        if value == "" and key != "context":
            raise MoekdError(f"--{key}-field must name a field; only --context-field may be empty (no context)")
        if value is not None:
            fields[key] = value or None  # "" turns the context field off
    return FieldMap(**fields)


def check_max_examples(n: int | None) -> None:
    if n is not None and n < 1:
        raise MoekdError(f"--max-examples must be at least 1, got {n}")


def load_records(
    path: str | Path,
    fields: dict[str, str | None] | None = None,
    skip_invalid: bool = False,
) -> LoadedRecords:
    """Validated records of a data file; raise on the first bad row unless `skip_invalid`."""
    rows, fmt = read_rows(path)
    if not rows:
        raise MoekdError(f"--data: {path} holds no rows")
    fmap = detect_fields(rows, fields)
    records, index, skipped = [], [], {}
    for n, row in enumerate(rows):
        problem = row_problem(row, fmap)
        if problem is None:
            ctx = row.get(fmap.context) if fmap.context else None
            records.append(Record(row[fmap.instruction], ctx or "", row[fmap.response]))
            index.append(n)
        elif skip_invalid:
            skipped[problem[0]] = skipped.get(problem[0], 0) + 1
        else:
            raise MoekdError(
                f"--data: {path} row {n}: {problem[1]}. Fix the row, map the fields with "
                "--instruction-field/--context-field/--response-field, or pass --skip-invalid to leave such rows out"
            )
    if not records:
        raise MoekdError(f"--data: {path} has no valid rows ({skipped})")
    return LoadedRecords(records, index, fmap, fmt, skipped)


def row_problem(row: object, fmap: FieldMap, reference_lists: bool = False) -> tuple[str, str] | None:
    """(reason, message) of what is wrong with a row, or None. With `reference_lists` the response
    may also be a non-empty list of references (evaluation data)."""
    if not isinstance(row, dict):
        return "not_an_object", f"expected a JSON object, got {type(row).__name__}"
    for name in (fmap.instruction, fmap.response):
        if name not in row:
            return f"missing_{name}", f"field {name!r} is missing (row has {sorted(row)})"
        if row[name] is None:
            return f"missing_{name}", f"field {name!r} is null"
    response = row[fmap.response]
    if reference_lists and isinstance(response, list):
        if not response or not all(isinstance(r, str) and r.strip() for r in response):
            return f"bad_{fmap.response}", f"field {fmap.response!r} must be a non-empty string or a list of them"
        response = response[0]
    for name, value in ((fmap.instruction, row[fmap.instruction]), (fmap.response, response)):
        if not isinstance(value, str):
            return f"non_string_{name}", f"field {name!r} must be a string, got {type(value).__name__}"
    if fmap.context and row.get(fmap.context) is not None and not isinstance(row[fmap.context], str):
        return (
            f"non_string_{fmap.context}",
            f"field {fmap.context!r} must be a string, got {type(row[fmap.context]).__name__}",
        )
    if not response.strip():
        return f"empty_{fmap.response}", f"field {fmap.response!r} is empty"
    if not row[fmap.instruction].strip():
        return f"empty_{fmap.instruction}", f"field {fmap.instruction!r} is empty"
    return None
