"""Bad input, everywhere: one table of command lines that every command must refuse cleanly.

Each case is a command line run through the real entry point (`moekd.cli.main` in process; a few
also through the `moekd` console script and `python -m moekd` in a fresh process) with
placeholders for the fixtures below ({teacher}, {data}, {cache}, {run}, ...) and for the inputs
the case makes itself ({bad}, and {out} when the case gives an existing output path). Every case
must:
- exit with code 2 and print no traceback;
- print one line naming the culprit (flag, field or file: every string of `culprit`);
- leave nothing behind that reads as complete: a fresh {out} must not exist afterwards, an
  existing one must be unchanged (no complete store, training checkpoint, suite or demo results
  appears in it), and no shared input may change.
Adding a case for a new command or flag is one line in CASES. `cache verify` on a store that
exists gives a verdict instead (exit code 1, one FAIL line per problem): VERIFY_PROBLEMS.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
Maker = Callable[[Path, dict], Path]


# ---------------------------------------------------------------- running the real entry point


def run_cli(argv: list[str]) -> tuple[int | str, str]:
    """(exit code, stdout + stderr) of `moekd ARGV`, in process through moekd.cli.main."""
    from moekd.cli import main
    from moekd.cli.app import console

    buffer = io.StringIO()
    width = console._width
    console.width = 10_000  # one message, one line: rich would wrap it at 80 columns
    try:
        with (
            mock.patch.object(sys, "argv", ["moekd", *argv]),
            contextlib.redirect_stdout(buffer),
            contextlib.redirect_stderr(buffer),
        ):
            try:
                main()
                code: int | str = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # what a user would see as a traceback
                code = "traceback"
                buffer.write(traceback.format_exc())
    finally:
        console._width = width
    return code, buffer.getvalue()


CONSOLE_SCRIPT = shutil.which("moekd", path=str(Path(sys.executable).parent))


def run_subprocess(launcher: list[str], argv: list[str]) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `LAUNCHER ARGV` in a fresh process that imports this checkout."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": "10000"}
    done = subprocess.run([*launcher, *argv], capture_output=True, text=True, env=env, timeout=300)
    return done.returncode, done.stdout + done.stderr


def error_line(output: str) -> str:
    """The one `error:` line moekd prints, or (for a usage error of the command line parser) the
    error of its panel, flattened to one line."""
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    if lines:
        assert len(lines) == 1 and output.rstrip().endswith(lines[0]), f"not one last line:\n{output}"
        return lines[0]
    flat = " ".join(output.translate(str.maketrans("", "", "│╭╮╰╯─")).split())
    assert " Error " in flat, output
    return flat[flat.index(" Error ") + 1 :]


# ---------------------------------------------------------------- what a case makes


def text(content: str | bytes, name: str = "bad.jsonl") -> Maker:
    def make(tmp: Path, fx: dict) -> Path:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    return make


def jsonl(*rows) -> Maker:
    return text("".join(json.dumps(row) + "\n" for row in rows))


def folder(**files: str) -> Maker:
    """A directory holding `files` (name -> content); none for an empty one."""

    def make(tmp: Path, fx: dict) -> Path:
        path = tmp / "folder"
        path.mkdir()
        for name, content in files.items():
            (path / name).write_text(content)
        return path

    return make


def copy(fixture: str, *edits: Callable[[Path], None]) -> Maker:
    """A copy of fixture directory `fixture`, changed by `edits`."""

    def make(tmp: Path, fx: dict) -> Path:
        path = shutil.copytree(fx[fixture], tmp / f"{fixture}-copy")
        for edit in edits:
            edit(path)
        return path

    return make


def drop(*patterns: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        for pattern in patterns:
            for file in path.glob(pattern):
                file.unlink()

    return edit


def truncate(name: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        file = path / name
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])

    return edit


def edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        content = json.loads((path / name).read_text())
        change(content)
        (path / name).write_text(json.dumps(content))

    return edit


def store_meta(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return edit_json("zarr.json", lambda root: change(root["attributes"]["moekd"]))


def flip_byte(pattern: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        file = sorted(path.glob(pattern))[0]
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))

    return edit


def foreign_safetensors(tmp: Path, fx: dict) -> Path:
    """A valid safetensors file that no `moekd sar train` wrote (no moekd metadata)."""
    from safetensors.torch import save_file

    save_file({"model.layers.0.mlp.gate.weight": torch.zeros(8, 32)}, str(tmp / "foreign.safetensors"))
    return tmp / "foreign.safetensors"


def other_zarr(tmp: Path, fx: dict) -> Path:
    """A Zarr v3 store written by another tool."""
    import zarr

    group = zarr.open_group(str(tmp / "other.zarr"), mode="w", zarr_format=3)
    group.attrs["producer"] = "not moekd"
    group.create_array("x", shape=(4,), dtype="int32")[:] = 1
    return tmp / "other.zarr"


def held(
    maker: Maker | None = None, name: str = "out", suffix: str = "", shard: tuple[int, int] | None = None
) -> Maker:
    """`maker`'s output (default: a fresh path `name`) with its lock held by a live writer (this test process)."""
    from moekd.locking import WriterLock

    def make(tmp: Path, fx: dict) -> Path:
        path = maker(tmp, fx) if maker is not None else tmp / name
        lock = WriterLock(f"{path}{suffix}", "--out", shard)
        lock.acquire()
        record = lock.path.read_bytes()
        lock.release()
        lock.path.write_bytes(record)  # still held, by a live pid, without a heartbeat thread left running
        return path

    return make


def set_key(key: str, value) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        *parents, last = key.split(".")
        for part in parents:
            d = d[part]
        d[last] = value

    return change


def drop_key(key: str) -> Callable[[dict], None]:
    return lambda d: d.pop(key)


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    command: str  # with {placeholders}
    culprit: tuple[str, ...]  # strings the error line must contain
    bad: Maker | None = None  # makes {bad}
    out: Maker | None = None  # makes {out} (otherwise a fresh path that must stay absent)


def case(id: str, command: str, *culprit: str, bad: Maker | None = None, out: Maker | None = None):
    return pytest.param(Case(id, command, culprit, bad, out), id=id)


