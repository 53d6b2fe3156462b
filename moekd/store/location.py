"""Where a store is: a local directory, a packed `.zip`, or an fsspec URL (s3://, gs://, http(s)://, file://, ...).

Two views of the same location, both read-only:
- `open_group`: the root Zarr group, for arrays;
- `open_files`: an fsspec filesystem and the store's root in it, for whole files (metadata,
  manifest, checksums). Nothing here lists directories: HTTP servers do not give listings, so
  callers name the files they want (the manifest names every file of a complete store).
`storage_options` go to fsspec (credentials, endpoints, {"anon": true}, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import zarr
from zarr.storage import ZipStore

from moekd.errors import MoekdError


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def is_zip(location: str | Path) -> bool:
    return str(location).rstrip("/").endswith(".zip")


def parse_storage_options(text: str | None, flag: str = "--storage-options") -> dict | None:
    """`--storage-options '{"anon": true}'` -> a dict (None when not given)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise MoekdError(
            f"{flag}: not valid JSON ({e.msg} at character {e.pos}); "
            """pass an object such as '{"anon": true}'"""
        ) from None
    if not isinstance(value, dict):
        raise MoekdError(f"{flag}: must be a JSON object of fsspec options, got {type(value).__name__}")
    return value


def _missing_backend(location: str, e: ImportError) -> MoekdError:
    return MoekdError(
        f"cache {location}: the fsspec backend for this URL is not installed ({e}); "
        "install it, e.g. `pip install s3fs` for s3://, `aiohttp` for http(s)://, `gcsfs` for gs://"
    )


def _zip_url(location: str, storage_options: dict | None) -> tuple[str, dict]:
    """A `.zip` behind a URL, as fsspec's chained zip:: URL with the options of its protocol."""
    protocol = location.split("://", 1)[0]
    return f"zip://::{location}", {protocol: storage_options or {}}


def open_group(location: str | Path, storage_options: dict | None = None):
    """The store's root group, read-only; a clear error when nothing is there."""
    location = str(location)
    if not is_url(location) and not Path(location).exists():
        raise MoekdError(f"cache {location} does not exist")
    try:
        if is_zip(location) and not is_url(location):
            return zarr.open_group(ZipStore(location, mode="r"), mode="r")
        if is_zip(location):
            url, options = _zip_url(location, storage_options)
            return zarr.open_group(url, mode="r", storage_options=options)
        return zarr.open_group(location, mode="r", storage_options=storage_options if is_url(location) else None)
    except ImportError as e:
        raise _missing_backend(location, e) from None
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as e:
        raise MoekdError(f"cache {location} is not a readable Zarr v3 group ({e})") from None


def open_files(
    location: str | Path, storage_options: dict | None = None, must_exist: bool = True
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root) for reading the store's files as `fs.cat_file(f"{root}/{name}")`; with
    `must_exist`, a clear error when nothing is there (where the filesystem can tell: not over HTTP)."""
    location = str(location)
    if must_exist and not is_url(location) and not Path(location).exists():
        raise MoekdError(f"cache {location} does not exist")
    try:
        if is_zip(location):
            if is_url(location):
                url, options = _zip_url(location, storage_options)
                fs, _ = fsspec.core.url_to_fs(url, **options)
            else:
                if not Path(location).is_file():
                    raise MoekdError(f"cache {location} does not exist")
                fs = fsspec.filesystem("zip", fo=location)
            return fs, ""
        fs, root = fsspec.core.url_to_fs(location, **(storage_options or {}))
        if must_exist and is_url(location) and can_list(fs) and not fs.exists(root):
            raise MoekdError(f"cache {location} does not exist")
    except ImportError as e:
        raise _missing_backend(location, e) from None
    return fs, root.rstrip("/")


def file_path(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


def can_list(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether listing this filesystem tells what files exist (HTTP servers give no listings)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return not {"http", "https"} & set(protocols)


def list_files(fs, root: str) -> dict[str, int]:
    """Relative path -> size of every file under `root` (for filesystems that can list)."""
    found = {}
    for path, info in fs.find(root, detail=True).items():
        if info.get("type", "file") == "file":
            found[path[len(root) :].lstrip("/")] = info.get("size", 0)
    return found
