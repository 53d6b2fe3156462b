"""The settings of the store commands (`cache info`, `verify`, `finalize`, `push`, `pull`, `pack`)."""

from __future__ import annotations

from dataclasses import dataclass

from moekd.options import option
from moekd.store.location import parse_storage_options

STORE_HELP = "Store: a directory, a packed .zip, or an fsspec URL (s3://, gs://, http(s)://, file://)."
OPTIONS_HELP = """fsspec options for a URL as JSON, e.g. '{"anon": true}' or '{"client_kwargs": {"endpoint_url": "http://minio:9000"}}'."""
JOBS_HELP = "Files transferred in parallel."


def storage_option(help: str = OPTIONS_HELP):
    return option(None, help, parse=parse_storage_options)


@dataclass
class InfoOptions:
    store: str = option(help=STORE_HELP, argument=True)
    storage_options: dict | None = storage_option()


@dataclass
class VerifyOptions:
    store: str = option(help=STORE_HELP, argument=True)
    deep: bool = option(False, "Also decode every value and check its range.")
    storage_options: dict | None = storage_option()


@dataclass
class FinalizeOptions:
    store: str = option(help="Store whose units were written by `cache build --shard I/N` jobs.", argument=True)


@dataclass
class PushOptions:
    store: str = option(help="Complete store to copy (a directory, .zip or URL).", argument=True)
    url: str = option(help="Destination URL, e.g. s3://bucket/run.zarr (or a directory).", argument=True)
    storage_options: dict | None = storage_option(OPTIONS_HELP + " Applies to every URL given.")
    jobs: int = option(8, JOBS_HELP)


@dataclass
class PullOptions:
    url: str = option(help="Complete store to copy, e.g. s3://bucket/run.zarr or https://host/run.zarr.", argument=True)
    directory: str = option(help="Local directory to copy it into (new, empty, or an interrupted pull).", argument=True)
    storage_options: dict | None = storage_option()
    jobs: int = option(8, JOBS_HELP)


@dataclass
class PackOptions:
    store: str = option(help="Complete store to pack (a directory or URL).", argument=True)
    out: str = option(help="The .zip to write (a Zarr zip store).", argument=True)
    storage_options: dict | None = storage_option()