BUILD = (
    "cache build --teacher {teacher} --data {data} --out {out} --k 16 --max-prompt-len 96 --max-len 128 "
    "--batch-tokens 512 --positions-per-shard 256 --device cpu"
)
STATS = (
    "routing stats --teacher {teacher} --data {data} --max-examples 8 --max-prompt-len 96 --max-len 128 --device cpu"
)
TRAIN = (
    "train --cache {cache} --student {student} --out {out} --max-steps 2 --batch-tokens 1024 --workers 0 --device cpu"
)
BDISTILL = (
    "train --cache {gate_cache} --student {moe_student} --out {out} --max-steps 2 --batch-tokens 1024 --workers 0 "
    "--device cpu --router-loss bdistill"
)
SFT = (
    "train --data {data} --loss ce --student {student} --out {out} --max-steps 2 --batch-tokens 1024 --workers 0 "
    "--max-prompt-len 96 --max-len 128 --device cpu"
)
EVAL = "eval --model {student} --data {data} --seeds 1 --max-new-tokens 4 --limit 2 --device cpu --json {out}"
SYNTH = "data synth --out {out} --n-train 16 --n-valid 16 --n-test 16"
DEMO = "demo --quick --workdir {out}"
SAR = (
    "sar train --teacher {teacher} --student {student} --data {data} --out {out}.safetensors --steps 1 "
    "--batch-tokens 512 --max-prompt-len 96 --max-len 128 --device cpu"
)
LOCKED = "is being written by another moekd"
# Options are single-valued, so a later occurrence overrides the base command's (except eval --data, which repeats).

DOLLY_ROW = {"instruction": "Say hi.", "context": "", "response": "hi"}
NO_EOS = edit_json("tokenizer_config.json", drop_key("eos_token"))

