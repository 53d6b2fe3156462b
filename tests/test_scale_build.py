"""Cache builds beyond one process: two torchrun ranks (gloo on CPU), `--shard i/n` jobs + `cache finalize`,
a rank killed mid-build and resumed, and `--resume` on complete stores. Every store must equal a one-process build."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moekd import CacheReader
from moekd.cache_builder.build import BuildOptions, build_cache
from moekd.errors import MoekdError
from moekd.store.layout import BUILD_DIR
from moekd.store.writer import CacheWriter, store_state

pytestmark = pytest.mark.timeout(300)

FLAGS = dict(k=16, max_prompt_len=96, max_len=128, batch_tokens=128, positions_per_shard=256, device="cpu")
# ranks run with one thread each (torchrun's default): so do the builds they are compared with
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def options(teacher, data, out, **kw) -> BuildOptions:
    return BuildOptions(teacher=str(teacher), data=str(data), out=str(out), **{**FLAGS, **kw})


def cli_args(teacher, data, out) -> list[str]:
    args = ["cache", "build", "--teacher", str(teacher), "--data", str(data), "--out", str(out)]
    for key, value in FLAGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def torchrun(nproc: int, args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "moekd",
        *args,
    ]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, make_teacher, data_file):
    """The one-process build every multi-process build must reproduce, and its summary."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("scale") / "reference.zarr"
        summary = build_cache(options(make_teacher("mixtral"), data_file, out))
    finally:
        torch.set_num_threads(threads)
    assert summary.units_total >= 4
    return out, summary


def assert_same_arrays(path: Path, reference: Path) -> None:
    a, b = CacheReader(path), CacheReader(reference)
    assert a.meta.layout == b.meta.layout
    for name in b.meta.layout.arrays:
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:], err_msg=name)
    manifest = json.loads((path / "manifest.json").read_text())
    assert (
        manifest["files"] == json.loads((reference / "manifest.json").read_text())["files"]
    )  # byte for byte, file by file


