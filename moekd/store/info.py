"""Summarising a store (`moekd cache info`): its metadata and sizes, complete or not.

Works on local paths, packed .zip stores and fsspec URLs alike, like verify.py.
"""

from __future__ import annotations

from moekd.errors import MoekdError
from moekd.schemas import parse_metadata
from moekd.store.layout import BUILD_DIR, MANIFEST
from moekd.store.location import can_list, list_files, open_files
from moekd.store.reader import teacher_arrays
from moekd.store.verify import read_manifest, read_root


def store_info(location: str, storage_options: dict | None = None) -> dict:
    """Metadata summary and sizes of a store (complete or not).

    Sizes come from the manifest of a complete store; an unfinished one has none, so they are
    taken from a listing where the filesystem gives one (None otherwise, e.g. over HTTP).
    """
    fs, root = open_files(location, storage_options)
    meta = parse_metadata(read_root(fs, root, location), location)
    sizes = None
    if meta.build.status == "complete":
        manifest = read_manifest(fs, root, meta)
        if manifest is None:
            raise MoekdError(
                f"cache {location}: {MANIFEST} does not match the metadata's checksum; run `moekd cache verify`"
            )
        sizes = {rel: entry["size"] for rel, entry in manifest["files"].items()}
    elif can_list(fs):
        sizes = {rel: size for rel, size in list_files(fs, root).items() if not rel.startswith(BUILD_DIR + "/")}
    info = {
        "meta": meta,
        "bytes_total": None,
        "bytes_per_array": {},
        "bytes_per_position": None,
        "distribution_bytes_per_position_sample": None,
        "output_layer_bytes": None,
        "gate_bytes_per_position_sample": None,
    }
    if sizes is None:
        return info
    arrays: dict[str, int] = {}
    for rel, size in sizes.items():
        top = rel.split("/")[0]
        if top in meta.layout.arrays:
            arrays[top] = arrays.get(top, 0) + size
    total = sum(sizes.values())
    positions = meta.layout.num_positions
    position_samples = max(positions * meta.layout.num_samples, 1)
    gates = meta.gates.arrays if meta.gates else []
    info.update(
        {
            "bytes_total": total,
            "bytes_per_array": dict(sorted(arrays.items())),
            "bytes_per_position": total / max(positions, 1),
            "distribution_bytes_per_position_sample": sum(arrays.get(name, 0) for name in teacher_arrays(meta.encoding))
            / position_samples,
            "output_layer_bytes": arrays.get("output_layer", 0),
            "gate_bytes_per_position_sample": sum(arrays.get(name, 0) for name in gates) / position_samples,
        }
    )
    return info
