"""Copying complete stores between places: `cache push` / `cache pull` (any two locations) and `cache pack` (one .zip).

- Only complete stores are copied, and only the files their manifest names; every file is
  checked against its manifest sha256 on arrival: hashed as it is written, and read back from a
  remote destination. A corrupted or truncated file is an error naming it.
- Transfers run in parallel (threads: fsspec filesystems are thread-safe) and stream in blocks,
  so memory stays at a few blocks per transfer.
- Resumable: a file already at the destination with the manifest's size and checksum is kept.
- A destination never reads as complete before every file is there: the manifest and then the
  root `zarr.json` (which says `status: complete`) are written last. Local files are written
  under a temporary name and renamed; object stores show an object only once its upload completed.
- One writer at a time: a local destination (a pull, a push to a directory) and a pack hold the
  lock of what they write (moekd/locking.py). Object storage offers no lock that every fsspec
  backend honours, so two pushes of one store to one URL may run at once: both upload the same
  bytes (each checked against the manifest before the object appears), neither deletes an object,
  and each commits only after every file was there intact, so the destination reads as complete
  only once it is. Pushes of different stores to one URL at once are not detected; see docs/locking.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from moekd.errors import MoekdError
from moekd.fsio import atomic_write, fsync_dir
from moekd.locking import WriterLock
from moekd.schemas import parse_metadata
from moekd.store.layout import MANIFEST, ROOT_META
from moekd.store.location import file_path, is_url, open_files
from moekd.store.root import moekd_attribute

BLOCK = 4 << 20


@dataclass
class TransferReport:
    files: int = 0
    copied: int = 0  # files transferred this run
    kept: int = 0  # files already at the destination, intact
    bytes_copied: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class _Source:
    fs: fsspec.AbstractFileSystem
    root: str
    root_meta: bytes  # the root zarr.json as stored
    manifest: bytes
    files: dict[str, dict]  # relative path -> {"size", "sha256"}
    manifest_sha256: str


def _open_complete(location: str, storage_options: dict | None, verb: str) -> _Source:
    fs, root = open_files(location, storage_options)
    try:
        root_meta = fs.cat_file(file_path(root, ROOT_META))
        meta = parse_metadata(moekd_attribute(root_meta), location)
    except FileNotFoundError:
        raise MoekdError(f"{verb}: {location} has no {ROOT_META}; it is not a moekd cache") from None
    except ValueError:
        raise MoekdError(
            f"{verb}: {location}/{ROOT_META} is not valid JSON; run `moekd cache verify {location}`"
        ) from None
    if meta.build.status != "complete":
        raise MoekdError(
            f"{verb}: {location} is an unfinished build (status {meta.build.status!r}); only complete caches are copied"
        )
    manifest = fs.cat_file(file_path(root, MANIFEST))
    if hashlib.sha256(manifest).hexdigest() != meta.build.manifest_sha256:
        raise MoekdError(
            f"{verb}: {location}/{MANIFEST} does not match the metadata's checksum; run `moekd cache verify {location}`"
        )
    return _Source(fs, root, root_meta, manifest, json.loads(manifest)["files"], meta.build.manifest_sha256)


class _Destination:
    """Where files go: a local directory (temporary name + fsync + rename) or an fsspec URL."""

    def __init__(self, location: str, storage_options: dict | None, verb: str):
        self.location, self.local = location, not is_url(location) or location.startswith("file://")
        if self.local:
            self.dir = Path(location.removeprefix("file://"))
            self.fs, self.root = fsspec.filesystem("file"), str(self.dir)
        else:
            self.fs, self.root = open_files(location, storage_options, must_exist=False)
            self.fs.invalidate_cache()  # listings cached earlier in this process may predate an interrupted copy
        self.verb = verb

    def check(self, source: _Source) -> None:
        """Refuse a destination that holds another store or unrelated files (never overwritten)."""
        try:
            raw = self.fs.cat_file(file_path(self.root, ROOT_META))
        except FileNotFoundError:
            raw = None
        if raw is not None:
            try:
                theirs = moekd_attribute(raw)["build"].get("manifest_sha256")
            except (ValueError, KeyError, TypeError):
                theirs = None
            if theirs != source.manifest_sha256:
                raise MoekdError(
                    f"{self.verb}: {self.location} already holds another store or other data; "
                    "choose another destination (it is never overwritten)"
                )
        if self.local and self.dir.exists():
            if not self.dir.is_dir():
                raise MoekdError(f"{self.verb}: {self.dir} exists and is not a directory")
            known = {*source.files, MANIFEST, ROOT_META}
            strangers = [
                p
                for p in self.dir.rglob("*")
                if p.is_file() and p.relative_to(self.dir).as_posix() not in known and not p.name.startswith(".")
            ]
            if strangers:
                raise MoekdError(
                    f"{self.verb}: {self.dir} holds files that are not part of this store (e.g. {strangers[0]}); "
                    "choose an empty or new directory"
                )

    def intact(self, rel: str, entry: dict) -> bool:
        path = file_path(self.root, rel)
        try:
            if self.fs.size(path) != entry["size"]:
                return False
        except FileNotFoundError:
            return False
        return _sha256(self.fs, path) == entry["sha256"]

    def write(self, rel: str, chunks, sha256: str) -> int:
        """Write the blocks of `chunks` to `rel`; the file appears only if their sha256 is `sha256` (an object
        that then reads back otherwise is reported, and replaced by the next push)."""
        h, size = hashlib.sha256(), 0
        if self.local:
            target = self.dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part-{os.getpid()}-{threading.get_ident()}")
            try:
                with open(tmp, "wb") as fh:
                    for block in chunks:
                        h.update(block)
                        size += fh.write(block)
                    fh.flush()
                    os.fsync(fh.fileno())
                if h.hexdigest() != sha256:
                    raise _Corrupted(rel)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            return size
        path = file_path(self.root, rel)
        fh = self.fs.open(path, "wb")
        try:
            for block in chunks:
                h.update(block)
                size += len(block)
                fh.write(block)
            if h.hexdigest() != sha256:  # as read from the source
                raise _Corrupted(rel)
        except BaseException:
            if hasattr(fh, "discard"):
                fh.discard()  # an aborted upload leaves no object (closing would commit the part written)
                fh.closed = True  # so that neither we nor its finaliser commit what was discarded
            raise
        fh.close()
        if _sha256(self.fs, path) != sha256:  # as stored at the destination
            # left for the next push to replace, never deleted: a concurrent push of this store may
            # be writing it, and may already have committed a destination that needs it
            raise _Corrupted(rel)
        return size

    def commit(self, source: _Source) -> None:
        """The manifest, then the root metadata: the destination reads as complete from here on."""
        for rel, data in ((MANIFEST, source.manifest), (ROOT_META, source.root_meta)):
            if self.local:
                self.dir.mkdir(parents=True, exist_ok=True)
                atomic_write(self.dir / rel, data)
            else:
                self.fs.pipe_file(file_path(self.root, rel), data)


class _Corrupted(Exception):
    pass


def _sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _blocks(fs, path: str, advance):
    with fs.open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            advance(len(block))
            yield block


def _progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True, quiet=True),
    )


def copy_store(
    source: str,
    destination: str,
    source_options: dict | None = None,
    destination_options: dict | None = None,
    jobs: int = 8,
    verb: str = "push",
    console: Console | None = None,
) -> TransferReport:
    """Copy the complete store at `source` to `destination` (see the module docstring)."""
    if jobs < 1:
        raise MoekdError(f"--jobs must be at least 1, got {jobs}")
    src = _open_complete(source, source_options, verb)
    dst = _Destination(destination, destination_options, verb)
    with WriterLock(dst.dir, f"{verb} destination") if dst.local else contextlib.nullcontext() as held:
        return _copy(src, dst, jobs, verb, source, destination, console, held)


def _copy(
    src: _Source,
    dst: _Destination,
    jobs: int,
    verb: str,
    source: str,
    destination: str,
    console: Console | None,
    held: WriterLock | None,
) -> TransferReport:
    dst.check(src)
    report = TransferReport(files=len(src.files))
    lock = threading.Lock()
    with _progress(console) as progress:
        task = progress.add_task(verb, total=sum(e["size"] for e in src.files.values()))

        def transfer(rel: str, entry: dict) -> None:
            if dst.intact(rel, entry):
                progress.advance(task, entry["size"])
                with lock:
                    report.kept += 1
                return
            try:
                size = dst.write(
                    rel, _blocks(src.fs, file_path(src.root, rel), lambda n: progress.advance(task, n)), entry["sha256"]
                )
            except _Corrupted:
                with lock:
                    report.problems.append(
                        f"{rel}: checksum mismatch against the manifest (corrupted at the source or in transit)"
                    )
                return
            except FileNotFoundError:
                with lock:
                    report.problems.append(f"{rel}: missing at the source")
                return
            with lock:
                report.copied += 1
                report.bytes_copied += size

        pool = ThreadPoolExecutor(max_workers=jobs)
        try:
            for future in [pool.submit(transfer, rel, entry) for rel, entry in sorted(src.files.items())]:
                future.result()
        finally:  # on Ctrl-C, transfers not yet started are dropped; finished files stay for the resume
            pool.shutdown(wait=True, cancel_futures=True)
    if report.problems:
        shown = "; ".join(sorted(report.problems)[:5]) + (
            f" (+{len(report.problems) - 5} more)" if len(report.problems) > 5 else ""
        )
        raise MoekdError(
            f"{verb}: {len(report.problems)} file(s) failed: {shown}. {destination} is left without its root "
            f"metadata, so it does not read as a store; rerun to resume once the source is intact "
            f"(`moekd cache verify {source}`)"
        )
    if held is not None:
        held.verify()
    dst.commit(src)
    return report


def pack_store(
    source: str, out: str | Path, source_options: dict | None = None, console: Console | None = None
) -> TransferReport:
    """One uncompressed .zip holding the store's files (a Zarr ZipStore), written whole or not at all."""
    out = Path(out)
    if out.suffix != ".zip":
        raise MoekdError(f"pack: {out} must end in .zip (readers recognise packed stores by it)")
    with WriterLock(out, "pack") as lock:
        if out.exists():
            raise MoekdError(f"pack: {out} exists; remove it or choose another name (it is never overwritten)")
        return _pack(_open_complete(source, source_options, "pack"), source, out, console, lock)


def _pack(src: _Source, source: str, out: Path, console: Console | None, lock: WriterLock) -> TransferReport:
    report = TransferReport(files=len(src.files))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        # chunks are compressed already: stored, not deflated, so that readers can seek into members
        with (
            zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
            _progress(console) as progress,
        ):
            task = progress.add_task("pack", total=sum(e["size"] for e in src.files.values()))
            for rel, entry in sorted(src.files.items()):
                h = hashlib.sha256()
                with zf.open(rel, "w", force_zip64=entry["size"] > 2**31) as member:
                    for block in _blocks(src.fs, file_path(src.root, rel), lambda n: progress.advance(task, n)):
                        h.update(block)
                        member.write(block)
                if h.hexdigest() != entry["sha256"]:
                    raise MoekdError(
                        f"pack: {rel}: checksum mismatch against the manifest; run `moekd cache verify {source}`"
                    )
                report.copied += 1
                report.bytes_copied += entry["size"]
            zf.writestr(MANIFEST, src.manifest)
            zf.writestr(ROOT_META, src.root_meta)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        lock.verify()
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return report