def test_two_ranks_build_the_store_of_one_and_report_once(reference, make_teacher, data_file, tmp_path):
    ref, ref_summary = reference
    out = tmp_path / "two.zarr"
    args = cli_args(make_teacher("mixtral"), data_file, out)
    run = subprocess.run(torchrun(2, args), env=ENV, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    text = " ".join(run.stderr.split())
    assert text.count("wrote ") == 1, text  # the summary is printed by rank 0 only
    assert f"units {ref_summary.units_total}/{ref_summary.units_total} computed this run by 2 ranks" in text
    assert f"{ref_summary.teacher_tokens:,} teacher tokens" in text  # summed over both ranks
    assert_same_arrays(out, ref)


def _rank_pid(agent: int, rank: int) -> int | None:
    """The pid of torchrun's worker process of `rank` (from /proc: its children and their environment)."""
    for task in Path(f"/proc/{agent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    return int(pid)
            except OSError:
                continue
    return None


def test_a_killed_rank_leaves_its_units_unmarked_and_resume_redoes_only_those(
    reference, make_teacher, data_file, tmp_path, one_thread
):
    ref, ref_summary = reference
    out = tmp_path / "killed.zarr"
    agent = subprocess.Popen(
        torchrun(2, cli_args(make_teacher("mixtral"), data_file, out)),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed = False
    try:
        deadline = time.time() + 200
        while time.time() < deadline and agent.poll() is None and not killed:
            markers = list((out / BUILD_DIR / "units").glob("*.json")) if out.exists() else []
            if any("rank 1/2" in m.read_text() for m in markers if m.stat().st_size):
                pid = _rank_pid(agent.pid, 1)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed = True
            time.sleep(0.01)
        agent.wait(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert killed, "the build finished before rank 1 could be killed"
    assert agent.returncode != 0 and store_state(out) == "unfinished"
    # resumed by one process: the unit deal does not depend on the world size of the run that died
    resumed = build_cache(options(make_teacher("mixtral"), data_file, out, resume=True))
    assert 0 < resumed.units_done < ref_summary.units_total, "the resume redid every unit"
    assert_same_arrays(out, ref)


def test_shard_jobs_in_any_order_then_finalize(reference, make_teacher, data_file, tmp_path, one_thread):
    from moekd.cli import app

    ref, ref_summary = reference
    teacher, out = make_teacher("mixtral"), tmp_path / "sharded.zarr"
    second = build_cache(options(teacher, data_file, out, shard="1/2"))  # plans the store, writes odd units
    assert (
        second.units_done == ref_summary.units_total // 2
        and second.units_missing == second.units_total - second.units_done
    )
    early = CliRunner().invoke(app, ["cache", "finalize", str(out)])
    assert isinstance(early.exception, MoekdError) and "unfinished shards 0/2" in str(early.exception)
    assert "--shard I/2" in str(early.exception) and store_state(out) == "unfinished"
    with pytest.raises(MoekdError, match="planned as 2 --shard jobs, not as 3 --shard jobs"):
        build_cache(options(teacher, data_file, out, shard="0/3"))
    with pytest.raises(MoekdError, match="planned as 2 --shard jobs, not without --shard"):
        build_cache(options(teacher, data_file, out, resume=True))
    with pytest.raises(MoekdError, match=r"other settings \(k: 16 in the store, 8 now"):
        build_cache(options(teacher, data_file, out, shard="0/2", k=8))
    first = build_cache(options(teacher, data_file, out, shard="0/2"))  # joins the plan without --resume
    assert first.units_missing == 0 and first.units_done + second.units_done == ref_summary.units_total
    done = CliRunner().invoke(app, ["cache", "finalize", str(out)])
    assert done.exit_code == 0, done.output
    assert f"{ref_summary.teacher_tokens:,} teacher tokens" in " ".join(done.output.split())  # summed over both jobs
    assert_same_arrays(out, ref)
    retry = build_cache(options(teacher, data_file, out, shard="0/2", resume=True))  # a job-array retry
    assert retry.already_complete


def test_a_plan_is_published_once_and_others_join_it(reference, make_teacher, data_file, tmp_path, one_thread):
    """Two jobs planning at once: the second rename fails and that job joins the first one's plan."""
    teacher, out = make_teacher("mixtral"), tmp_path / "race.zarr"
    real_plan, published = CacheWriter._plan, []

    def someone_else_publishes_first(cls, path, *args):
        real_plan(path, *args)  # the other job's plan, published between our state check and our rename
        published.append(path)
        return real_plan(path, *args)

    CacheWriter._plan = classmethod(someone_else_publishes_first)
    try:
        build_cache(options(teacher, data_file, out, shard="0/2"))
    finally:
        CacheWriter._plan = real_plan
    assert published == [out] and not list(tmp_path.glob(".race.zarr.plan-*"))
    with pytest.raises(MoekdError, match="another build created .* meanwhile"):
        CacheWriter._plan = classmethod(someone_else_publishes_first)
        try:
            build_cache(options(teacher, data_file, tmp_path / "single.zarr"))
        finally:
            CacheWriter._plan = real_plan


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(shard="2/2"), "--shard: '2/2' is not I/N with 0 <= I < N"),
        (dict(shard="a/b"), "--shard: 'a/b' is not I/N"),
        (dict(shard="0/2", overwrite=True), "--shard and --overwrite exclude each other"),
    ],
)
def test_bad_shard_flags(change, message, make_teacher, data_file, tmp_path):
    with pytest.raises(MoekdError, match=re.escape(message)):
        build_cache(options(make_teacher("mixtral"), data_file, tmp_path / "c.zarr", **change))
    assert not (tmp_path / "c.zarr").exists()


# ---------------------------------------------------------------- one writer at a time, with real processes


def moekd(*args: str) -> list[str]:
    return [sys.executable, "-m", "moekd", *args]


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:  # a file, not a pipe: a stopped reader must never block the writer
        return subprocess.Popen(args, env={**ENV, "COLUMNS": "10000"}, stdout=fh, stderr=subprocess.STDOUT)


def wait_for_lock(proc: subprocess.Popen, path: Path) -> None:
    """Until `proc` holds the lock at `path`."""
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(path.read_bytes())["pid"] == proc.pid:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"process {proc.pid} never held {path} (exit code {proc.poll()})")