CASES = [
    # ---- cache build: data
    case("build-data-missing", BUILD + " --data {tmp}/absent.jsonl", "--data", "absent.jsonl"),
    case(
        "build-data-not-json",
        BUILD + " --data {bad}",
        "--data",
        "line 2",
        bad=text(json.dumps(DOLLY_ROW) + "\n{oops\n"),
    ),
    case("build-data-empty", BUILD + " --data {bad}", "--data", "no rows", bad=text("")),
    case("build-data-blank-lines", BUILD + " --data {bad}", "--data", "no rows", bad=text("\n  \n")),
    case("build-data-not-utf8", BUILD + " --data {bad}", "--data", "bad.jsonl", bad=text(b"\xff\xfe{\x00")),
    case(
        "build-data-json-object",
        BUILD + " --data {bad}",
        "--data",
        "JSON list",
        bad=text('{"a": 1, "b": 2}', "bad.json"),
    ),
    case("build-data-json-scalars", BUILD + " --data {bad}", "--data", "row 0", bad=text("[1, 2]", "bad.json")),
    case("build-data-unknown-suffix", BUILD + " --data {bad}", "--data", ".txt", bad=text("hello", "data.txt")),
    case(
        "build-data-plain-directory", BUILD + " --data {bad}", "--data", "save_to_disk", bad=folder(**{"a.jsonl": "{}"})
    ),
    case(
        "build-data-corrupt-parquet",
        BUILD + " --data {bad}",
        "--data",
        "Parquet",
        bad=text(b"PAR1 not really", "bad.parquet"),
    ),
    case("build-field-missing", BUILD + " --data {bad}", "row 0", "'response'", bad=jsonl({"instruction": "Say hi."})),
    case(
        "build-field-null",
        BUILD + " --data {bad}",
        "row 0",
        "'instruction'",
        bad=jsonl({"instruction": None, "response": "hi"}),
    ),
    case(
        "build-field-not-string",
        BUILD + " --data {bad}",
        "row 1",
        "'instruction'",
        bad=jsonl(DOLLY_ROW, {"instruction": 5, "response": "hi"}),
    ),
    case("build-context-not-string", BUILD + " --data {bad}", "'context'", bad=jsonl({**DOLLY_ROW, "context": ["a"]})),
    case("build-field-empty", BUILD + " --data {bad}", "'response'", bad=jsonl({**DOLLY_ROW, "response": "  "})),
    case("build-row-not-object", BUILD + " --data {bad}", "row 1", "object", bad=jsonl(DOLLY_ROW, ["a", "b"])),
    case("build-field-override-absent", BUILD + " --instruction-field question", "'question'"),
    case("build-field-override-empty", BUILD + " --response-field ''", "--response-field"),
    case("build-prompt-over-max", BUILD + " --max-prompt-len 5", "--max-prompt-len"),
    case("build-max-len-not-above-prompt", BUILD + " --max-len 96", "--max-len"),
    case("build-max-prompt-len-zero", BUILD + " --max-prompt-len 0", "--max-prompt-len"),
    case("build-chat-template-absent", BUILD + " --chat-template", "--chat-template"),
    # ---- cache build: teacher and tokenizer
    case("build-teacher-missing", BUILD + " --teacher {tmp}/absent", "--teacher", "absent"),
    case("build-teacher-is-file", BUILD + " --teacher {data}", "--teacher"),
    case("build-teacher-empty-dir", BUILD + " --teacher {bad}", "--teacher", bad=folder()),
    case(
        "build-teacher-without-tokenizer",
        BUILD + " --teacher {qwen_no_tokenizer}",
        "--teacher",
        "no tokenizer files",
        "--tokenizer",
    ),
    case("build-teacher-one-token-tokenizer", BUILD + " --teacher {qwen_one_token}", "--teacher", "no tokens at all"),
    case(
        "build-teacher-without-weights",
        BUILD + " --teacher {bad}",
        "--teacher",
        bad=copy("teacher", drop("*.safetensors")),
    ),
    case(
        "build-teacher-truncated-weights",
        BUILD + " --teacher {bad}",
        "--teacher",
        "model.safetensors",
        bad=copy("teacher", truncate("model.safetensors")),
    ),
    case(
        "build-teacher-config-not-json",
        BUILD + " --teacher {bad}",
        "--teacher",
        "config.json",
        bad=copy("teacher", lambda p: (p / "config.json").write_text("{")),
    ),
    case(
        "build-teacher-unknown-model-type",
        BUILD + " --teacher {bad}",
        "--teacher",
        bad=copy("teacher", edit_json("config.json", set_key("model_type", "no-such-model"))),
    ),
    case("build-teacher-tokenizer-too-large", BUILD + " --teacher {narrow_teacher}", "--teacher", "400", "300"),
    case("build-teacher-tokenizer-far-too-small", BUILD + " --teacher {wide_teacher}", "--teacher", "400", "1000"),
    case("build-tokenizer-missing", BUILD + " --tokenizer {tmp}/absent", "--tokenizer", "absent"),
    case(
        "build-tokenizer-without-files", BUILD + " --tokenizer {qwen_no_tokenizer}", "--tokenizer", "no tokenizer files"
    ),
    case("build-tokenizer-one-token", BUILD + " --tokenizer {qwen_one_token}", "--tokenizer", "no tokens at all"),
    case(
        "build-tokenizer-unknown-tokens-only",
        BUILD + " --tokenizer {unk_tokenizer}",
        "--tokenizer",
        "unknown tokens only",
    ),
    case(
        "build-tokenizer-far-too-small",
        BUILD + " --teacher {wide_teacher} --tokenizer {tokenizer}",
        "--tokenizer",
        "1000",
    ),
    case(
        "build-tokenizer-too-large", BUILD + " --teacher {narrow_teacher} --tokenizer {tokenizer}", "--tokenizer", "300"
    ),
    case(
        "build-tokenizer-without-eos", BUILD + " --tokenizer {bad}", "--tokenizer", "eos", bad=copy("tokenizer", NO_EOS)
    ),
    # ---- cache build: numbers and choices
    case("build-k-zero", BUILD + " --k 0", "--k"),
    case("build-k-over-vocab", BUILD + " --k 100000", "--k", "400"),
    case("build-k-not-a-number", BUILD + " --k many", "--k"),
    case("build-logprob-scale-zero", BUILD + " --logprob-scale 0", "--logprob-scale"),
    case("build-encoding-unknown", BUILD + " --encoding dense", "--encoding", "dense"),
    case("build-draws-with-topk", BUILD + " --draws 16", "--draws", "--encoding sampled"),
    case("build-k-with-sampled", BUILD + " --encoding sampled", "--k", "--encoding topk"),
    case("build-draws-zero", BUILD.replace("--k 16", "--encoding sampled --draws 0"), "--draws"),
    case(
        "build-proposal-temp-zero", BUILD.replace("--k 16", "--encoding sampled --proposal-temp 0"), "--proposal-temp"
    ),
    case(
        "build-hidden-dtype-unknown", BUILD.replace("--k 16", "--encoding hidden --hidden-dtype int4"), "--hidden-dtype"
    ),
    case("build-m-zero", BUILD + " --policy ka --m 0", "--m"),
    case("build-m-deterministic-policy", BUILD + " --m 2", "--m"),
    case("build-ka-lambda-above-1", BUILD + " --policy ka --ka-lambda 2", "--ka-lambda"),
    case("build-ka-lambda-negative", BUILD + " --policy ka --ka-lambda=-0.5", "--ka-lambda"),
    case("build-ka-drop-zero", BUILD + " --policy ka --ka-drop 0", "--ka-drop"),
    case("build-ka-lambda-zero-several-samples", BUILD + " --policy ka --ka-lambda 0 --m 2", "--ka-lambda", "--m"),
    case("build-ka-drop-every-expert", BUILD + " --policy ka --ka-drop 8", "--ka-drop"),
    case("build-top-p-zero", BUILD + " --policy topp --top-p 0", "--top-p"),
    case("build-top-p-above-1", BUILD + " --policy topp --top-p 1.5", "--top-p"),
    case("build-policy-unknown", BUILD + " --policy best", "--policy", "best"),
    case("build-moe-policy-on-dense-teacher", BUILD + " --teacher {dense_teacher} --policy all", "--policy"),
    case("build-batch-tokens-zero", BUILD + " --batch-tokens 0", "--batch-tokens"),
    case("build-sar-without-router", BUILD + " --policy sar", "--policy sar", "--router"),
    case(
        "build-router-with-other-policy",
        BUILD + " --policy all --router {bad}",
        "--router",
        "--policy all",
        bad=foreign_safetensors,
    ),
    case(
        "build-router-missing",
        BUILD + " --policy sar --router {tmp}/absent.safetensors",
        "--router",
        "absent.safetensors",
    ),
    case(
        "build-router-truncated",
        BUILD + " --policy sar --router {bad}",
        "--router",
        "truncated or damaged",
        bad=text(b"\x20\x00\x00\x00\x00\x00\x00\x00{", "router.safetensors"),
    ),
    case(
        "build-router-not-a-sar-file",
        BUILD + " --policy sar --router {bad}",
        "--router",
        "without moekd metadata",
        bad=foreign_safetensors,
    ),
    case("build-positions-per-shard-zero", BUILD + " --positions-per-shard 0", "--positions-per-shard"),
    case("build-positions-per-shard-unaligned", BUILD + " --positions-per-shard 300", "--positions-per-shard"),
    case("build-seed-negative", BUILD + " --seed=-1", "--seed"),
    case("build-seed-too-large", BUILD + " --seed 9223372036854775808", "--seed"),
    case("build-dtype-unknown", BUILD + " --dtype int8", "--dtype"),
    case("build-device-unknown", BUILD + " --device tpu", "--device"),
    case("build-router-probs-unknown", BUILD + " --router-probs some", "--router-probs"),
    case("build-router-probs-top-all", BUILD + " --router-probs top-8", "--router-probs"),
    case(
        "build-router-probs-dense-teacher", BUILD + " --teacher {dense_teacher} --router-probs full", "--router-probs"
    ),
    # ---- cache build: conflicting flags, output paths, existing stores
    case("build-top-p-without-topp", BUILD + " --top-p 0.5", "--top-p"),
    case("build-ka-lambda-without-ka", BUILD + " --policy mc --ka-lambda 0.1", "--ka-lambda"),
    case("build-resume-and-overwrite", BUILD + " --resume --overwrite", "--resume", "--overwrite"),
    case("build-out-is-file", BUILD, "--out", out=text("not a store", "out.zarr")),
    case("build-out-foreign-directory", BUILD, "--out", "not a moekd cache", out=folder(**{"notes.txt": "mine"})),
    case("build-out-other-tool-store", BUILD, "--out", "not a moekd cache", out=other_zarr),
    case("build-out-parent-is-file", BUILD + " --out {data}/run.zarr", "--out"),
    case("build-out-complete-store", BUILD, "--out", "--overwrite", out=copy("cache")),
    case("build-out-unfinished-store", BUILD, "--out", "--resume", out=copy("unfinished")),
    case(
        "build-resume-complete-store-other-settings",
        BUILD + " --resume --k 8",
        "--resume",
        "complete",
        "k: 16",
        out=copy("cache"),
    ),
    case("build-shard-out-of-range", BUILD + " --shard 2/2", "--shard", "2/2"),
    case("build-shard-not-a-fraction", BUILD + " --shard half", "--shard", "half"),
    case("build-shard-and-overwrite", BUILD + " --shard 0/2 --overwrite", "--shard", "--overwrite"),
    case(
        "build-shard-on-a-build-planned-without",
        BUILD + " --shard 0/2",
        "--shard",
        "without --shard",
        out=copy("unfinished"),
    ),
    # ---- cache finalize / push / pull / pack
    case("finalize-missing", "cache finalize {tmp}/absent.zarr", "absent.zarr"),
    case("finalize-file", "cache finalize {data}", "demo_instructions.jsonl"),
    case("finalize-units-missing", "cache finalize {bad}", "units are not written", "--resume", bad=copy("unfinished")),
    case("push-source-missing", "cache push {tmp}/absent.zarr {out}", "absent.zarr"),
    case("push-source-unfinished", "cache push {unfinished} {out}", "unfinished build"),
    case(
        "push-into-foreign-directory",
        "cache push {cache} {out}",
        "not part of this store",
        out=folder(**{"notes.txt": "mine"}),
    ),
    case("push-jobs-zero", "cache push {cache} {out} --jobs 0", "--jobs"),
    case(
        "push-storage-options-not-json",
        "cache push {cache} s3://bucket/run.zarr --storage-options '{{oops'",
        "--storage-options",
    ),
    case("pull-source-missing", "cache pull {tmp}/absent.zarr {out}", "absent.zarr"),
    case("pack-not-zip", "cache pack {cache} {tmp}/run.tar", "run.tar", ".zip"),
    case("pack-exists", "cache pack {cache} {out}", "exists", out=text("x", "run.zip")),
    case("pack-source-unfinished", "cache pack {unfinished} {tmp}/run.zip", "unfinished build"),
    case("build-resume-other-settings", BUILD + " --resume --k 8", "--resume", "k: 16", out=copy("unfinished")),
    # ---- one writer at a time: another live writer holds the output's lock
    case("build-resume-while-a-build-writes", BUILD + " --resume", "--out", LOCKED, out=held(copy("unfinished"))),
    case("build-shard-while-a-build-writes", BUILD + " --shard 0/2", "--out", LOCKED, out=held()),
    case(
        "finalize-while-a-shard-job-writes",
        "cache finalize {out}",
        "STORE",
        "shard job 0/2",
        LOCKED,
        out=held(copy("unfinished"), shard=(0, 2)),
    ),
    case("pull-while-a-pull-writes", "cache pull {cache} {out}", "pull destination", LOCKED, out=held()),
    case("pack-while-a-pack-writes", "cache pack {cache} {out}", "pack", LOCKED, out=held(name="run.zip")),
    # ---- cache info / verify
    case("info-missing", "cache info {tmp}/absent.zarr", "absent.zarr", "does not exist"),
    case("info-file", "cache info {data}", "demo_instructions.jsonl"),
    case("info-plain-directory", "cache info {bad}", "folder", bad=folder(**{"a.txt": "x"})),
    case("info-other-tool-store", "cache info {bad}", "other.zarr", "not a moekd teacher cache", bad=other_zarr),
    case(
        "info-newer-schema",
        "cache info {bad}",
        "cache-copy",
        "upgrade moekd",
        bad=copy("cache", store_meta(set_key("schema_version", "2.0"))),
    ),
    case("info-torn-metadata", "cache info {bad}", "zarr.json", bad=copy("cache", truncate("zarr.json"))),
    case(
        "info-bad-metadata-field",
        "cache info {bad}",
        "layout.num_examples",
        bad=copy("cache", store_meta(set_key("layout.num_examples", "many"))),
    ),
    case("info-no-argument", "cache info", "Missing argument 'store'"),
    case("info-storage-options-not-json", "cache info {cache} --storage-options '{{oops'", "--storage-options", "JSON"),
    case(
        "verify-storage-options-not-object",
        "cache verify {cache} --storage-options '[1]'",
        "--storage-options",
        "object",
    ),
    case("verify-missing", "cache verify {tmp}/absent.zarr", "absent.zarr", "does not exist"),
    case("verify-no-argument", "cache verify --deep", "Missing argument 'store'"),
    case("verify-unknown-option", "cache verify {cache} --deeep", "--deeep"),
    # ---- routing stats
    case("stats-dense-teacher", STATS + " --teacher {dense_teacher}", "--teacher", "no MoE routers"),
    case("stats-teacher-without-tokenizer", STATS + " --teacher {qwen_no_tokenizer}", "--teacher", "--tokenizer"),
    case("stats-tokenizer-one-token", STATS + " --tokenizer {qwen_one_token}", "--tokenizer", "no tokens at all"),
    case(
        "stats-tokenizer-far-too-small",
        STATS + " --teacher {wide_teacher} --tokenizer {tokenizer}",
        "--tokenizer",
        "1000",
    ),
    case("stats-teacher-tokenizer-too-large", STATS + " --teacher {narrow_teacher}", "--teacher", "300"),
    case("stats-scope-unknown", STATS + " --scope some", "--scope"),
    case("stats-max-examples-zero", STATS + " --max-examples 0", "--max-examples"),
    case("build-max-examples-zero", BUILD + " --max-examples 0", "--max-examples"),
    case("train-max-examples-zero", TRAIN + " --max-examples 0", "--max-examples"),
    case("train-save-total-limit-zero", TRAIN + " --save-total-limit 0", "--save-total-limit"),
    case("train-save-dtype-float16", TRAIN + " --save-dtype float16", "--save-dtype", "bfloat16"),
    case("sft-max-examples-negative", SFT + " --max-examples=-3", "--max-examples"),
    case("sar-max-examples-zero", SAR + " --max-examples 0", "--max-examples"),
    case("eval-greedy-no-rouge", EVAL + " --greedy --no-rouge --nll", "--greedy", "--no-rouge"),
    case("stats-batch-size-zero", STATS + " --batch-size 0", "--batch-size"),
    case("stats-max-len-not-above-prompt", STATS + " --max-len 50", "--max-len"),
    case("stats-top-p-with-ka", STATS + " --policy ka --top-p 0.5", "--top-p"),
    case("stats-ka-lambda-above-1", STATS + " --policy ka --ka-lambda 1.5", "--ka-lambda"),
    case("stats-ka-drop-zero", STATS + " --policy ka --ka-drop 0", "--ka-drop"),
    case("stats-top-p-zero", STATS + " --policy topp --top-p 0", "--top-p"),
    case("stats-max-prompt-len-zero", STATS + " --max-prompt-len 0", "--max-prompt-len"),
    case("stats-seed-negative", STATS + " --seed=-3", "--seed"),
    case("stats-policy-sar", STATS + " --policy sar", "--policy sar", "--compare"),
    case(
        "stats-compare-missing",
        STATS + " --policy all --compare {tmp}/absent.safetensors",
        "--compare",
        "absent.safetensors",
    ),
    case(
        "stats-compare-not-a-sar-file",
        STATS + " --policy all --compare {bad}",
        "--compare",
        "without moekd metadata",
        bad=foreign_safetensors,
    ),
    # ---- sar train
    case("sar-while-a-run-writes", SAR + " --resume auto", "--out", LOCKED, out=held(suffix=".safetensors")),
    case("sar-lr-zero", SAR + " --lr 0", "--lr"),
    case("sar-lr-negative", SAR + " --lr=-1e-5", "--lr"),
    case("sar-beta-negative", SAR + " --beta=-0.1", "--beta"),
    case("sar-teacher-kld-unknown", SAR + " --teacher-kld sideways", "--teacher-kld", "sideways"),
    case("sar-responses-unknown", SAR + " --responses both", "--responses", "both"),
    case("sar-student-lr-without-co-training", SAR + " --student-lr 1e-4", "--student-lr", "--co-train-student"),
    case("sar-student-lr-zero", SAR + " --co-train-student --student-lr 0", "--student-lr"),
    case("sar-dtype-float16", SAR + " --dtype float16", "--dtype float16"),
    case("sar-steps-zero", SAR + " --steps 0", "--steps"),
    case("sar-batch-tokens-zero", SAR + " --batch-tokens 0", "--batch-tokens"),
    case("sar-out-without-suffix", SAR + " --out {out}", "--out", ".safetensors"),
    case("sar-out-exists", SAR + " --out {bad}", "--out", "already exists", bad=foreign_safetensors),
    case("sar-dense-teacher", SAR + " --teacher {dense_teacher}", "--teacher", "no MoE routers"),
    case(
        "sar-student-other-tokenizer",
        SAR + " --student {other_tokenizer_student}",
        "--student",
        "token-to-id mapping differs",
    ),
    case("sar-data-missing", SAR + " --data {tmp}/absent.jsonl", "--data", "absent.jsonl"),
    case("sar-teacher-missing", SAR + " --teacher {tmp}/absent", "--teacher", "absent"),
    case("stats-policy-unknown", STATS + " --policy best", "--policy"),
    case("stats-dtype-unknown", STATS + " --dtype int8", "--dtype"),
    case(
        "stats-data-bad-row", STATS + " --data {bad}", "'instruction'", bad=jsonl({"instruction": 3, "response": "x"})
    ),
    case("stats-field-override-absent", STATS + " --response-field answer", "'answer'"),
    case("stats-prompt-over-max", STATS + " --max-prompt-len 5", "--max-prompt-len"),
    case("stats-chat-template-absent", STATS + " --chat-template", "--chat-template"),
    case("stats-plot-parent-is-file", STATS + " --plot {data}/routing.png", "--plot"),
    case("stats-plot-is-directory", STATS + " --plot {tmp}", "--plot"),
    # ---- train: choices, numbers, conflicts
    case("train-no-source", "train --student {student} --out {out}", "--cache", "--data"),
    case("build-resume-complete", "cache build --out {cache} --resume", "--resume", "complete cache"),
    case("train-config-missing", TRAIN + " --config {tmp}/absent.yaml", "--config", "absent.yaml"),
    case(
        "train-config-unknown", TRAIN + " --config {bad}", "--config", "'max_step'", bad=text("max_step: 3\n", "c.yaml")
    ),
    case(
        "train-config-type", TRAIN + " --config {bad}", "--config", "lr must be float", bad=text("lr: fast\n", "c.yaml")
    ),
    case(
        "train-config-not-yaml", TRAIN + " --config {bad}", "--config", "not valid YAML", bad=text("lr: [1\n", "c.yaml")
    ),
    case("train-config-list", TRAIN + " --config {bad}", "--config", "a mapping", bad=text("- 1\n", "c.yaml")),
    case(
        "build-config-no-teacher",
        "cache build --config {bad}",
        "--teacher",
        bad=text("data: x.jsonl\nout: y.zarr\n", "c.yaml"),
    ),
    case("train-both-sources", TRAIN + " --data {data}", "--cache", "--data"),
    case("train-loss-unknown", TRAIN + " --loss kl", "--loss"),
    case("train-storage-options-not-json", TRAIN + " --storage-options '{{oops'", "--storage-options"),
    case("train-kd-loss-on-data", SFT + " --loss fkl", "--loss"),
    case("train-ce-weight-above-1", TRAIN + " --ce-weight 2", "--ce-weight"),
    case("train-ce-weight-with-ce", SFT + " --ce-weight 0.5", "--ce-weight"),
    case("train-temperature-zero", TRAIN + " --temperature 0", "--temperature"),
    case("train-temperature-nan", TRAIN + " --temperature nan", "--temperature"),
    case("train-skew-lambda-one", TRAIN + " --loss skl --skew-lambda 1", "--skew-lambda"),
    case("train-jsd-beta-zero", TRAIN + " --loss jsd --jsd-beta 0", "--jsd-beta"),
    case("train-samples-unknown", TRAIN + " --samples all", "--samples"),
    case("train-schedule-unknown", TRAIN + " --schedule linear", "--schedule"),
    case("train-steps-and-epochs", TRAIN + " --epochs 1", "--max-steps", "--epochs"),
    case("train-lr-zero", TRAIN + " --lr 0", "--lr"),
    case("train-lr-negative", TRAIN + " --lr=-1e-4", "--lr"),
    case("train-weight-decay-negative", TRAIN + " --weight-decay=-0.1", "--weight-decay"),
    case("train-batch-tokens-zero", TRAIN + " --batch-tokens 0", "--batch-tokens"),
    case("train-batch-tokens-not-a-number", TRAIN + " --batch-tokens 1e3", "--batch-tokens"),
    case("train-grad-accum-zero", TRAIN + " --grad-accum 0", "--grad-accum"),
    case("train-max-grad-norm-zero", TRAIN + " --max-grad-norm 0", "--max-grad-norm"),
    case("train-max-steps-zero", TRAIN + " --max-steps 0", "--max-steps"),
    case("train-epochs-zero", TRAIN.replace("--max-steps 2", "--epochs 0"), "--epochs"),
    case("train-warmup-negative", TRAIN + " --warmup=-1", "--warmup"),
    case("train-eval-every-negative", TRAIN + " --eval-every=-1", "--eval-every"),
    case("train-save-every-negative", TRAIN + " --save-every=-1", "--save-every"),
    case("train-workers-negative", TRAIN + " --workers=-1", "--workers"),
    case("train-eval-fraction-one", TRAIN + " --eval-fraction 1", "--eval-fraction"),
    case("train-eval-fraction-negative", TRAIN + " --eval-fraction=-0.1", "--eval-fraction"),
    case("train-seed-negative", TRAIN + " --seed=-1", "--seed"),
    case("train-device-unknown", TRAIN + " --device tpu", "--device"),
    # ---- train: Balanced Distillation (MoE students, teacher gates in the cache)
    case(
        "train-bdistill-store-without-gates",
        TRAIN + " --student {moe_student} --router-loss bdistill",
        "--router-loss",
        "--router-probs",
    ),
    case("train-bdistill-without-cache", SFT + " --router-loss bdistill", "--router-loss", "--cache"),
    case("train-bdistill-dense-student", BDISTILL + " --student {student}", "--router-loss", "MoE student"),
    case("train-router-aux-coef-dense-student", TRAIN + " --router-aux-coef 0.1", "--router-aux-coef", "MoE student"),
    case("train-router-loss-unknown", BDISTILL + " --router-loss sar", "--router-loss"),
    case("train-mc-alpha-zero", BDISTILL + " --mc-alpha 0", "--mc-alpha"),
    case("train-mc-alpha-above-1", BDISTILL + " --mc-alpha 1.5", "--mc-alpha"),
    case("train-mc-alpha-nan", BDISTILL + " --mc-alpha nan", "--mc-alpha"),
    case("train-mc-draws-zero", BDISTILL + " --mc-draws 0", "--mc-draws"),
    case("train-router-tau-init-out-of-range", BDISTILL + " --router-tau-init 2", "--router-tau-init"),
    case("train-router-layers-unknown", BDISTILL + " --router-layers first", "--router-layers"),
    case("train-expert-map-unknown", BDISTILL + " --expert-map random", "--expert-map"),
    case("train-expert-weight-negative", BDISTILL + " --expert-weight=-1", "--expert-weight"),
    case("train-coverage-weight-nan", BDISTILL + " --coverage-weight nan", "--coverage-weight"),
    case("train-router-beta-negative", BDISTILL + " --router-beta=-0.1", "--router-beta"),
    case("train-router-aux-coef-inf", BDISTILL + " --router-aux-coef inf", "--router-aux-coef"),
    case("train-layer-map-malformed", BDISTILL + " --layer-map 0-1", "--layer-map", "0-1"),
    case(
        "train-layer-map-student-layer-missing", BDISTILL + " --layer-map 0:0,5:1", "--layer-map", "student MoE layer 5"
    ),
    case("train-layer-map-teacher-layer-missing", BDISTILL + " --layer-map 0:9", "--layer-map", "teacher MoE layer 9"),
    case("train-layer-map-layer-twice", BDISTILL + " --layer-map 0:0,0:1", "--layer-map", "mapped twice"),
    case(
        "train-expert-map-student-wider-than-teacher",
        BDISTILL + " --student {wide_moe_student}",
        "--expert-map",
        "16 experts",
        "student expert 8",
    ),
    # ---- train: the student
    case("train-student-missing", TRAIN + " --student {tmp}/absent", "--student", "absent"),
    case("train-student-is-file", TRAIN + " --student {data}", "--student"),
    case(
        "train-student-without-tokenizer",
        TRAIN + " --student {bad}",
        "--student",
        bad=copy("student", drop("tokenizer*", "special_tokens_map.json")),
    ),
    case(
        "train-student-without-weights",
        TRAIN + " --student {bad}",
        "--student",
        bad=copy("student", drop("*.safetensors")),
    ),
    case(
        "train-student-truncated-weights",
        TRAIN + " --student {bad}",
        "--student",
        "model.safetensors",
        bad=copy("student", truncate("model.safetensors")),
    ),
    case("train-student-other-tokenizer", TRAIN + " --student {other_tokenizer_student}", "--student", "tokenizer"),
    case(
        "train-student-other-tokenizer-allowed",
        TRAIN + " --student {other_tokenizer_student} --allow-tokenizer-mismatch",
        "--student",
        "cannot help",
    ),
    case("train-student-is-a-run", TRAIN + " --student {run}", "--student", "final"),
    case("train-student-vocabulary-too-small", TRAIN + " --student {narrow_student}", "--student", "300"),
    # ---- train: the cache
    case("train-cache-missing", TRAIN + " --cache {tmp}/absent.zarr", "absent.zarr", "does not exist"),
    case("train-cache-is-file", TRAIN + " --cache {data}", "--cache"),
    case("train-cache-plain-directory", TRAIN + " --cache {bad}", "--cache", bad=folder(**{"a.txt": "x"})),
    case(
        "train-cache-other-tool-store", TRAIN + " --cache {bad}", "--cache", "not a moekd teacher cache", bad=other_zarr
    ),
    case("train-cache-unfinished", TRAIN + " --cache {unfinished}", "--cache", "incomplete"),
    case(
        "train-cache-corrupted",
        TRAIN + " --cache {bad}",
        "--cache",
        "topk_ids",
        bad=copy("cache", flip_byte("topk_ids/c/*/*/*")),
    ),
    case(
        "train-cache-newer-schema",
        TRAIN + " --cache {bad}",
        "--cache",
        "upgrade moekd",
        bad=copy("cache", store_meta(set_key("schema_version", "2.0"))),
    ),
    # ---- train: run directories and --resume
    case("train-out-is-file", TRAIN, "--out", out=text("x", "run")),
    case("train-out-parent-is-file", TRAIN + " --out {data}/run", "--out"),
    case("train-out-foreign-directory", TRAIN, "--out", "holds no moekd run", out=folder(**{"notes.txt": "mine"})),
    case("train-out-holds-other-run", TRAIN + " --lr 1e-3", "--out", "lr", out=copy("run")),
    case("train-out-holds-this-run", TRAIN, "--out", "--resume auto", out=copy("run")),
    case("train-resume-finished-run", TRAIN + " --resume auto", "--out", "finished", out=copy("run")),
    case("train-resume-auto-other-run", TRAIN + " --lr 1e-3 --resume auto", "--out", "lr", out=copy("run")),
    case("train-resume-other-runs-checkpoint", TRAIN + " --lr 1e-3 --resume {run}/step-000001", "--resume", "lr"),
    case("train-resume-not-a-checkpoint", TRAIN + " --resume {tmp}", "--resume"),
    case("train-resume-while-a-run-writes", TRAIN + " --resume auto", "--out", LOCKED, out=held(copy("run"))),
    case("train-resume-model-only-checkpoint", TRAIN + " --resume {run}/final", "--resume", "training_state.pt"),
    # ---- train --data
    case(
        "train-data-bad-row",
        SFT + " --data {bad}",
        "--data",
        "'response'",
        bad=jsonl({"instruction": "x", "response": 1}),
    ),
    case("train-data-empty", SFT + " --data {bad}", "--data", bad=text("")),
    case("train-data-max-len", SFT + " --max-len 50", "--max-len"),
    case("train-data-chat-template-absent", SFT + " --chat-template", "--chat-template"),
    case("train-data-field-override-empty", SFT + " --instruction-field ''", "--instruction-field"),
    case("train-data-max-prompt-len-zero", SFT + " --max-prompt-len 0", "--max-prompt-len"),
    case("train-chat-template-with-cache", TRAIN + " --chat-template", "--chat-template", "--data only"),
    case("train-skip-invalid-with-cache", TRAIN + " --skip-invalid", "--skip-invalid", "--data only"),
    case("train-field-with-cache", TRAIN + " --context-field ''", "--context-field", "--data only"),
    case("train-allow-tokenizer-mismatch-with-data", SFT + " --allow-tokenizer-mismatch", "--allow-tokenizer-mismatch"),
    # ---- eval
    case("eval-model-missing", EVAL + " --model {tmp}/absent", "--model", "absent"),
    case("eval-model-is-file", EVAL + " --model {data}", "--model"),
    case("eval-model-plain-directory", EVAL + " --model {bad}", "--model", "config.json", bad=folder(**{"a.txt": "x"})),
    case("eval-model-is-a-store", EVAL + " --model {cache}", "--model"),
    case("eval-model-is-a-run", EVAL + " --model {run}", "--model", "final"),
    case(
        "eval-model-without-tokenizer",
        EVAL + " --model {bad}",
        "--model",
        "tokenizer",
        bad=copy("student", drop("tokenizer*", "special_tokens_map.json")),
    ),
    case("eval-model-without-weights", EVAL + " --model {bad}", "--model", bad=copy("student", drop("*.safetensors"))),
    case(
        "eval-model-truncated-weights",
        EVAL + " --model {bad}",
        "--model",
        "model.safetensors",
        bad=copy("student", truncate("model.safetensors")),
    ),
    case("eval-model-tokenizer-too-large", EVAL + " --model {narrow_student}", "--model", "300", "row 0"),
    case("eval-model-tokenizer-without-eos", EVAL + " --model {bad}", "--model", "eos", bad=copy("student", NO_EOS)),
    case("eval-data-missing", EVAL + " --data {tmp}/absent.jsonl", "--data", "absent.jsonl"),
    case(
        "eval-data-empty-references",
        EVAL + " --data {bad}",
        "--data",
        "'response'",
        bad=jsonl({"instruction": "x", "response": []}),
    ),
    case("eval-data-empty", EVAL + " --data {bad}", "--data", bad=text("")),
    case("eval-seeds-not-numbers", EVAL + " --seeds ten", "--seeds"),
    case("eval-seeds-repeated", EVAL + " --seeds 1,1", "--seeds"),
    case("eval-seeds-negative", EVAL + " --seeds=-1", "--seeds"),
    case("eval-seeds-empty", EVAL + " --seeds ''", "--seeds"),
    case("eval-max-new-tokens-zero", EVAL + " --max-new-tokens 0", "--max-new-tokens"),
    case("eval-max-prompt-len-zero", EVAL + " --max-prompt-len 0", "--max-prompt-len"),
    case("eval-prompt-over-max", EVAL + " --max-prompt-len 5", "--max-prompt-len"),
    case("eval-batch-size-zero", EVAL + " --batch-size 0", "--batch-size"),
    case("eval-limit-zero", EVAL + " --limit 0", "--limit"),
    case("eval-json-is-directory", EVAL + " --json {tmp}", "--json"),
    case("eval-json-parent-is-file", EVAL + " --json {data}/eval.json", "--json"),
    case("eval-device-unknown", EVAL + " --device tpu", "--device"),
    case("eval-chat-template-absent", EVAL + " --chat-template", "--chat-template"),
    case("eval-sar-without-router", EVAL + " --policy sar", "--policy sar", "--router"),
    case(
        "eval-router-with-other-policy",
        EVAL + " --policy all --router {bad}",
        "--router",
        "--policy all",
        bad=foreign_safetensors,
    ),
    case("eval-router-without-policy", EVAL + " --router {bad}", "--router", "--policy sar", bad=foreign_safetensors),
    case(
        "eval-router-missing",
        EVAL + " --policy sar --router {tmp}/absent.safetensors",
        "--router",
        "absent.safetensors",
    ),
    # ---- data synth
    case("synth-n-train-negative", SYNTH + " --n-train=-1", "--n-train"),
    case("synth-n-test-negative", SYNTH + " --n-test=-5", "--n-test"),
    case("synth-n-valid-negative", SYNTH + " --n-valid=-2", "--n-valid"),
    case("synth-n-not-a-number", SYNTH + " --n-valid many", "--n-valid"),
    case("synth-out-is-file", SYNTH, "--out", out=text("x", "synth")),
    case("synth-out-parent-is-file", SYNTH + " --out {data}/synth", "--out"),
    case("synth-out-holds-other-data", SYNTH, "--out", "train.jsonl", out=folder(**{"train.jsonl": "{}\n"})),
    # ---- demo
    case("demo-workdir-is-file", DEMO, "--workdir", out=text("x", "work")),
    case("demo-workdir-parent-is-file", DEMO.replace("{out}", "{data}/work"), "--workdir"),
    case("demo-workdir-other-plan", DEMO, "--workdir", "another plan", out=folder(**{"plan.json": "{}"})),
    case("demo-workdir-foreign-directory", DEMO, "--workdir", out=folder(**{"notes.txt": "mine"})),
    # ---- the command line itself
    case("cli-unknown-command", "cache biuld", "biuld"),
    case("cli-unknown-option", BUILD + " --kk 3", "--kk"),
    case("cli-missing-required-option", "cache build --data {data} --out {out}", "--teacher"),
]

