"""The writer lock (moekd/locking.py): one holder among processes racing for it, a dead holder's lock
taken over (SIGKILL, zombie, reused pid, silent past the lease on another machine), shard locks side by
side, a lost lock noticed, and the refusal naming the holder."""

import json
import multiprocessing
import os
import signal
import time

import pytest

from moekd import locking
from moekd.errors import MoekdError
from moekd.locking import WriterLock, lock_path

FORK = multiprocessing.get_context("fork")


def holder_record(**change) -> bytes:
    record = {
        "host": locking.HOST,
        "boot_id": locking.BOOT_ID,
        "pid": os.getpid(),
        "process_start": locking._process_start(os.getpid())[1],
        "started": "2025-01-01T00:00:00+00:00",
        "command": "moekd cache build --out run.zarr --resume",
        "token": "0",
    }
    return json.dumps({**record, **change}).encode()


def _contend(target, shard, ready, done, wins) -> None:
    lock = WriterLock(target, "--out", shard)
    ready.wait()
    try:
        lock.acquire()
    except MoekdError as e:
        wins.put(("refused", str(e)))
        done.wait()
        return
    wins.put(("won", os.getpid()))
    done.wait()  # held until every contender has tried
    lock.release()


@pytest.mark.parametrize("stale", [False, True], ids=["free", "left-by-a-killed-writer"])
def test_one_of_many_processes_racing_for_a_lock_wins(stale, tmp_path):
    target = tmp_path / "run.zarr"
    if stale:  # every contender finds a dead holder's lock and tries to take it over at once
        killed = FORK.Process(target=_acquire_and_die, args=(target,))
        killed.start()
        killed.join()
        assert lock_path(target).exists()
    n = 6
    ready, done, wins = FORK.Barrier(n), FORK.Barrier(n + 1), FORK.Queue()
    procs = [FORK.Process(target=_contend, args=(target, None, ready, done, wins)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [wins.get(timeout=60) for _ in procs]
    done.wait()
    for p in procs:
        p.join(timeout=60)
    won = [r for r in results if r[0] == "won"]
    assert len(won) == 1, results
    assert all(f"pid {won[0][1]}" in message for kind, message in results if kind == "refused"), results
    assert not lock_path(target).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if not target.exists() else ["run.zarr"])


def _acquire_and_die(target) -> None:
    WriterLock(target, "--out").acquire()
    os.kill(os.getpid(), signal.SIGKILL)


def test_refusal_names_the_holder_and_what_to_do_in_one_line(tmp_path):
    target = tmp_path / "run.zarr"
    with WriterLock(target, "--out"), pytest.raises(MoekdError) as refused:
        WriterLock(target, "--out").acquire()
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"--out: {target} is being written by another moekd")
    holder = f"`{locking._command()}`, pid {os.getpid()} on {locking.HOST} since 20"  # pytest, or an xdist worker
    for part in (holder, "wait for it to end or stop it"):
        assert part in message, message
    assert not lock_path(target).exists()  # released by the holder; the refused one removed nothing


def test_lock_of_a_killed_or_zombie_or_reused_pid_is_taken_over(tmp_path):
    target = tmp_path / "run.zarr"
    killed = FORK.Process(target=_acquire_and_die, args=(target,))
    killed.start()
    killed.join()
    with WriterLock(target, "--out"):  # SIGKILLed and reaped: its pid is gone
        assert json.loads(lock_path(target).read_bytes())["pid"] == os.getpid()

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        WriterLock(target, "--out").acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    deadline = time.time() + 30
    while locking._process_start(pid)[0] != "Z" and time.time() < deadline:
        time.sleep(0.01)
    assert json.loads(lock_path(target).read_bytes())["pid"] == pid  # a zombie: its pid still exists
    try:
        with WriterLock(target, "--out"):
            pass
    finally:
        os.waitpid(pid, 0)

    lock_path(target).write_bytes(holder_record(process_start=1))  # our pid, but another process's start time
    with WriterLock(target, "--out"):
        pass
    lock_path(target).write_bytes(holder_record())  # this very process: alive
    with pytest.raises(MoekdError, match="is being written by another moekd"):
        WriterLock(target, "--out").acquire()


def test_a_holder_on_another_machine_holds_until_its_lease_runs_out(tmp_path):
    target, path = tmp_path / "run.zarr", lock_path(tmp_path / "run.zarr")
    path.write_bytes(holder_record(host="gpu-node-7", pid=12345))
    with pytest.raises(MoekdError) as refused:
        WriterLock(target, "--out").acquire()
    message = str(refused.value)
    assert (
        "pid 12345 on gpu-node-7" in message
        and f"expires {locking.LEASE_SECONDS} s after its last heartbeat" in message
    )
    assert str(path) in message
    old = time.time() - locking.LEASE_SECONDS - 5
    os.utime(path, (old, old))  # its heartbeat stopped a lease ago
    with WriterLock(target, "--out"):
        assert json.loads(path.read_bytes())["host"] == locking.HOST
    path.write_bytes(holder_record(boot_id="another-boot"))  # this hostname before a reboot, or a namesake
    with pytest.raises(MoekdError, match="expires"):
        WriterLock(target, "--out").acquire()


def test_the_heartbeat_keeps_the_lease_and_a_lost_lock_is_noticed(tmp_path, monkeypatch):
    monkeypatch.setattr(locking, "HEARTBEAT_SECONDS", 0.05)
    target, path = tmp_path / "run.zarr", lock_path(tmp_path / "run.zarr")
    lock = WriterLock(target, "--out")
    lock.acquire()
    old = time.time() - 1000
    os.utime(path, (old, old))
    time.sleep(0.5)
    assert time.time() - path.stat().st_mtime < 5
    lock.verify()
    path.write_bytes(holder_record(host="gpu-node-7", pid=12345))  # taken over after we fell silent
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime > 900, "the heartbeat touched another holder's lock"
    with pytest.raises(MoekdError, match=r"lost its lock on .*\(taken over by .*pid 12345 on gpu-node-7"):
        lock.verify()
    lock.release()
    assert path.exists(), "release removed another holder's lock"


def test_shard_jobs_run_side_by_side_and_exclude_whole_store_writers(tmp_path):
    target = tmp_path / "run.zarr"
    with WriterLock(target, "--out", (0, 2)), WriterLock(target, "--out", (1, 2)):
        with pytest.raises(MoekdError, match=r"another moekd shard job 0/2 \("):
            WriterLock(target, "--out", (0, 2)).acquire()
        with pytest.raises(MoekdError, match=r"another moekd shard job 0/2 \("):
            WriterLock(target, "STORE").acquire()  # cache finalize, or a build without --shard
        assert not lock_path(target).exists()
    with WriterLock(target, "STORE"):
        with pytest.raises(MoekdError, match=r"another moekd \("):
            WriterLock(target, "--out", (1, 2)).acquire()
        assert not lock_path(target, (1, 2)).exists()
    killed = FORK.Process(target=_shard_and_die, args=(target,))
    killed.start()
    killed.join()
    assert lock_path(target, (0, 2)).exists()
    with WriterLock(target, "STORE"):  # a dead shard job's lock blocks nothing, and is cleared
        assert not lock_path(target, (0, 2)).exists()


def _shard_and_die(target) -> None:
    WriterLock(target, "--out", (0, 2)).acquire()
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_lock_that_cannot_be_written_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoekdError, match="--out: cannot create the lock file .*file/.run.lock"):
        WriterLock(tmp_path / "file" / "run", "--out").acquire()
    WriterLock(tmp_path / "never", "--out").release()  # never taken: nothing to do
    WriterLock(tmp_path / "never", "--out").verify()
