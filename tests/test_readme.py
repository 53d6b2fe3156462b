"""Every shell command of the README runs as written, on tiny models, in README order.

The commands are the lines of the README's ```bash / ```sh / ```console blocks that start with
`moekd`, `torchrun` or `make` (a console block's `$ ` prompt removed, `\\` continuations joined,
comments dropped, `&&` chains split), and the files a `cat > FILE <<'END'` here-document writes. They run one after the other in one working directory that
holds what they name (tiny saved models, small data files), so a command uses what earlier ones
wrote. Only sizes are shrunk (SHRINK: steps, rows, generated tokens), and torchrun lines run on two
gloo ranks on CPU. A command that cannot run here is listed in NOT_RUN with the reason; a command
that is neither run nor listed, or a listing the README no longer has, fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from itertools import groupby
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torch.distributed.run import get_args_parser

from moekd.tiny_models import make_tiny_model
from tests.test_bad_inputs import ROOT, run_cli

pytestmark = pytest.mark.timeout(600)

README = ROOT / "README.md"
LANGUAGES = {"bash", "sh", "shell", "console"}
PROGRAMS = ("moekd", "torchrun", "make")

NOT_RUN = {
    "make demo": "creates .venv, installs torch and runs the whole demo for minutes (tests/test_demo.py runs `--quick`)",
    "make test": "runs the whole test suite, this test included",
    "moekd demo": "the full demo takes about 10 minutes (tests/test_demo.py runs `moekd demo --quick`)",
    "moekd demo --quick": "a few minutes; tests/test_demo.py runs it",
    "moekd routing families": "builds every MoE family of the installed transformers (tests/test_families.py checks each)",
}

# Sizes only: each flag is set to this value (added when the command does not give it).
SHRINK = {
    ("train",): {"--max-steps": "2", "--workers": "0", "--eval-every": "0"},
    ("sar", "train"): {"--steps": "2", "--max-new-tokens": "8", "--batch-tokens": "512"},
    ("eval",): {"--limit": "2", "--max-new-tokens": "8"},
    ("routing", "stats"): {"--max-examples": "8"},
    ("data", "synth"): {"--n-train": "32", "--n-valid": "8", "--n-test": "8"},
}
RANKS = "2"  # torchrun's --nproc-per-node: two gloo ranks on CPU
# A `--resume` line continues a run that crashed; after the finished run above it in the README,
# the only refusal allowed is that there is nothing left to resume (so its settings did match).
FINISHED = ("this run is finished", "already exists (a finished run)")


def readme_commands(markdown: str) -> list[str]:
    """The commands of the shell blocks of `markdown`, in order, each normalised by shlex.join."""
    commands = []
    blocks = re.findall(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```", markdown, re.S | re.M)
    for language, body in blocks:
        if language not in LANGUAGES:
            continue
        lines = iter(body.replace("\\\n", " ").splitlines())
        for line in lines:
            line = line.strip()
            heredoc = re.fullmatch(r"cat > (\S+) <<'(\w+)'", line)
            if heredoc:  # a file the commands after it read: written as given
                content = []
                for text in lines:
                    if text.strip() == heredoc[2]:
                        break
                    content.append(text)
                commands.append(f"cat > {heredoc[1]}\n" + "\n".join(content) + "\n")
                continue
            if language == "console":
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:]
            words = shlex.split(line, comments=True)
            for is_and, part in groupby(words, key=lambda word: word == "&&"):
                part = list(part)
                if not is_and and part[0] in PROGRAMS:
                    commands.append(shlex.join(part))
    return commands


def shrink(words: list[str]) -> list[str]:
    """`words` (a moekd command line) with the SHRINK sizes of its command."""
    sizes = next((s for cmd, s in SHRINK.items() if tuple(words[: len(cmd)]) == cmd), {})
    words = list(words)
    for flag, value in sizes.items():
        if flag == "--max-steps" and "--epochs" in words:
            flag, value = "--epochs", "1"  # they exclude each other
        if flag in words:
            words[words.index(flag) + 1] = value
        else:
            words += [flag, value]
    return words


def torchrun_split(words: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options and program, the moekd arguments) of a `torchrun ... -m moekd -- ARGS` line, parsed by
    torchrun's own parser."""
    parsed = get_args_parser().parse_args(words[1:])
    assert parsed.training_script == "moekd" and (parsed.module or parsed.no_python), words
    launcher = words[1 : words.index("moekd") + 1]  # up to the module or program
    return launcher, parsed.training_script_args