# `cache verify` judges a store that exists: what is wrong with it is its verdict (exit code 1, a FAIL line).
VERIFY_PROBLEMS = [
    case("verify-file", "cache verify {data}", "zarr.json is missing"),
    case("verify-plain-directory", "cache verify {bad}", "zarr.json is missing", bad=folder(**{"a.txt": "x"})),
    case("verify-other-tool-store", "cache verify {bad}", "not a moekd teacher cache", bad=other_zarr),
    case(
        "verify-newer-schema",
        "cache verify {bad}",
        "upgrade moekd",
        bad=copy("cache", store_meta(set_key("schema_version", "2.0"))),
    ),
    case("verify-unfinished", "cache verify {unfinished}", "incomplete build"),
    case("verify-torn-metadata", "cache verify {bad}", "not valid JSON", bad=copy("cache", truncate("zarr.json"))),
    case(
        "verify-corrupted",
        "cache verify {bad}",
        "topk_ids",
        "checksum mismatch",
        bad=copy("cache", flip_byte("topk_ids/c/*/*/*")),
    ),
]


# ---------------------------------------------------------------- fixtures (built once per module)


def interrupted_build(argv: list[str]) -> None:
    """Run `cache build` and stop it right after its first unit is committed: an unfinished store."""
    from moekd.store.writer import CacheWriter

    real = CacheWriter.write_unit

    def stop_after_first(self, unit, *args):
        real(self, unit, *args)
        raise KeyboardInterrupt

    with mock.patch.object(CacheWriter, "write_unit", stop_after_first):
        code, output = run_cli(argv)
    assert code == 130, output


