"""`moekd cache ...`: build, inspect and verify teacher caches."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from moekd.cache_builder.options import BuildOptions, recorded_build
from moekd.cli.app import cache_app, console
from moekd.options import command
from moekd.store.options import (
    FinalizeOptions,
    InfoOptions,
    PackOptions,
    PullOptions,
    PushOptions,
    VerifyOptions,
)


@command(cache_app, "build", BuildOptions, recorded=recorded_build)
def cache_build(options: BuildOptions) -> None:
    """Run the teacher once per example and sample and write its sparse distributions to a Zarr store.

    Example: moekd cache build --teacher ./teacher --data train.jsonl --out run.zarr --k 64

    With a SAR router: moekd cache build --teacher ./teacher --data train.jsonl --out sar.zarr --policy sar --router router.safetensors

    Example: moekd cache build --teacher ./teacher --data train.jsonl --out sampled.zarr --encoding sampled --draws 32

    On several GPUs: torchrun --standalone --nproc-per-node 8 -m moekd -- cache build ... (one teacher per rank;
    the -- stops torchrun from reading moekd's flags, such as --m, as its own).
    As a job array: moekd cache build ... --shard $I/$N in each job, then moekd cache finalize run.zarr
    """
    from moekd.cache_builder.build import build_cache
    from moekd.distributed import Ranks

    s = build_cache(options, console=Console(stderr=True))
    if not Ranks.from_env().main:
        return  # rank 0 prints the job's summary
    if s.already_complete:
        console.print(
            f"[green]already complete[/] {s.out}: built with the same settings; nothing to do", highlight=False
        )
        return
    ranks = f" by {s.ranks} ranks" if s.ranks > 1 else ""
    what = f"shard {s.shard} of {s.out}" if s.shard else f"wrote {s.out}"
    console.print(
        f"[green]{what}[/]: {s.examples} examples, {s.positions} positions x {s.samples} sample(s); "
        f"units {s.units_done}/{s.units_total} computed this run{ranks}; {s.teacher_tokens:,} teacher tokens at "
        f"{s.tokens_per_second:,.0f} tok/s; {s.wall_seconds:.1f} s total. "
        f"Truncated responses: {s.truncated_responses}. Skipped rows: {s.skipped or 'none'}.",
        highlight=False,
    )
    if s.shard:
        left = (
            f"{s.units_missing} unit(s) of other shards are still unwritten: run `moekd cache finalize {s.out}` "
            "once every shard is done"
            if s.units_missing
            else f"every unit is written: run `moekd cache finalize {s.out}`"
        )
        console.print(left, highlight=False)


@command(cache_app, "finalize", FinalizeOptions)
def cache_finalize(options: FinalizeOptions) -> None:
    """Commit a store built by --shard jobs: check every unit, write the manifest, mark it complete.

    Names the shards whose units are missing, so that only those are rerun.

    Example: moekd cache finalize run.zarr
    """
    from moekd.store.writer import finalize_store, store_state

    store = Path(options.store)
    if store_state(store) == "complete":
        console.print(f"[green]already complete[/] {store}", highlight=False)
        return
    meta, stats = finalize_store(store)
    console.print(
        f"[green]finalized[/] {store}: {meta.layout.num_examples} examples, {meta.layout.num_positions} positions x "
        f"{meta.layout.num_samples} sample(s) in {stats['units']} units; {stats['tokens']:,} teacher tokens over "
        f"{stats['seconds']:,.1f} teacher-seconds (all jobs)",
        highlight=False,
    )


@command(cache_app, "info", InfoOptions)
def cache_info(options: InfoOptions) -> None:
    """Summarise a store: metadata, examples, stored positions, sizes (from its manifest).

    On an unfinished build: how many units are written, with sizes per position over the positions written.

    Example: moekd cache info run.zarr
    """
    from rich.table import Table

    from moekd.store.info import store_info

    store = options.store
    info = store_info(store, options.storage_options)
    meta = info["meta"]
    table = Table(title=f"moekd cache {store}", show_header=False)
    rows = [
        ("status", describe_status(info)),
        ("schema", meta.schema_version),
        ("teacher", f"{meta.teacher.name_or_path} ({meta.teacher.architecture}, vocab {meta.teacher.vocab_size})"),
        (
            "experts",
            f"{meta.teacher.num_experts} per layer, top-{meta.teacher.experts_per_token}, {len(meta.teacher.moe_layers)} MoE layers"
            if meta.teacher.num_experts
            else "dense teacher",
        ),
        (
            "policy",
            f"{meta.policy.name} {meta.policy.params} M={meta.policy.samples} seed={meta.policy.seed}"
            + (f", {meta.policy.weighting} weighting" if meta.policy.weighting else ""),
        ),
        ("encoding", describe_encoding(meta.encoding)),
        ("dataset", f"{meta.dataset.source} ({meta.dataset.format}, {meta.dataset.template} template)"),
        ("examples", f"{meta.layout.num_examples:,}"),
        ("tokens", f"{meta.layout.num_tokens:,}"),
        ("stored positions", f"{meta.layout.num_positions:,} x {meta.layout.num_samples} sample(s)"),
        ("truncated / skipped", f"{meta.dataset.truncated_responses} / {meta.dataset.skipped or 0}"),
    ]
    if info["bytes_total"] is None:
        rows.append(("size", "unknown: an unfinished store has no manifest and this location gives no listing"))
    elif info["bytes_per_position"] is None:
        rows.append(("size", f"{info['bytes_total']:,} B (no unit written yet: no per-position figures)"))
    else:
        rows += [
            ("size", f"{info['bytes_total']:,} B"),
            ("bytes per position", f"{info['bytes_per_position']:.1f}"),
            (
                "bytes per position-sample",
                f"{info['distribution_bytes_per_position_sample']:.1f} ({meta.encoding.kind} arrays)"
                + (f" + {info['output_layer_bytes']:,} B once (output layer)" if info["output_layer_bytes"] else "")
                + (f" + {info['gate_bytes_per_position_sample']:.1f} (gates)" if meta.gates else ""),
            ),
        ]
    rows.append(("built", f"{meta.build.created_at} -> {meta.build.completed_at} on {meta.build.device}"))
    for name, size in info["bytes_per_array"].items():
        rows.append((f"  {name}", f"{size:,} B"))
    for key, value in rows:
        table.add_row(key, str(value))
    Console().print(table)


def describe_status(info: dict) -> str:
    meta = info["meta"]
    if meta.build.status == "complete":
        return "complete"
    if info["units_written"] is None:
        return "unfinished: this location gives no listing, so the units written are unknown"
    return (
        f"unfinished: {info['units_written']}/{info['units_total']} units written ({info['positions_written']:,} of "
        f"{meta.layout.num_positions:,} positions); per-position figures over the written positions"
    )


def describe_encoding(encoding) -> str:
    from moekd.encodings import encoding_of

    return encoding_of(encoding).describe(encoding)


@command(cache_app, "verify", VerifyOptions)
def cache_verify(options: VerifyOptions) -> None:
    """Check schema, structure and per-file checksums (and, with --deep, every value). Exit 1 on any problem.

    Example: moekd cache verify run.zarr --deep
    """
    from moekd.store.verify import verify_store

    store, deep = options.store, options.deep
    report = verify_store(store, deep=deep, storage_options=options.storage_options)
    if report.ok:
        checked = f", {report.positions_checked:,} positions decoded" if deep else ""
        Console().print(f"[green]OK[/] {store}: {report.files_checked} files match the manifest{checked}")
        return
    for problem in report.problems:
        console.print(f"[red]FAIL[/] {problem}", highlight=False)
    console.print(f"[bold red]{store}: {len(report.problems)} problem(s)[/]")
    raise typer.Exit(1)


@command(cache_app, "push", PushOptions)
def cache_push(options: PushOptions) -> None:
    """Copy a complete store to object storage, each file checked against the manifest on arrival.

    An interrupted push resumes (intact files are kept); the destination reads as a store only once
    every file is there (the root metadata goes last).

    Example: moekd cache push run.zarr s3://team-bucket/caches/run.zarr
    """
    _copy(options.store, options.url, options.storage_options, options.jobs, "push")


@command(cache_app, "pull", PullOptions)
def cache_pull(options: PullOptions) -> None:
    """Copy a complete store from a URL into a local directory, checksum-verified; an interrupted pull resumes.

    Example: moekd cache pull s3://team-bucket/caches/run.zarr ./run.zarr
    """
    _copy(options.url, options.directory, options.storage_options, options.jobs, "pull")


def _copy(source: str, destination: str, options: dict | None, jobs: int, verb: str) -> None:
    from moekd.store.location import is_url
    from moekd.store.transfer import copy_store

    r = copy_store(
        source,
        destination,
        options if is_url(source) else None,
        options if is_url(destination) else None,
        jobs=jobs,
        verb=verb,
        console=Console(stderr=True),
    )
    console.print(
        f"[green]{verb}ed[/] {source} -> {destination}: {r.files} files verified against the manifest; "
        f"{r.copied} copied ({r.bytes_copied:,} B), {r.kept} already there",
        highlight=False,
    )


@command(cache_app, "pack", PackOptions)
def cache_pack(options: PackOptions) -> None:
    """Pack a complete store into one .zip that CacheReader, `cache verify` and `train --cache` open directly.

    Example: moekd cache pack run.zarr run.zip
    """
    from moekd.store.transfer import pack_store

    store, out = options.store, Path(options.out)
    r = pack_store(store, out, options.storage_options, console=Console(stderr=True))
    console.print(
        f"[green]packed[/] {store} -> {out}: {r.files} files ({r.bytes_copied:,} B) verified against the manifest",
        highlight=False,
    )
