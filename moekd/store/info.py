"""Summarising a store (`moekd cache info`): its metadata and sizes, complete or not.

Works on local paths, packed .zip stores and fsspec URLs alike, like verify.py.
"""

from __future__ import annotations

from moekd.encodings import teacher_arrays
from moekd.errors import MoekdError
from moekd.store.layout import BUILD_DIR, MANIFEST, ROOT_META, plan_units, unit_marker
from moekd.store.location import can_list, list_files, open_files
from moekd.store.root import read_manifest, read_metadata


def store_info(location: str, storage_options: dict | None = None) -> dict:
    """Metadata summary, sizes and build progress of a store (complete or not).

    Sizes come from the manifest of a complete store; an unfinished one has none, so they are
    taken from a listing where the filesystem gives one (None otherwise, e.g. over HTTP), and so
    are its committed units (those with a marker). Its position arrays hold only those units, so
    per-position figures divide their data by the positions written, while what the plan wrote
    whole (metadata, example tables, output layer) still divides by every planned position:
    mid-build, the figures estimate the finished store's.
    """
    fs, root = open_files(location, storage_options)
    meta = read_metadata(fs, root, location)
    layout = meta.layout
    units = plan_units(layout.num_positions, layout.positions_per_shard)
    info = {
        "meta": meta,
        "units_total": len(units),
        "units_written": None,
        "positions_written": None,
        "bytes_total": None,
        "bytes_per_array": {},
        "bytes_per_position": None,
        "distribution_bytes_per_position_sample": None,
        "output_layer_bytes": None,
        "gate_bytes_per_position_sample": None,
    }
    if meta.build.status == "complete":
        manifest = read_manifest(fs, root, meta)
        if manifest is None:
            raise MoekdError(
                f"cache {location}: {MANIFEST} does not match the metadata's checksum; run `moekd cache verify`"
            )
        sizes = {rel: entry["size"] for rel, entry in manifest["files"].items()}
        written = units
    elif can_list(fs):
        listing = list_files(fs, root)
        sizes = {rel: size for rel, size in listing.items() if not rel.startswith(BUILD_DIR + "/")}
        written = [unit for unit in units if unit_marker(unit) in listing]
    else:
        return info
    arrays: dict[str, int] = {}
    unit_data: dict[str, int] = {}  # per position array, the units' data (its metadata file comes with the plan)
    for rel, size in sizes.items():
        top, _, rest = rel.partition("/")
        if top in layout.arrays:
            arrays[top] = arrays.get(top, 0) + size
            if layout.arrays[top].dims[0] == "position" and rest != ROOT_META:
                unit_data[top] = unit_data.get(top, 0) + size
    total = sum(sizes.values())
    positions = sum(unit.stop - unit.start for unit in written)
    info.update(
        {
            "units_written": len(written),
            "positions_written": positions,
            "bytes_total": total,
            "bytes_per_array": dict(sorted(arrays.items())),
            "output_layer_bytes": arrays.get("output_layer", 0),
        }
    )
    if not positions:
        return info  # no unit written yet: nothing to divide

    def per_position(names: list[str], size: int) -> float:
        """`size` bytes (of arrays `names` and more) per position: the units' data over the positions written."""
        data = sum(unit_data.get(name, 0) for name in names)
        return data / positions + (size - data) / max(layout.num_positions, 1)

    teacher, gates = teacher_arrays(meta.encoding), meta.gates.arrays if meta.gates else []
    info.update(
        {
            "bytes_per_position": per_position(list(unit_data), total),
            "distribution_bytes_per_position_sample": per_position(teacher, sum(arrays.get(n, 0) for n in teacher))
            / layout.num_samples,
            "gate_bytes_per_position_sample": per_position(gates, sum(arrays.get(n, 0) for n in gates))
            / layout.num_samples,
        }
    )
    return info