@pytest.fixture(scope="module")
def fx(tmp_path_factory, tokenizer, tokenizer_dir, make_teacher, data_file) -> dict:
    """Paths of the shared inputs; the cases only read them (test_shared_inputs_are_untouched)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from moekd.data.tokenizer import train_tokenizer
    from moekd.tiny_models import make_tiny_model, tiny_config

    root = tmp_path_factory.mktemp("bad_inputs")

    def model_with(tokenizer_to_save, vocab: int, name: str, family: str = "mixtral", **config) -> Path:
        """A tiny model whose output layer has `vocab` rows, saved with `tokenizer_to_save` (None: no tokenizer files)."""
        torch.manual_seed(0)
        ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        model = AutoModelForCausalLM.from_config(tiny_config(family, vocab, special_ids=ids, **config))
        model.save_pretrained(str(root / name))
        if tokenizer_to_save is not None:
            tokenizer_to_save.save_pretrained(str(root / name))
        return root / name

    paths = {
        "data": data_file,
        "tokenizer": tokenizer_dir,
        "teacher": make_teacher("mixtral"),
        "dense_teacher": make_teacher("llama"),
        # the case: without tokenizer files transformers builds a 1-token Qwen2 tokenizer
        "qwen_no_tokenizer": model_with(None, len(tokenizer), "qwen_no_tokenizer", "qwen2_moe"),
        "qwen_one_token": model_with(None, len(tokenizer), "qwen_one_token", "qwen2_moe"),
        "unk_tokenizer": root / "unk_tokenizer",
        "narrow_teacher": model_with(tokenizer, 300, "narrow_teacher"),
        "wide_teacher": model_with(tokenizer, 1000, "wide_teacher"),
        "narrow_student": model_with(tokenizer, 300, "narrow_student", "llama"),
        "student": root / "student",
        "other_tokenizer_student": root / "other_tokenizer_student",
        "cache": root / "cache.zarr",
        "gate_cache": root / "gate_cache.zarr",
        "moe_student": root / "moe_student",
        "wide_moe_student": root / "wide_moe_student",
        "unfinished": root / "unfinished.zarr",
        "run": root / "run",
    }
    AutoTokenizer.from_pretrained(str(paths["qwen_no_tokenizer"])).save_pretrained(str(paths["qwen_one_token"]))
    unknown_only = Tokenizer(WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=unknown_only, unk_token="<unk>", eos_token="<eos>").save_pretrained(
        str(paths["unk_tokenizer"])
    )
    make_tiny_model("llama", tokenizer, paths["student"], seed=3, hidden=32)
    other = train_tokenizer([f"{w} {w}{w} other words, other text {i}" for i, w in enumerate("abcdefghij" * 20)], 300)
    make_tiny_model("llama", other, paths["other_tokenizer_student"], seed=3, hidden=32)
    formatted = {name: str(path) for name, path in paths.items()}
    code, output = run_cli(shlex.split(BUILD.format(**{**formatted, "out": paths["cache"]})))
    assert code == 0, output
    code, output = run_cli(
        shlex.split(BUILD.format(**{**formatted, "out": paths["gate_cache"]}) + " --router-probs full")
    )
    assert code == 0, output
    make_tiny_model("mixtral", tokenizer, paths["moe_student"], seed=3, hidden=32, layers=2, experts=4)
    make_tiny_model("mixtral", tokenizer, paths["wide_moe_student"], seed=3, hidden=32, layers=2, experts=16)
    interrupted_build(shlex.split(BUILD.format(**{**formatted, "out": paths["unfinished"]})))
    code, output = run_cli(
        shlex.split(TRAIN.format(**{**formatted, "out": paths["run"]}) + " --save-every 1 --eval-every 0")
    )
    assert code == 0, output
    return paths


def snapshot(path: Path) -> dict | None:
    """What is at `path`: None when nothing; else each file's size and modification time."""
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_file():
        return {".": (path.stat().st_size, path.stat().st_mtime_ns)}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def shared_snapshot(fx) -> dict:
    return {name: snapshot(Path(path)) for name, path in fx.items()}


