"""Crash-safe, resumable writing of a store.

Protocol (every step survives SIGKILL at any moment, in any number of processes on any number
of machines sharing the store's filesystem):
1. Plan: the whole store is laid out in a private directory beside `--out` -- `settings.json`
   (what determines the store's content), `split.json` (how units are shared out), the group,
   every array at its final shape, the per-example tables, `init.done` -- fsynced, then published
   with one atomic rename. A store at `--out` is therefore either absent or fully planned, and
   when several jobs plan at once exactly one rename wins; the others join the winner's plan.
   Joining with other settings is refused, naming the fields that differ.
2. Each unit (one position shard of every position array) is written whole by exactly one
   process, then an atomic marker with the sha256 of its data commits it; no two units share a
   file. Units whose data no longer matches their marker are redone. One job writes a store at a
   time (moekd/locking.py: a build holds the store's lock, each --shard job its shard's; the
   ranks of a torchrun job share rank 0's), so no two processes ever write the same unit.
3. Finalize (once, by the holder of the store's lock): every unit is checked against its marker, the per-file
   sha256 manifest is written (files fsynced; it also records the build settings, so that
   `--resume` on the complete store can tell whether the settings match), then the root
   `zarr.json` is replaced atomically with `status: complete` -- the single commit point.
Markers, the manifest and the root metadata are written here with write-to-temp + fsync +
rename (zarr's LocalStore renames too but never fsyncs), and the temporary files of writes a
crash interrupted are removed before the manifest is made -- only under the store's lock, with no
shard job alive, so that they cannot belong to a live writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from moekd.errors import MoekdError
from moekd.fsio import atomic_write, fsync_dir, fsync_tree, hash_arrays, setting_differences, sha256_file
from moekd.locking import WriterLock
from moekd.schemas import parse_metadata
from moekd.schemas.cache import CacheMetadata
from moekd.store.layout import BUILD_DIR, MANIFEST, ROOT_META, Unit, chunking, plan_units, position_arrays, unit_marker
from moekd.store.root import moekd_attribute

COMPRESSORS = (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec())


@dataclass
class ExampleTables:
    """What the build knows before the teacher runs: tokens and where each example's positions go."""

    input_ids: np.ndarray  # int32 [T]
    token_offsets: np.ndarray  # int64 [E+1]
    position_offsets: np.ndarray  # int64 [E+1]
    prompt_len: np.ndarray  # int32 [E]
    source_index: np.ndarray  # int64 [E]
    target_positions: np.ndarray  # int32 [P]


def store_state(path: Path) -> str:
    """'absent', 'empty', 'complete', 'unfinished' (ours, not complete) or 'foreign'."""
    if not path.exists():
        return "absent"
    if not path.is_dir():
        return "foreign"
    root = path / ROOT_META
    try:
        raw = moekd_attribute(root.read_bytes()) if root.exists() else None
    except ValueError:
        raw = None  # torn: the build directory below tells whose it is
    if (
        isinstance(raw, dict)
        and raw.get("format") == "moekd-teacher-cache"
        and raw.get("build", {}).get("status") == "complete"
    ):
        return "complete"
    if (path / BUILD_DIR / "settings.json").exists():
        return "unfinished"
    return "empty" if not any(path.iterdir()) else "foreign"


def recorded_settings(path: Path) -> dict | None:
    """The build settings a complete store was made with (None for stores made before they were recorded)."""
    manifest = path / MANIFEST
    return json.loads(manifest.read_text()).get("build_settings") if manifest.is_file() else None


def _split(shards: int | None) -> str:
    return f"as {shards} --shard jobs" if shards else "without --shard"


def _remove_store(path: Path) -> None:
    """Delete a store so that no kill midway can leave a partial store that still reads as complete:
    it is renamed away (atomically) first."""
    doomed = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


