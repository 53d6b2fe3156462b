"""Checking a store end to end (`moekd cache verify`).

Works on local paths, packed .zip stores and fsspec URLs alike: files are read through fsspec
(only those the manifest names: no directory listing is needed), arrays through zarr.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from moekd.encoding import tensor_from_bits
from moekd.errors import MoekdError
from moekd.schemas import parse_metadata
from moekd.schemas.cache import HiddenEncoding, SampledEncoding, TopkEncoding
from moekd.store.layout import BUILD_DIR, MANIFEST, ROOT_META, VOCAB_ROWS_PER_CHUNK
from moekd.store.location import can_list, file_path, list_files, open_files, open_group
from moekd.store.reader import decode_teacher, teacher_arrays


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


def read_root(fs, root: str, location: str) -> dict:
    """The root metadata's `moekd` attribute; MoekdError when it is missing or torn."""
    try:
        raw = fs.cat_file(file_path(root, ROOT_META))
    except (FileNotFoundError, NotADirectoryError):
        raise MoekdError(f"cache {location}: {ROOT_META} is missing: not a Zarr v3 store") from None
    try:
        return json.loads(raw).get("attributes", {}).get("moekd")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise MoekdError(f"cache {location}: {ROOT_META} is not valid JSON (truncated or corrupted)") from None


def read_manifest(fs, root: str, meta) -> dict | None:
    """The manifest of a complete store, checked against the checksum in its metadata (None when it does not match)."""
    data = fs.cat_file(file_path(root, MANIFEST))
    if hashlib.sha256(data).hexdigest() != meta.build.manifest_sha256:
        return None
    return json.loads(data)


def verify_store(location: str, deep: bool = False, storage_options: dict | None = None) -> VerifyReport:
    """Every problem found in the store at `location` (none means it is intact and complete).

    Sizes and checksums are taken from the files the manifest names, read one by one; a listing
    (where the filesystem gives one: not over HTTP) only adds files the manifest does not name.
    """
    report = VerifyReport(location, deep)
    fs, root = open_files(location, storage_options)
    try:
        meta = parse_metadata(read_root(fs, root, location), location)
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
    expected_positions = np.concatenate([np.arange(p - 1, n - 1) for p, n in zip(prompt_len, lengths)])
    vocab = meta.teacher.vocab_size
    if np.any(group["input_ids"][:] >= meta.tokenizer.size) or np.any(group["input_ids"][:] < 0):
        report.problems.append("input_ids: ids outside the tokenizer's range")
    if isinstance(meta.encoding, HiddenEncoding):
        _check_output_layer(group, meta.encoding, report)
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
        check = {TopkEncoding: _check_topk, SampledEncoding: _check_sampled, HiddenEncoding: _check_hidden}
        for problem in check[type(meta.encoding)](meta.encoding, raw, teacher, vocab):
            report.problems.append(f"{where}: {problem}")
        if meta.gates is not None:
            _check_gates(group, meta.gates, start, stop, where, report)
        report.positions_checked += stop - start


def _check_topk(encoding, raw, teacher, vocab: int) -> list[str]:
    ids, logprobs, tail = teacher["topk_ids"], teacher["topk_logprobs"], teacher["tail_logprob"]
    problems = []
    if np.any(ids < 0) or np.any(ids >= vocab):
        problems.append(f"topk_ids outside [0, {vocab})")
    if not np.all(np.isfinite(logprobs)) or np.any(logprobs > 0):
        problems.append("top-k log-probs not finite and <= 0")
    if np.any(np.isnan(tail)) or np.any(tail > 0):
        problems.append("tail log-probs NaN or > 0")
    mass = np.exp(logprobs.astype(np.float64)).sum(-1) + np.exp(tail.astype(np.float64))
    # each decoded probability may exceed the teacher's by the quantisation error: a factor e^max_abs_error
    if np.any(mass > np.exp(encoding.max_abs_error_nats) * (1 + 1e-6)):
        problems.append(f"probability mass up to {mass.max():.6f} > 1")
    return problems


def _check_sampled(encoding, raw, teacher, vocab: int) -> list[str]:
    ids, counts = teacher["sampled_ids"], teacher["sampled_counts"]
    real = counts > 0
    problems = []
    if np.any(ids < 0) or np.any(ids >= vocab):
        problems.append(f"sampled_ids outside [0, {vocab})")
    if np.any(counts.sum(-1) != encoding.draws):
        problems.append(f"sampled_counts do not add up to the {encoding.draws} draws of every position and sample")
    if np.any(real[..., 1:] & ~real[..., :-1]) or np.any(ids[~real] != 0):
        problems.append("padding slots (count 0, id 0) are not all after the drawn ids")
    if np.any((np.diff(ids, axis=-1) <= 0) & real[..., 1:]):
        problems.append("sampled_ids are not unique and ascending")
    if encoding.importance_weights:
        logprobs, logz = teacher["sampled_logprobs"], teacher["proposal_logz"].astype(np.float64)
        if not np.all(np.isfinite(logprobs)) or np.any(logprobs > 0) or np.any(logprobs[~real] != 0):
            problems.append("sampled_logprobs not finite and <= 0 (0 in padding slots)")
        elif not np.all(np.isfinite(logz)):
            problems.append("proposal_logz not finite")
        else:  # the proposal mass of the drawn ids cannot exceed 1
            mass = np.where(real, np.exp(encoding.proposal_temp * logprobs - logz[..., None]), 0.0).sum(-1)
            if np.any(mass > 1 + 1e-5):
                problems.append(f"proposal mass of the drawn ids up to {mass.max():.6f} > 1")
    return problems


def _check_hidden(encoding, raw, teacher, vocab: int) -> list[str]:
    problems = []
    if encoding.hidden_dtype == "fp8":
        scale = raw["hidden_scale"]
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            problems.append("hidden_scale not finite and > 0")
    if not np.all(np.isfinite(teacher["hidden_states"])):
        problems.append("hidden_states not finite")
    return problems


def _check_output_layer(group, encoding, report: VerifyReport) -> None:
    """The stored output layer is the one the metadata names (sha256) and finite."""
    layer = group["output_layer"]
    h = hashlib.sha256()
    finite = True
    for start in range(0, layer.shape[0], VOCAB_ROWS_PER_CHUNK):
        block = layer[start : start + VOCAB_ROWS_PER_CHUNK]
        h.update(np.ascontiguousarray(block).tobytes())
        finite = finite and bool(torch.isfinite(tensor_from_bits(block, encoding.output_layer_dtype)).all())
    if h.hexdigest() != encoding.output_layer_sha256:
        report.problems.append("output_layer: sha256 differs from the one recorded in the metadata")
    if not finite:
        report.problems.append("output_layer: values not finite")


def _check_gates(group, gates, start: int, stop: int, where: str, report: VerifyReport) -> None:
    probs = group["gate_probs"][start:stop].astype(np.float64)
    mass = probs.sum(-1)
    if gates.mode == "top":
        ids, rest = group["gate_ids"][start:stop], group["gate_rest"][start:stop].astype(np.float64)
        if np.any(ids >= gates.num_experts):
            report.problems.append(f"{where}: gate_ids outside [0, {gates.num_experts})")
        mass = mass + rest
    # float16 probabilities: each carries a relative error below 2^-11
    if np.any(probs < 0) or np.any(np.abs(mass - 1) > 2e-3 * probs.shape[-1] ** 0.5 + 1e-3):
        report.problems.append(f"{where}: gate distributions are not probability distributions")