def complete_outputs(path: Path) -> list[str]:
    """Whatever at `path` reads as a finished result of some command."""
    from moekd.errors import MoekdError
    from moekd.store.reader import CacheReader
    from moekd.store.writer import store_state
    from moekd.training.checkpoint import is_complete, latest_checkpoint

    if not path.is_dir():
        return []
    found = []
    if store_state(path) == "complete":
        found.append("a complete store")
    with contextlib.suppress(MoekdError):
        CacheReader(path)
        found.append("a store CacheReader opens")
    if is_complete(path / "final") or latest_checkpoint(path):
        found.append("a training checkpoint")
    return found + [name for name in ("synth_info.json", "results.json") if (path / name).exists()]


def prepare(c: Case, fx: dict, tmp: Path) -> tuple[list[str], Path]:
    """The argv of case `c` and its output path."""
    values = {name: str(path) for name, path in fx.items()}
    values["tmp"] = str(tmp)
    if c.bad is not None:
        values["bad"] = str(c.bad(tmp, fx))
    out = c.out(tmp, fx) if c.out is not None else tmp / "out"
    values["out"] = str(out)
    return shlex.split(c.command.format(**values)), out


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("c", CASES)
def test_bad_input_is_refused_cleanly(c: Case, fx, shared_snapshot, tmp_path):
    argv, out = prepare(c, fx, tmp_path)
    before = snapshot(out)
    complete_before = complete_outputs(out)
    code, output = run_cli(argv)
    assert code == 2, f"exit {code} for `moekd {shlex.join(argv)}`:\n{output}"
    assert "Traceback" not in output, output
    line = error_line(output)
    for culprit in c.culprit:
        assert culprit in line, f"{culprit!r} not named in: {line}"
    if before is None:
        assert snapshot(out) is None, f"{out} was left behind: {sorted(snapshot(out))[:10]}"
    else:
        assert snapshot(out) == before, f"{out} was changed"
        assert complete_outputs(out) == complete_before