def refused(args: list[str], holder: subprocess.Popen, *named: str) -> None:
    """Run `args` to its end while `holder` holds the lock: exit code 2 and one line naming the holder."""
    run = subprocess.run(args, env={**ENV, "COLUMNS": "10000"}, capture_output=True, text=True, timeout=200)
    output = run.stdout + run.stderr
    lines = output.strip().splitlines()
    assert run.returncode == 2 and "Traceback" not in output and len(lines) == 1, output
    for part in ("is being written by another moekd", f"pid {holder.pid} on ", "since ", "`moekd ", *named):
        assert part in lines[0], lines[0]


def finish(proc: subprocess.Popen, log: Path) -> str:
    os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    return " ".join(log.read_text().split())


@pytest.fixture
def processes():
    """Popen objects to kill (and continue, if stopped) when a test ends early."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


def test_two_resumes_of_a_killed_build_one_writes_and_the_other_is_refused(
    reference, make_teacher, data_file, tmp_path, processes
):
    """A build SIGKILLed mid-way leaves its lock; two `--resume` runs at once: the first takes the dead
    build's lock over and finishes the store, the second exits 2 naming it; the store equals an uninterrupted one."""
    from moekd.locking import lock_path

    ref, ref_summary = reference
    out = tmp_path / "killed.zarr"
    args = moekd(*cli_args(make_teacher("mixtral"), data_file, out))
    killed = start(args, tmp_path / "killed.log")
    processes.append(killed)
    units = out / BUILD_DIR / "units"
    deadline = time.time() + 200
    while time.time() < deadline and killed.poll() is None and not (units.exists() and any(units.glob("*.json"))):
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert json.loads(lock_path(out).read_bytes())["pid"] == killed.pid  # the kill left its lock behind
    assert store_state(out) == "unfinished"

    first = start(args + ["--resume"], tmp_path / "first.log")
    processes.append(first)
    wait_for_lock(first, lock_path(out))
    os.kill(first.pid, signal.SIGSTOP)  # holding the lock, as busy as it likes
    refused(args + ["--resume"], first, f"--out: {out} ")
    text = finish(first, tmp_path / "first.log")
    done, total = map(int, re.search(r"units (\d+)/(\d+)", text).groups())
    assert 0 < done < total == ref_summary.units_total, text
    assert_same_arrays(out, ref)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no lock, draft or temp file


def test_two_jobs_of_one_shard_exclude_each_other_while_other_shards_run(
    reference, make_teacher, data_file, tmp_path, processes
):
    from moekd.locking import lock_path

    ref, _ = reference
    out = tmp_path / "sharded.zarr"
    args = moekd(*cli_args(make_teacher("mixtral"), data_file, out))
    first = start(args + ["--shard", "0/2"], tmp_path / "first.log")
    processes.append(first)
    wait_for_lock(first, lock_path(out, (0, 2)))
    os.kill(first.pid, signal.SIGSTOP)
    refused(args + ["--shard", "0/2"], first, "shard job 0/2 (")
    other = subprocess.run(args + ["--shard", "1/2"], env=ENV, capture_output=True, text=True, timeout=240)
    assert other.returncode == 0, other.stderr[-3000:]  # shard 1/2 runs beside the (stopped) job of shard 0/2
    refused(moekd("cache", "finalize", str(out)), first, f"STORE: {out} ", "shard job 0/2 (")
    assert store_state(out) == "unfinished"
    finish(first, tmp_path / "first.log")
    done = subprocess.run(moekd("cache", "finalize", str(out)), env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_same_arrays(out, ref)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