def run(command: str, cwd: Path) -> tuple[int | str, str]:
    if command.startswith("cat > "):
        name, content = command[len("cat > ") :].split("\n", 1)
        (cwd / name).write_text(content)
        return 0, ""
    words = shlex.split(command)
    if words[0] == "moekd":
        previous = os.getcwd()
        os.chdir(cwd)
        try:
            return run_cli(shrink(words[1:]))
        finally:
            os.chdir(previous)
    launcher, args = torchrun_split(words)
    if "--nproc-per-node" in launcher:
        launcher[launcher.index("--nproc-per-node") + 1] = RANKS
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *launcher, "--", *shrink(args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.fixture
def workdir(tmp_path, make_teacher, tokenizer, data_file) -> Path:
    """What the README's commands name: tiny saved models and small instruction files."""
    (tmp_path / "teacher").symlink_to(make_teacher("mixtral"))  # 8 experts, top-2
    (tmp_path / "olmoe").symlink_to(make_teacher("olmoe", experts=16))  # enough experts for --router-probs top-8
    make_tiny_model("llama", tokenizer, tmp_path / "student", seed=3, hidden=32)
    make_tiny_model("mixtral", tokenizer, tmp_path / "small-moe", seed=3, hidden=32, experts=4)
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    for name, part in (("train.jsonl", rows[:32]), ("test.jsonl", rows[-16:-8]), ("dolly_test.jsonl", rows[-8:])):
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in part))
    pq.write_table(pa.Table.from_pylist(rows[:32]), tmp_path / "dolly.parquet")
    return tmp_path


def test_extraction_reads_shell_blocks_only():
    markdown = "\n".join(
        [
            "```bash",
            "moekd cache build --teacher ./t --out a.zarr   # a comment",
            "moekd cache pack a.zarr a.zip && moekd cache verify a.zip",
            "moekd train --data x.jsonl \\",
            "  --student ./s --out runs/x",
            "export X=1",
            "```",
            "```console",
            '$ moekd data synth --out d --storage-options \'{"a": "#1"}\'',
            "moekd looks like a command but is output",
            "```",
            "```python",
            "moekd = 1",
            "```",
            "  ```sh",
            "  torchrun --standalone -m moekd -- train --m 2",
            "  ```",
        ]
    )
    assert readme_commands(markdown) == [
        "moekd cache build --teacher ./t --out a.zarr",
        "moekd cache pack a.zarr a.zip",
        "moekd cache verify a.zip",
        "moekd train --data x.jsonl --student ./s --out runs/x",
        """moekd data synth --out d --storage-options '{"a": "#1"}'""",
        "torchrun --standalone -m moekd -- train --m 2",
    ]


def test_shrink_sets_sizes_only():
    assert shrink(["train", "--data", "t.jsonl", "--epochs", "3", "--workers", "2"]) == [
        *("train", "--data", "t.jsonl", "--epochs", "1", "--workers", "0", "--eval-every", "0")
    ]
    assert shrink(["cache", "info", "run.zarr"]) == ["cache", "info", "run.zarr"]


def test_readme_torchrun_lines_reach_moekd_whole():
    """torchrun's parser takes an abbreviation of its own options (`--m` for `--max-restarts`, ...) from the
    arguments after the module unless `--` ends them: every README torchrun line hands moekd all of its own."""
    lines = [shlex.split(c) for c in readme_commands(README.read_text()) if c.startswith("torchrun")]
    for words in lines:
        assert "--" in words, f"{shlex.join(words)}: put -- before moekd's arguments"
        assert torchrun_split(words)[1] == words[words.index("--") + 1 :]
    args = [torchrun_split(words)[1] for words in lines]
    assert any(a[:2] == ["cache", "build"] and "--m" in a for a in args) and any(a[0] == "train" for a in args)


def test_every_readme_command_runs_or_is_listed(workdir):
    commands = readme_commands(README.read_text())
    stale = set(NOT_RUN) - set(commands)
    assert not stale, f"NOT_RUN lists commands the README no longer has: {sorted(stale)}"
    ran = []
    for command in commands:
        if command in NOT_RUN:
            continue
        assert "..." not in shlex.split(command), f"{command}: write the command out, `...` cannot run"
        code, output = run(command, workdir)
        refused_as_finished = code == 2 and "--resume" in command and any(f in output for f in FINISHED)
        assert code == 0 or refused_as_finished, f"README command failed (exit {code}): {command}\n{output[-4000:]}"
        assert "Traceback" not in output, f"{command}\n{output[-4000:]}"
        ran.append(command)
    assert any(c.startswith("torchrun") for c in ran) and len(ran) >= 20


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings of `markdown`."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_links_name_files_and_headings_that_exist(page):
    source = ROOT / page
    for target in re.findall(r"\]\(([^)\s]+)\)", source.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        linked = (source.parent / path).resolve() if path else source
        assert linked.exists(), f"{page} links to {path}, which does not exist"
        if anchor:
            assert anchor in anchors(linked.read_text()), f"{page} links to #{anchor}, no heading of {path or page}"