@pytest.mark.parametrize("c", VERIFY_PROBLEMS)
def test_verify_reports_what_is_wrong_with_a_store(c: Case, fx, shared_snapshot, tmp_path):
    argv, _ = prepare(c, fx, tmp_path)
    code, output = run_cli(argv)
    assert code == 1 and "Traceback" not in output, output
    problems = [line for line in output.splitlines() if line.startswith("FAIL")]
    assert any(all(culprit in line for culprit in c.culprit) for line in problems), output


def test_the_table_covers_every_command():
    commands = {" ".join(p.values[0].command.split()[:2]) for p in CASES}
    for command in (
        "cache build",
        "cache info",
        "cache verify",
        "cache finalize",
        "cache push",
        "cache pull",
        "cache pack",
        "routing stats",
        "sar train",
        "train --cache",
        "train --data",
        "eval --model",
        "data synth",
        "demo --quick",
    ):
        assert command in commands, command
    assert len(CASES) >= 50 and len({p.id for p in CASES}) == len(CASES)


SUBPROCESS_CASES = [
    ("build-teacher-without-tokenizer", "moekd"),
    ("train-resume-other-runs-checkpoint", "python -m moekd"),
    ("build-k-not-a-number", "moekd"),
]


@pytest.mark.parametrize("case_id, launcher", SUBPROCESS_CASES)
def test_the_console_command_behaves_the_same(case_id, launcher, fx, tmp_path):
    """The `moekd` console script and `python -m moekd` in a fresh process: the same exit code and the
    same error line as in process."""
    if launcher == "moekd" and CONSOLE_SCRIPT is None:
        pytest.skip("no moekd console script beside this Python")
    c = next(p.values[0] for p in CASES if p.id == case_id)
    argv, out = prepare(c, fx, tmp_path)
    code, output = run_subprocess([CONSOLE_SCRIPT] if launcher == "moekd" else [sys.executable, "-m", "moekd"], argv)
    in_process_code, in_process_output = run_cli(argv)
    assert code == in_process_code == 2, output
    assert "Traceback" not in output, output
    assert error_line(output) == error_line(in_process_output)
    assert snapshot(out) is None


def test_shared_inputs_are_untouched(fx, shared_snapshot):
    """Runs last in this module: no case wrote into the fixtures it was given."""
    assert {name: snapshot(Path(path)) for name, path in fx.items()} == shared_snapshot
