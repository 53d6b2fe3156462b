"""Crash-safe, resumable writing of a store.

Protocol (every step survives SIGKILL at any moment):
1. `settings.json` in the build directory records what determines the store's content; a resume
   with other settings is refused, naming the fields that differ.
2. The group, all arrays at their final shapes and the per-example tables are written, then
   `init.done` marks the layout as complete (an interrupted init is redone from scratch).
3. Each unit (one position shard of every position array) is written whole, then an atomic
   marker with the sha256 of its data commits it. On resume, units whose data no longer matches
   their marker are redone.
4. Finalize: per-file sha256 manifest (files fsynced), then the root `zarr.json` is replaced
   atomically with `status: complete` -- the single commit point of the store.
Markers, the manifest and the root metadata are written here with write-to-temp + fsync +
rename (zarr's LocalStore renames too but never fsyncs), and the temporary files of writes a
crash interrupted are removed before the manifest is made.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from moekd.errors import MoekdError
from moekd.schemas import parse_metadata
from moekd.schemas.cache import CacheMetadata
from moekd.store.layout import BUILD_DIR, MANIFEST, ROOT_META, Unit, chunking, plan_units, position_arrays

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


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sha256_file(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
        if fsync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def hash_arrays(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def store_state(path: Path) -> str:
    """'absent', 'empty', 'complete', 'unfinished' (ours, not complete) or 'foreign'."""
    if not path.exists():
        return "absent"
    if not path.is_dir():
        return "foreign"
    root = path / ROOT_META
    try:
        raw = json.loads(root.read_text()).get("attributes", {}).get("moekd") if root.exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raw = None  # torn by a crash during init: the build directory below tells whose it is
    if isinstance(raw, dict) and raw.get("format") == "moekd-teacher-cache" and raw.get("build", {}).get("status") == "complete":
        return "complete"
    if (path / BUILD_DIR / "settings.json").exists():
        return "unfinished"
    return "empty" if not any(path.iterdir()) else "foreign"


def _remove_store(path: Path) -> None:
    """Delete a store so that no kill midway can leave a partial store that still reads as complete:
    it is renamed away (atomically) first."""
    doomed = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


class CacheWriter:
    """Writes one store; `open` creates it or picks up an unfinished build."""

    def __init__(self, path: Path, meta: CacheMetadata):
        self.path = path
        self.meta = meta
        self.build_dir = path / BUILD_DIR
        self.units = plan_units(meta.layout.num_positions, meta.layout.positions_per_shard)
        self.position_names = position_arrays(meta.layout.arrays)

    @classmethod
    def open(cls, path: str | Path, meta: CacheMetadata, settings: dict, tables: ExampleTables,
             resume: bool = False, overwrite: bool = False, fixed_arrays: dict[str, np.ndarray] | None = None) -> "CacheWriter":
        path = Path(path)
        state = store_state(path)
        if state == "foreign":
            raise MoekdError(f"--out: {path} exists and is not a moekd cache; choose a new path (it is never deleted)")
        if state == "complete" and not overwrite:
            raise MoekdError(f"--out: {path} is a complete cache; pass --overwrite to replace it")
        if state == "unfinished" and not (resume or overwrite):
            raise MoekdError(f"--out: an unfinished build is at {path}; pass --resume to continue it or --overwrite to start again")
        if state in ("complete", "unfinished") and overwrite:
            _remove_store(path)
            state = "absent"
        writer = cls(path, meta)
        if state == "unfinished" and (path / BUILD_DIR / "init.done").exists():
            writer._check_settings(settings)
            stored = json.loads((path / ROOT_META).read_text())["attributes"]["moekd"]
            writer.meta = parse_metadata(stored, str(path))  # keeps the original creation time
            return writer
        if state == "unfinished":  # killed during init: nothing of value is there yet
            _remove_store(path)
        writer._init(settings, tables, fixed_arrays or {})
        return writer

    def _check_settings(self, settings: dict) -> None:
        old = json.loads((self.build_dir / "settings.json").read_text())
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if differ:
            lines = "; ".join(f"{k}: {old.get(k)!r} in the store, {settings.get(k)!r} now" for k in differ)
            raise MoekdError(f"--resume: the unfinished build at {self.path} used other settings ({lines}); "
                             "rerun with the store's settings or pass --overwrite to start again")

    def _init(self, settings: dict, tables: ExampleTables, fixed_arrays: dict[str, np.ndarray]) -> None:
        try:
            (self.build_dir / "units").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MoekdError(f"--out: cannot create {self.path}: {e.strerror}") from None
        atomic_write(self.build_dir / "settings.json", json.dumps(settings, indent=1, sort_keys=True).encode())
        group = zarr.open_group(str(self.path), mode="a", zarr_format=3)
        group.attrs["moekd"] = self.meta.model_dump(mode="json")
        shard = self.meta.layout.positions_per_shard
        for name, spec in self.meta.layout.arrays.items():
            chunks, shards = chunking(spec, shard)
            group.create_array(
                name, shape=tuple(spec.shape), dtype=spec.dtype, chunks=chunks, shards=shards,
                compressors=COMPRESSORS, fill_value=0, config={"write_empty_chunks": True},
            )
        values = {
            "input_ids": tables.input_ids,
            "example_token_offsets": tables.token_offsets,
            "example_position_offsets": tables.position_offsets,
            "example_prompt_len": tables.prompt_len,
            "example_source_index": tables.source_index,
            **fixed_arrays,  # arrays of the encoding that do not depend on the teacher's passes
        }
        for name, value in values.items():
            group[name][...] = value
        atomic_write(self.build_dir / "init.done", b"")

    def _marker(self, unit: Unit) -> Path:
        return self.build_dir / "units" / f"{unit.index:06d}.json"

    def read_unit(self, unit: Unit) -> dict[str, np.ndarray]:
        group = zarr.open_group(str(self.path), mode="r")
        return {name: group[name][unit.start:unit.stop] for name in self.position_names}

    def pending_units(self) -> list[Unit]:
        """Units without a marker, or whose data no longer matches it (a torn write before a crash)."""
        pending = []
        for unit in self.units:
            marker = self._marker(unit)
            if not marker.exists() or json.loads(marker.read_text())["sha256"] != hash_arrays(self.read_unit(unit)):
                pending.append(unit)
        return pending

    def write_unit(self, unit: Unit, arrays: dict[str, np.ndarray]) -> None:
        if sorted(arrays) != self.position_names:
            raise ValueError(f"unit arrays {sorted(arrays)} != layout {self.position_names}")
        group = zarr.open_group(str(self.path), mode="r+")
        for name, value in arrays.items():
            expected = (unit.stop - unit.start, *self.meta.layout.arrays[name].shape[1:])
            if value.shape != expected:
                raise ValueError(f"{name}: shape {value.shape}, layout wants {expected}")
            group[name][unit.start:unit.stop] = value
        marker = {"start": unit.start, "stop": unit.stop, "sha256": hash_arrays(arrays)}
        atomic_write(self._marker(unit), json.dumps(marker).encode())

    def finalize(self, wall_seconds: float) -> CacheMetadata:
        missing = [u.index for u in self.units if not self._marker(u).exists()]
        if missing:
            raise MoekdError(f"cannot finalize {self.path}: units {missing[:10]} are not written; rerun with --resume")
        for stray in [*self.path.rglob("*.partial"), *self.path.rglob(".*.tmp-*")]:
            stray.unlink()  # temporary files of writes a crash interrupted
        files = {}
        for file in sorted(p for p in self.path.rglob("*") if p.is_file()):
            rel = file.relative_to(self.path).as_posix()
            if rel in (ROOT_META, MANIFEST) or rel.startswith(BUILD_DIR + "/"):
                continue
            files[rel] = {"size": file.stat().st_size, "sha256": sha256_file(file, fsync=True)}
        manifest = json.dumps({"files": files}, indent=1, sort_keys=True).encode()
        atomic_write(self.path / MANIFEST, manifest)
        build = self.meta.build.model_copy(update={
            "status": "complete",
            "completed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": round(wall_seconds, 3),
            "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        })
        meta = self.meta.model_copy(update={"build": build})
        root_path = self.path / ROOT_META
        root = json.loads(root_path.read_text())
        root.setdefault("attributes", {})["moekd"] = meta.model_dump(mode="json")
        atomic_write(root_path, json.dumps(root, indent=2).encode())  # the commit point
        shutil.rmtree(self.build_dir, ignore_errors=True)
        self.meta = parse_metadata(meta.model_dump(mode="json"), str(self.path))
        return self.meta
