"""Checking a store end to end (`moekd cache verify`).

Works on local paths, packed .zip stores and fsspec URLs alike: files are read through fsspec
(only those the manifest names: no directory listing is needed), arrays through zarr.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from moekd.data.batches import response_positions
from moekd.encodings import decode_teacher, encoding_of, teacher_arrays
from moekd.encodings.gates import gate_problems
from moekd.errors import MoekdError
from moekd.store.layout import BUILD_DIR, MANIFEST, ROOT_META
from moekd.store.location import can_list, file_path, list_files, open_files, open_group
from moekd.store.root import read_manifest, read_metadata


@dataclass
class VerifyReport:
    location: str
    deep: bool
    files_checked: int = 0
    positions_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(location: str, deep: bool = False, storage_options: dict | None = None) -> VerifyReport:
    """Every problem found in the store at `location` (none means it is intact and complete).

    Sizes and checksums are taken from the files the manifest names, read one by one; a listing
    (where the filesystem gives one: not over HTTP) only adds files the manifest does not name.
    """
    report = VerifyReport(location, deep)
    fs, root = open_files(location, storage_options)
    try:
        meta = read_metadata(fs, root, location)
    except MoekdError as e:
        report.problems.append(str(e).removeprefix(f"cache {location}: "))
        return report
    if meta.build.status != "complete":
        report.problems.append(
            f"incomplete build (status {meta.build.status!r}): resume it with `moekd cache build ... --resume`"
        )
        return report
    try:
        manifest = read_manifest(fs, root, meta)
    except FileNotFoundError:
        report.problems.append(f"{MANIFEST} is missing")
        return report
    if manifest is None:
        report.problems.append(f"{MANIFEST} does not match the checksum recorded in the metadata")
        return report
    listed = manifest["files"]
    for rel, entry in listed.items():
        report.files_checked += 1
        try:
            data = fs.cat_file(file_path(root, rel))
        except FileNotFoundError:
            report.problems.append(f"{rel}: missing")
            continue
        if len(data) != entry["size"]:
            report.problems.append(f"{rel}: {len(data)} bytes, expected {entry['size']} (truncated or replaced)")
        elif hashlib.sha256(data).hexdigest() != entry["sha256"]:
            report.problems.append(f"{rel}: checksum mismatch (corrupted)")
    if can_list(fs):
        for rel in sorted(set(list_files(fs, root)) - set(listed) - {ROOT_META, MANIFEST}):
            if not rel.startswith(BUILD_DIR + "/"):
                report.problems.append(f"{rel}: not in the manifest (unexpected file)")
    if report.problems:
        return report
    group = open_group(location, storage_options)
    for name, spec in meta.layout.arrays.items():
        if name not in group:
            report.problems.append(f"array {name} is missing")
        elif list(group[name].shape) != spec.shape or str(group[name].dtype) != spec.dtype:
            report.problems.append(
                f"array {name}: {group[name].shape} {group[name].dtype}, layout says {spec.shape} {spec.dtype}"
            )
    if not report.problems and deep:
        _check_values(group, meta, report)
    return report


def _check_values(group, meta, report: VerifyReport) -> None:
    layout = meta.layout
    tok_off = group["example_token_offsets"][:]
    pos_off = group["example_position_offsets"][:]
    prompt_len = group["example_prompt_len"][:]
    lengths = np.diff(tok_off)
    if tok_off[0] != 0 or tok_off[-1] != layout.num_tokens or np.any(lengths < 1):
        report.problems.append("example_token_offsets: not increasing from 0 to num_tokens")
    if pos_off[0] != 0 or pos_off[-1] != layout.num_positions or np.any(np.diff(pos_off) < 1):
        report.problems.append("example_position_offsets: not increasing from 0 to num_positions")
    if report.problems:
        return
    expected_positions = np.concatenate([response_positions(p, n) for p, n in zip(prompt_len, lengths)])
    vocab = meta.teacher.vocab_size
    if np.any(group["input_ids"][:] >= meta.tokenizer.size) or np.any(group["input_ids"][:] < 0):
        report.problems.append("input_ids: ids outside the tokenizer's range")
    encoding = encoding_of(meta.encoding)
    report.problems += encoding.fixed_problems(group, meta.encoding)
    names = teacher_arrays(meta.encoding)
    step = layout.positions_per_shard
    for start in range(0, layout.num_positions, step):
        stop = min(start + step, layout.num_positions)
        where = f"positions {start}..{stop - 1}"
        try:
            raw = {name: group[name][start:stop] for name in names}
            teacher = decode_teacher(meta.encoding, raw)
            targets = group["target_positions"][start:stop]
        except Exception as e:  # a chunk whose crc32c fails, or undecodable bytes
            report.problems.append(f"{where}: cannot decode ({type(e).__name__}: {e})")
            continue
        if not np.array_equal(targets, expected_positions[start:stop]):
            report.problems.append(f"{where}: target_positions disagree with the example table")
        problems = encoding.value_problems(meta.encoding, raw, teacher, vocab)
        if meta.gates is not None:
            problems += gate_problems(
                {name: group[name][start:stop] for name in meta.gates.arrays}, meta.gates.num_experts
            )
        report.problems += [f"{where}: {problem}" for problem in problems]
        report.positions_checked += stop - start