class CacheWriter:
    """Writes the units of one store; `open` plans it or joins a planned one, `finalize` commits it."""

    def __init__(self, path: Path, meta: CacheMetadata):
        self.path = path
        self.meta = meta
        self.build_dir = path / BUILD_DIR
        self.units = plan_units(meta.layout.num_positions, meta.layout.positions_per_shard)
        self.position_names = position_arrays(meta.layout.arrays)

    @classmethod
    def open(
        cls,
        path: str | Path,
        meta: CacheMetadata,
        settings: dict,
        tables: ExampleTables,
        resume: bool = False,
        overwrite: bool = False,
        shards: int | None = None,
        fixed_arrays: dict[str, np.ndarray] | None = None,
        build_files: dict[str, bytes] | None = None,
    ) -> CacheWriter:
        """Plan a new store at `path`, or continue the unfinished one there.

        `shards`: the store is built by that many independent `--shard i/n` jobs, which join an
        unfinished store without `--resume` (one of them planned it). `fixed_arrays`: arrays of the
        encoding that do not depend on the teacher's passes (the hidden encoding's output layer),
        written with the plan. `build_files`: files kept in the build directory with the plan (the
        build's options, for a resume that repeats no flag)."""
        path = Path(path)
        state = store_state(path)
        if state == "foreign":
            raise MoekdError(f"--out: {path} exists and is not a moekd cache; choose a new path (it is never deleted)")
        if state == "complete" and not overwrite:
            raise MoekdError(f"--out: {path} is a complete cache; pass --overwrite to replace it")
        if state == "unfinished" and not (resume or overwrite or shards):
            raise MoekdError(
                f"--out: an unfinished build is at {path}; pass --resume to continue it or --overwrite to start again"
            )
        if state in ("complete", "unfinished") and overwrite:
            _remove_store(path)
            state = "absent"
        if state in ("absent", "empty") and cls._plan(
            path, meta, settings, tables, shards, fixed_arrays or {}, build_files or {}
        ):
            return cls(path, meta)
        if state in ("absent", "empty") and not shards:
            raise MoekdError(
                f"--out: another build created {path} meanwhile; run one build per store (or use --shard i/n)"
            )
        return cls.join(path, settings, shards)

    @classmethod
    def planned(cls, path: str | Path) -> CacheWriter:
        """The planned, unfinished store at `path`, as it is."""
        path = Path(path)
        if store_state(path) != "unfinished" or not (path / BUILD_DIR / "init.done").is_file():
            raise MoekdError(
                f"{path} is not a planned, unfinished moekd build (no {BUILD_DIR}/init.done: it is complete, "
                "not a moekd cache, or its planning by an older moekd was interrupted; pass --overwrite to start again)"
            )
        stored = moekd_attribute((path / ROOT_META).read_bytes())
        return cls(path, parse_metadata(stored, str(path)))  # keeps the original creation time

    @classmethod
    def join(cls, path: str | Path, settings: dict, shards: int | None = None) -> CacheWriter:
        """The planned, unfinished store at `path`, after checking that it is built with `settings` and split the same way."""
        writer = cls.planned(path)
        differ = setting_differences(
            json.loads((writer.build_dir / "settings.json").read_text()), settings, where="the store"
        )
        if differ:
            raise MoekdError(
                f"--resume: the unfinished build at {path} used other settings ({'; '.join(differ)}); "
                "rerun with the store's settings or pass --overwrite to start again"
            )
        if writer.shards != shards:
            hint = (
                f"run its unfinished shards with --shard I/{writer.shards}"
                if writer.shards
                else "continue it with --resume and no --shard"
            )
            raise MoekdError(
                f"--shard: the build at {path} is planned {_split(writer.shards)}, not {_split(shards)}; {hint}"
            )
        return writer

    @classmethod
    def _plan(
        cls,
        path: Path,
        meta: CacheMetadata,
        settings: dict,
        tables: ExampleTables,
        shards: int | None,
        fixed_arrays: dict[str, np.ndarray],
        build_files: dict[str, bytes],
    ) -> bool:
        """Lay the store out beside `path`, then publish it there by rename; False when another job published first."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MoekdError(f"--out: cannot create {path}: {e.strerror}") from None
        draft = path.with_name(f".{path.name}.plan-{socket.gethostname()}-{os.getpid()}")
        try:
            if draft.exists():
                shutil.rmtree(draft)
            (draft / BUILD_DIR / "units").mkdir(parents=True)
            for name, data in build_files.items():
                atomic_write(draft / BUILD_DIR / name, data)
            cls(draft, meta)._init(settings, tables, shards, fixed_arrays)
            fsync_tree(draft)
            try:
                os.rename(draft, path)  # atomic; refused when `path` is a non-empty directory
            except OSError:
                if store_state(path) in ("absent", "empty"):
                    raise
                shutil.rmtree(draft)
                return False
        except BaseException:
            shutil.rmtree(draft, ignore_errors=True)
            raise
        fsync_dir(path.parent)
        return True

    def _init(
        self, settings: dict, tables: ExampleTables, shards: int | None, fixed_arrays: dict[str, np.ndarray]
    ) -> None:
        atomic_write(self.build_dir / "settings.json", json.dumps(settings, indent=1, sort_keys=True).encode())
        atomic_write(self.build_dir / "split.json", json.dumps({"shards": shards}).encode())
        group = zarr.open_group(str(self.path), mode="a", zarr_format=3)
        group.attrs["moekd"] = self.meta.model_dump(mode="json")
        shard = self.meta.layout.positions_per_shard
        for name, spec in self.meta.layout.arrays.items():
            chunks, shards_shape = chunking(spec, shard)
            group.create_array(
                name,
                shape=tuple(spec.shape),
                dtype=spec.dtype,
                chunks=chunks,
                shards=shards_shape,
                compressors=COMPRESSORS,
                fill_value=0,
                config={"write_empty_chunks": True},
            )
        values = {
            "input_ids": tables.input_ids,
            "example_token_offsets": tables.token_offsets,
            "example_position_offsets": tables.position_offsets,
            "example_prompt_len": tables.prompt_len,
            "example_source_index": tables.source_index,
            **fixed_arrays,
        }
        for name, value in values.items():
            group[name][...] = value
        atomic_write(self.build_dir / "init.done", b"")

    @property
    def shards(self) -> int | None:
        """n when the store is built by --shard i/n jobs."""
        return json.loads((self.build_dir / "split.json").read_text())["shards"]

    def _marker(self, unit: Unit) -> Path:
        return self.path / unit_marker(unit)

    def read_unit(self, unit: Unit) -> dict[str, np.ndarray]:
        group = zarr.open_group(str(self.path), mode="r")
        return {name: group[name][unit.start : unit.stop] for name in self.position_names}

    def pending_units(self, units: list[Unit] | None = None) -> list[Unit]:
        """Those of `units` (default all) without a marker, or whose data no longer matches it (a torn write before a crash)."""
        pending = []
        for unit in self.units if units is None else units:
            marker = self._marker(unit)
            if not marker.exists() or json.loads(marker.read_text())["sha256"] != hash_arrays(self.read_unit(unit)):
                pending.append(unit)
        return pending

    def missing_units(self) -> list[Unit]:
        """Units without a marker (cheap: no data is read)."""
        return [u for u in self.units if not self._marker(u).exists()]

    def write_unit(self, unit: Unit, arrays: dict[str, np.ndarray], stats: dict | None = None) -> None:
        """Write one unit whole, then commit it with its marker; `stats` (teacher tokens, seconds, by whom) go into the marker."""
        if sorted(arrays) != self.position_names:
            raise ValueError(f"unit arrays {sorted(arrays)} != layout {self.position_names}")
        group = zarr.open_group(str(self.path), mode="r+")
        for name, value in arrays.items():
            expected = (unit.stop - unit.start, *self.meta.layout.arrays[name].shape[1:])
            if value.shape != expected:
                raise ValueError(f"{name}: shape {value.shape}, layout wants {expected}")
            group[name][unit.start : unit.stop] = value
        marker = {"start": unit.start, "stop": unit.stop, "sha256": hash_arrays(arrays), **(stats or {})}
        atomic_write(self._marker(unit), json.dumps(marker).encode())

    def unit_stats(self) -> dict[str, float]:
        """Teacher tokens and seconds summed over the committed units' markers (all processes that wrote them)."""
        totals = {"units": 0, "tokens": 0, "seconds": 0.0}
        for unit in self.units:
            if self._marker(unit).exists():
                marker = json.loads(self._marker(unit).read_text())
                totals["units"] += 1
                totals["tokens"] += marker.get("tokens", 0)
                totals["seconds"] += marker.get("seconds", 0.0)
        return totals

    def missing_message(self, missing: list[Unit]) -> str:
        indices = [u.index for u in missing]
        shown = ", ".join(map(str, indices[:10])) + (f" (+{len(indices) - 10} more)" if len(indices) > 10 else "")
        n = self.shards
        if n:
            shards = ", ".join(f"{i}/{n}" for i in sorted({u.index % n for u in missing}))
            return (
                f"{len(missing)} of {len(self.units)} units are not written (units {shown}): unfinished shards {shards}; "
                f"rerun each with `moekd cache build ... --shard I/{n}` (same flags), then `moekd cache finalize {self.path}`"
            )
        return f"{len(missing)} of {len(self.units)} units are not written (units {shown}); rerun `moekd cache build ... --resume`"

    def finalize(self, lock: WriterLock, wall_seconds: float | None = None) -> CacheMetadata:
        """Commit the store, holding its whole-store `lock`; `wall_seconds` defaults to the time since it was planned."""
        pending = self.pending_units()
        if pending:
            raise MoekdError(f"cannot finalize {self.path}: {self.missing_message(pending)}")
        lock.verify()  # no other writer lives, so every temporary file below is a dead one's
        for stray in [*self.path.rglob("*.partial"), *self.path.rglob(".*.tmp-*")]:
            stray.unlink(missing_ok=True)  # temporary files of writes a crash interrupted
        files = {}
        for file in sorted(p for p in self.path.rglob("*") if p.is_file()):
            rel = file.relative_to(self.path).as_posix()
            if rel in (ROOT_META, MANIFEST) or rel.startswith(BUILD_DIR + "/"):
                continue
            files[rel] = {"size": file.stat().st_size, "sha256": sha256_file(file, fsync=True)}
        settings = json.loads((self.build_dir / "settings.json").read_text())
        manifest = json.dumps({"files": files, "build_settings": settings}, indent=1, sort_keys=True).encode()
        atomic_write(self.path / MANIFEST, manifest)
        now = datetime.now(timezone.utc)
        if wall_seconds is None:
            wall_seconds = (now - datetime.fromisoformat(self.meta.build.created_at)).total_seconds()
        build = self.meta.build.model_copy(
            update={
                "status": "complete",
                "completed_at": now.isoformat(timespec="seconds"),
                "wall_seconds": round(wall_seconds, 3),
                "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            }
        )
        meta = self.meta.model_copy(update={"build": build})
        lock.verify()
        root_path = self.path / ROOT_META
        root = json.loads(root_path.read_text())
        root.setdefault("attributes", {})["moekd"] = meta.model_dump(mode="json")
        atomic_write(root_path, json.dumps(root, indent=2).encode())  # the commit point
        shutil.rmtree(self.build_dir, ignore_errors=True)
        self.meta = parse_metadata(meta.model_dump(mode="json"), str(self.path))
        return self.meta


def finalize_store(path: str | Path) -> tuple[CacheMetadata, dict]:
    """`moekd cache finalize`: commit a store whose units were written by --shard jobs (or any build)."""
    CacheWriter.planned(path)  # refuse what is no planned build before writing a lock beside it
    with WriterLock(path, "STORE") as lock:
        writer = CacheWriter.planned(path)  # as it is now that no one else writes it
        stats = writer.unit_stats()
        return writer.finalize(lock), stats
