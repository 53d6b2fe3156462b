"""Bytes per position-sample of candidate top-k layouts, on the same teacher rows, side by side.

    python bench/topk_codec.py --teacher WORK/teacher/final --data WORK/data/train.jsonl
    python bench/topk_codec.py --random-teacher      # the 32k-vocabulary random teacher of bench/cache_build.py

Builds a top-k cache (k = 64, M = 1) and a KA cache (M = 2) of the teacher once, then re-encodes
their decoded arrays in each candidate layout and writes them with the store's own codecs and
chunking (moekd.store.writer.COMPRESSORS, 256 positions per chunk), measuring bytes on disk:
- `1.0`: ids in rank order (int32), float32 top-1, u16 gaps below it delta-coded along k, float32 tail;
- `sorted ids, f32 top-1`: ids ascending and delta-coded, the same top-1 and u16 gaps in id order;
- `1.1`: ids ascending and delta-coded, every log-prob and the tail as u16 steps below 0
  (what `cache build` writes), at 256, 64, 32 and 16 steps per nat (error 1/(2 x scale) nat);
- `1.1 + shared ids` (M > 1): one ascending id set per position, the union of the M samples' top-k.
k = 8, 16 and 32 take the first k of each stored row (tail: the top-64 tail plus the ids dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import zarr

from moekd import CacheReader
from moekd.cache_builder.build import BuildOptions, build_cache
from moekd.encodings.topk import NEG_INF_STEP, encode_logprobs, encode_topk
from moekd.store.writer import COMPRESSORS

DEMO = Path(__file__).resolve().parents[1] / "moekd" / "data" / "demo_instructions.jsonl"


def stored_bytes(arrays: dict[str, np.ndarray], folder: Path) -> int:
    """Bytes on disk of `arrays` [P, ...] written like a store's position arrays (chunks 256, one shard)."""
    group = zarr.open_group(str(folder), mode="w", zarr_format=3)
    for name, value in arrays.items():
        rest = value.shape[1:]
        shard = (min(65536, -(-len(value) // 256) * 256), *rest)
        group.create_array(
            name,
            shape=value.shape,
            dtype=value.dtype,
            chunks=(256, *rest),
            shards=shard,
            compressors=COMPRESSORS,
            fill_value=0,
            config={"write_empty_chunks": True},
        )[...] = value
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "zarr.json")


def layout_1_0(ids, logprobs, tail, scale):
    """Schema 1.0 (u16_gap_delta): rank-order ids, float32 top-1, u16 gaps below it delta-coded along k."""
    top1, gaps = encode_logprobs(logprobs)
    return {
        "topk_ids": ids.astype(np.int32),
        "topk_gaps": gaps,
        "top1_logprob": top1,
        "tail_logprob": tail.astype(np.float32),
    }


def layout_sorted_gaps(ids, logprobs, tail, scale):
    """Sorted, delta-coded ids with 1.0's float32 top-1 and u16 gaps (not delta-coded: no order along the ids)."""
    order = np.argsort(ids, axis=-1, kind="stable")
    steps = np.rint((logprobs[..., :1].astype(np.float64) - np.take_along_axis(logprobs, order, -1)) * scale)
    return {
        "topk_ids": encode_topk(ids, logprobs, tail, scale)["topk_ids"],
        "topk_gaps": steps.astype(np.uint16),
        "top1_logprob": logprobs[..., 0].astype(np.float32),
        "tail_logprob": tail.astype(np.float32),
    }


def layout_1_1(ids, logprobs, tail, scale):
    """Schema 1.1 (u16_steps_sorted_ids), as builds write it."""
    return encode_topk(ids, logprobs, tail, scale)


def layout_shared(ids, logprobs, tail, scale):
    """One ascending id set per position for the M samples (their union, padded to M x k), each sample's
    u16 steps over it (65535 where a sample does not hold the id)."""
    P, M, k = ids.shape
    union = np.sort(ids.reshape(P, M * k).astype(np.int64), axis=-1)
    fresh = np.ones_like(union, dtype=bool)
    fresh[:, 1:] = union[:, 1:] != union[:, :-1]
    slot = np.cumsum(fresh, axis=-1) - 1
    packed = np.zeros_like(union)
    np.put_along_axis(packed, slot, union, -1)
    valid = np.arange(M * k)[None] <= slot[:, -1:]
    padded = np.where(valid, packed, np.iinfo(np.int64).max)
    steps = np.full((P, M, M * k), NEG_INF_STEP, dtype=np.uint16)
    for m in range(M):
        where = np.stack([np.searchsorted(padded[p], ids[p, m]) for p in range(P)])
        np.put_along_axis(
            steps[:, m],
            where,
            encode_topk(ids[:, m], logprobs[:, m], tail[:, m], scale)["topk_steps"][
                np.arange(P)[:, None], np.argsort(np.argsort(ids[:, m], axis=-1), axis=-1)
            ],
            -1,
        )
    return {
        "topk_ids": np.where(valid, np.diff(packed, axis=-1, prepend=0), 0).astype(np.int32),
        "topk_steps": steps,
        "tail_steps": encode_topk(ids, logprobs, tail, scale)["tail_steps"],
    }


def random_teacher(folder: Path) -> Path:
    """The teacher of bench/cache_build.py: random Mixtral-style, hidden 128, 32,000-entry output layer."""
    import torch
    from transformers import AutoModelForCausalLM

    from moekd.data.prompts import format_prompt
    from moekd.data.records import load_records
    from moekd.data.tokenizer import train_tokenizer
    from moekd.tiny_models import tiny_config

    records = load_records(DEMO).records
    tokenizer = train_tokenizer([format_prompt(r) + r.response for r in records] * 4, 400, folder / "tok")
    torch.manual_seed(0)
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(
        tiny_config("mixtral", 32000, hidden=128, layers=2, special_ids=ids)
    ).eval()
    model.save_pretrained(str(folder / "teacher"))
    tokenizer.save_pretrained(str(folder / "teacher"))
    return folder / "teacher"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", help="a trained teacher checkpoint (e.g. bench/fidelity.py's)")
    ap.add_argument("--data", default=str(DEMO))
    ap.add_argument(
        "--random-teacher", action="store_true", help="a random Mixtral-style teacher with a 32k vocabulary"
    )
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="topk_codec_"))
    data = tmp / "data.jsonl"
    lines = Path(a.data).read_text().splitlines()
    data.write_text("\n".join((lines * (1 + a.examples // len(lines)))[: a.examples]) + "\n")
    teacher = a.teacher
    if a.random_teacher:
        teacher = random_teacher(tmp)
    elif teacher is None:
        ap.error("pass --teacher DIR or --random-teacher")
    caches = {}
    for name, policy in (("topk", {"policy": "topk"}), ("ka", {"policy": "ka", "policy_params": {"samples": 2}})):
        out = tmp / f"{name}.zarr"
        build_cache(BuildOptions(teacher=str(teacher), data=str(data), out=str(out), k=64, device="cpu", **policy))
        r = CacheReader(out)
        d = r.read_positions(0, r.num_positions)
        caches[name] = (d["topk_ids"], d["topk_logprobs"], d["tail_logprob"])
    results = {}
    print(f"{'cache':<6}{'layout':<22}{'scale':>6}{'k':>4}{'M':>3}{'B/pos-sample':>14}{'vs 1.0':>8}")
    for cache, (ids_all, lp_all, tail_all) in caches.items():
        P, M, _ = ids_all.shape
        for k in (8, 16, 32, 64):
            ids, lp = ids_all[..., :k], lp_all[..., :k]
            # the tail of the first k: the stored top-64's tail plus the ids k..63
            tail = np.log(np.exp(tail_all.astype(np.float64)) + np.exp(lp_all[..., k:].astype(np.float64)).sum(-1))
            layouts = [
                ("1.0 (rank ids, gaps)", layout_1_0, 256.0),
                ("sorted ids, f32 top-1", layout_sorted_gaps, 256.0),
            ]
            layouts += [("1.1 (sorted, steps)", layout_1_1, scale) for scale in (256.0, 64.0, 32.0, 16.0)]
            if M > 1:
                layouts += [("1.1 + shared ids", layout_shared, 256.0)]
            baseline = None
            for label, encode, scale in layouts:
                size = stored_bytes(encode(ids, lp, tail, scale), tmp / "probe") / (P * M)
                baseline = baseline or size
                results[f"{cache} k={k} {label} scale={scale:g}"] = size
                print(f"{cache:<6}{label:<22}{scale:>6g}{k:>4}{M:>3}{size:>14.1f}{size / baseline:>8.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
