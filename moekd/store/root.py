"""The one reader of a store's root metadata (the `moekd` attribute of its root zarr.json) and of
its manifest, for local paths, packed .zip stores and fsspec URLs alike."""

from __future__ import annotations

import hashlib
import json

from moekd.errors import MoekdError
from moekd.schemas import parse_metadata
from moekd.schemas.cache import CacheMetadata
from moekd.store.layout import MANIFEST, ROOT_META
from moekd.store.location import file_path


def moekd_attribute(raw: bytes | str) -> dict | None:
    """The `moekd` attribute of root zarr.json bytes (None when it has none); ValueError when torn."""
    try:
        attributes = json.loads(raw).get("attributes", {})
        return attributes.get("moekd") if isinstance(attributes, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(str(e)) from None


def read_root(fs, root: str, location: str) -> dict | None:
    """The root metadata's `moekd` attribute, unvalidated; MoekdError when the file is missing or torn."""
    try:
        raw = fs.cat_file(file_path(root, ROOT_META))
    except (FileNotFoundError, NotADirectoryError):
        raise MoekdError(f"cache {location}: {ROOT_META} is missing: not a Zarr v3 store") from None
    try:
        return moekd_attribute(raw)
    except ValueError:
        raise MoekdError(f"cache {location}: {ROOT_META} is not valid JSON (truncated or corrupted)") from None


def read_metadata(fs, root: str, location: str) -> CacheMetadata:
    """The validated metadata of the store at `location` (see schemas.parse_metadata)."""
    return parse_metadata(read_root(fs, root, location), location)


def read_manifest(fs, root: str, meta: CacheMetadata) -> dict | None:
    """The manifest of a complete store, checked against the checksum in its metadata (None when it does not match)."""
    data = fs.cat_file(file_path(root, MANIFEST))
    if hashlib.sha256(data).hexdigest() != meta.build.manifest_sha256:
        return None
    return json.loads(data)
