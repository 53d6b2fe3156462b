"""One writer at a time: the lock every moekd writer holds on what it writes.

Stores being built, resumed, finalized, pulled into or packed, and training run directories, each
have one writer. The writer holds `.NAME.lock` beside its output `NAME` (beside, not inside: a
store is published by renaming a whole directory onto `NAME`, and a run directory must stay empty
of strangers). A `cache build --shard I/N` job holds `.NAME.lock-shard-I-of-N` instead, so that the
jobs of one store run side by side while two jobs of one shard exclude each other; a whole-store
writer (a build without --shard, `cache finalize`) refuses while any shard job lives, and a shard
job refuses while a whole-store writer lives. Each side takes its own lock and then looks for the
other's, so two that start together may both refuse, never both proceed.

The lock file is a JSON record of its holder (host, pid, start time, command, and a random token).
It appears whole: the record is written to a temporary file that is then hard-linked to the lock
name, which fails when the name exists (atomic on local filesystems and on NFS, unlike O_EXCL on
old NFS clients). A holder is alive when
- it runs on this machine (same hostname and boot id) and its pid exists, is no zombie and started
  at the recorded time (not a reused pid) -- checked at once, so a SIGKILLed writer blocks nothing;
- it runs elsewhere and its lock file was touched less than LEASE_SECONDS ago: a thread of the
  holder touches it every HEARTBEAT_SECONDS. A holder gone silent for the lease is taken to be dead.
A dead holder's lock is taken over: renamed to a name of our own, checked to be the very file that
was judged dead (else it is put back), then removed. A writer that finds its lock taken over (it
was silent past the lease, e.g. stopped or cut off from the filesystem) stops at its next check.

Why not the `filelock` package: its FileLock (flock) and SoftFileLock (O_EXCL) record nothing about
the holder, so they can neither name it nor tell a dead holder from a live one on another machine,
and flock is unreliable or absent on some shared filesystems (Lustre mounted noflock/localflock).
See docs/locking.md for what this guarantees on shared filesystems.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from moekd.errors import MoekdError

LEASE_SECONDS = 300  # a holder on another machine is dead once its lock file is this old
HEARTBEAT_SECONDS = 30  # how often a holder touches its lock file


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


HOST = socket.gethostname()
BOOT_ID = (_read_text("/proc/sys/kernel/random/boot_id") or "").strip() or None


def _process_start(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc (None where there is none)."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name before it may hold spaces
    return fields[0], int(fields[19])


def _process_alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    found = _process_start(pid)
    if found is None:
        return True  # no /proc: the pid exists, which is all that can be known
    state, ticks = found
    return state not in ("Z", "X") and (started is None or ticks == started)


def _command() -> str:
    """This process's command line: `moekd ARGS` for moekd's console script and `python -m moekd` alike."""
    program = Path(sys.argv[0])
    command = shlex.join([program.parent.name if program.name == "__main__.py" else program.name, *sys.argv[1:]])
    return command if len(command) <= 300 else command[:297] + "..."


def lock_path(target: Path, shard: tuple[int, int] | None = None) -> Path:
    suffix = f"-shard-{shard[0]}-of-{shard[1]}" if shard else ""
    return target.with_name(f".{target.name}.lock{suffix}")


def _parse(raw: bytes | None) -> dict:
    try:
        record = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _alive(record: dict, age: float) -> bool:
    if record.get("host") == HOST and record.get("boot_id") == BOOT_ID and isinstance(record.get("pid"), int):
        return _process_alive(record["pid"], record.get("process_start"))
    return age < LEASE_SECONDS


def _remove_if_same(path: Path, raw: bytes) -> None:
    """Remove the lock file at `path` if it still holds `raw`, without ever removing another's."""
    grave = path.with_name(f"{path.name}.gone-{HOST}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return
    try:
        if grave.read_bytes() != raw:  # a new holder took the lock in between: give it back
            # unless a third writer took the free name meanwhile: the displaced one finds out at its next check
            with contextlib.suppress(FileExistsError):
                os.link(grave, path)
    finally:
        grave.unlink()


def _live_holder(path: Path) -> dict | None:
    """The record of the live holder of the lock at `path`; None when it is free (a dead holder's lock is removed)."""
    try:
        raw = path.read_bytes()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    record = _parse(raw)
    if _alive(record, age):
        return {**record, "age": age}
    _remove_if_same(path, raw)
    return None


def describe(record: dict) -> str:
    if not record.get("pid"):
        return "a writer whose lock record cannot be read"
    return (
        f"`{record.get('command', '?')}`, pid {record['pid']} on {record.get('host', '?')} "
        f"since {record.get('started', '?')}"
    )


class WriterLock:
    """The lock of one writer of `target` (a store, a shard of one, a run directory, a pack); `flag` names
    the flag or argument that gave `target`, for messages. Use `with` or acquire()/release(); a lock never
    acquired (the other ranks of a torchrun job, for which rank 0 holds it) verifies and releases as a no-op."""

    def __init__(self, target: str | Path, flag: str, shard: tuple[int, int] | None = None):
        self.target, self.flag, self.shard = Path(target), flag, shard
        self.path = lock_path(self.target, shard)
        self._raw: bytes | None = None  # the lock file's content while we hold it
        self._stop = threading.Event()  # stops the heartbeat of the current hold

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or refuse (MoekdError) naming its live holder and what to do."""
        record = {
            "host": HOST,
            "boot_id": BOOT_ID,
            "pid": os.getpid(),
            "process_start": (_process_start(os.getpid()) or (None, None))[1],
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": _command(),
            "token": secrets.token_hex(8),
        }
        raw = json.dumps(record, indent=1).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(5):
                if self._create(raw):
                    break
                holder = _live_holder(self.path)
                if holder is not None:
                    raise self._refusal(holder)
            else:
                raise MoekdError(f"{self.flag}: other writers of {self.target} keep taking its lock; retry")
        except OSError as e:
            raise MoekdError(f"{self.flag}: cannot create the lock file {self.path}: {e.strerror}") from None
        self._raw, self._stop = raw, threading.Event()
        try:
            self._check_the_other_side()
        except BaseException:
            self.release()
            raise
        beat = threading.Thread(target=self._heartbeat, args=(raw, self._stop), name=f"moekd-lock {self.path.name}")
        beat.daemon = True
        beat.start()

    def _create(self, raw: bytes) -> bool:
        """Publish `raw` at the lock name whole, by hard link; False when the name is taken."""
        tmp = self.path.with_name(f"{self.path.name}.new-{HOST}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            with open(tmp, "xb") as fh:
                fh.write(raw)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return os.stat(tmp).st_nlink == 2  # NFS: a retried link whose first try succeeded
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _check_the_other_side(self) -> None:
        """A shard job refuses while a whole-store writer lives, a whole-store writer while any shard job does."""
        if self.shard is None:
            shard_lock = re.compile(re.escape(self.path.name) + r"-shard-\d+-of-\d+")
            others = sorted(p for p in self.path.parent.iterdir() if shard_lock.fullmatch(p.name))
        else:
            others = [lock_path(self.target)]
        for other in others:
            holder = _live_holder(other)
            if holder is not None:
                raise self._refusal(holder, other)

    def _refusal(self, holder: dict, path: Path | None = None) -> MoekdError:
        path = path or self.path
        shard = re.search(r"-shard-(\d+)-of-(\d+)$", path.name)
        what = f"shard job {shard[1]}/{shard[2]} " if shard else ""
        if holder.get("host") == HOST and holder.get("boot_id") == BOOT_ID:
            todo = "wait for it to end or stop it (the lock of a process that has ended is taken over at once)"
        else:
            todo = (
                f"wait for it to end or stop it; if that machine is gone, the lock expires {LEASE_SECONDS} s after its "
                f"last heartbeat ({holder['age']:.0f} s ago), or delete {path} once you are sure it is"
            )
        return MoekdError(
            f"{self.flag}: {self.target} is being written by another moekd {what}({describe(holder)}); {todo}"
        )

    def _heartbeat(self, raw: bytes, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                if self.path.read_bytes() == raw:
                    os.utime(self.path)
            except OSError:
                pass  # a filesystem that hiccups: the lease tolerates missed beats

    def verify(self) -> None:
        """Refuse to go on once the lock is no longer ours (taken over after this process fell silent past the lease)."""
        if self._raw is None:
            return
        try:
            current = self.path.read_bytes()
        except FileNotFoundError:
            current = None
        if current != self._raw:
            holder = _parse(current)
            by = f"taken over by {describe(holder)}" if holder else "its lock file was removed"
            raise MoekdError(
                f"{self.flag}: this process lost its lock on {self.target} ({by}); it stopped before writing more. "
                "Run one writer at a time"
            )

    def release(self) -> None:
        self._stop.set()
        if self._raw is not None:
            _remove_if_same(self.path, self._raw)
            self._raw = None
