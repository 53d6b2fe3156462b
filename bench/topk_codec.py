"""Bytes per position-sample of candidate top-k layouts, on the same teacher rows, side by side.

    python bench/topk_codec.py --teacher WORK/teacher/final --data WORK/data/train.jsonl
    python bench/topk_codec.py --random-teacher      # the 32k-vocabulary random teacher of bench/cache_build.py

Builds a top-k cache (k = 64, M = 1) and a KA cache (M = 2) of the teacher once, then re-encodes
their decoded arrays in each candidate layout and writes them with the store's own codecs,
chunking and sharding (moekd.store.writer.COMPRESSORS), measuring bytes on disk:
- `rank`:    ids in rank order (int32), u16 gaps below the top-1, delta-coded along k (the 1.0 layout);
- `sorted`:  ids ascending and delta-coded (int32), gaps in id order (u16, not delta-coded);
- `shared`:  (M > 1) one ascending id set per position, the union of the M samples' top-k (padded
             to M x k), each sample's log-probs over it (absent ids: a sentinel);
- `/S`:      log-prob steps of 1/S nat (S = 256 is the 1.0 layout; error 1/(2S) nat);
- `+u16`:    top-1 and tail log-probs as u16 steps below 0 at the same scale instead of float32.
k is also reported for 8, 16 and 32 (the first k of each row).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import zarr  # noqa: E402

from moekd import CacheReader  # noqa: E402
from moekd.cache_builder.build import BuildOptions, build_cache  # noqa: E402
from moekd.store.writer import COMPRESSORS  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "moekd" / "data" / "demo_instructions.jsonl"
U16 = np.iinfo(np.uint16).max


def stored_bytes(arrays: dict[str, np.ndarray], folder: Path) -> int:
    """Bytes on disk of `arrays` [P, ...] written like a store's position arrays (chunks 256, one shard)."""
    group = zarr.open_group(str(folder), mode="w", zarr_format=3)
    for name, value in arrays.items():
        rest = value.shape[1:]
        shard = (min(65536, -(-len(value) // 256) * 256), *rest)
        group.create_array(name, shape=value.shape, dtype=value.dtype, chunks=(256, *rest), shards=shard,
                           compressors=COMPRESSORS, fill_value=0, config={"write_empty_chunks": True})[...] = value
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "zarr.json")


def steps_below(reference: np.ndarray, logprobs: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.rint((reference - logprobs.astype(np.float64)) * scale), 0, U16 - 1).astype(np.int64)


def rank_layout(ids, logprobs, tail, scale, u16_scalars):
    top1 = logprobs[..., 0].astype(np.float64)
    steps = np.maximum.accumulate(steps_below(top1[..., None], logprobs, scale), axis=-1)
    out = {"ids": ids.astype(np.int32), "gaps": np.diff(steps, axis=-1, prepend=0).astype(np.uint16)}
    out.update(scalars(top1, tail, scale, u16_scalars))
    return out, top1[..., None] - steps / scale


def sorted_layout(ids, logprobs, tail, scale, u16_scalars):
    order = np.argsort(ids, axis=-1, kind="stable")
    ids_sorted = np.take_along_axis(ids, order, -1).astype(np.int64)
    lp_sorted = np.take_along_axis(logprobs, order, -1)
    top1 = logprobs[..., 0].astype(np.float64)
    steps = steps_below(top1[..., None], lp_sorted, scale)
    out = {"ids": np.diff(ids_sorted, axis=-1, prepend=0).astype(np.int32), "gaps": steps.astype(np.uint16)}
    out.update(scalars(top1, tail, scale, u16_scalars))
    decoded = np.empty_like(steps, dtype=np.float64)
    np.put_along_axis(decoded, order, top1[..., None] - steps / scale, -1)  # back to rank order
    return out, decoded


def shared_layout(ids, logprobs, tail, scale, u16_scalars):
    """[P, M, k] -> one ascending union [P, M*k] (padded) and per-sample steps over it (U16 = absent)."""
    P, M, k = ids.shape
    flat = ids.reshape(P, M * k).astype(np.int64)
    union = np.sort(flat, axis=-1)
    fresh = np.ones_like(union, dtype=bool)
    fresh[:, 1:] = union[:, 1:] != union[:, :-1]
    slot = np.cumsum(fresh, axis=-1) - 1
    packed = np.zeros_like(union)
    np.put_along_axis(packed, slot, union, -1)
    width = slot.max(axis=-1) + 1
    valid = np.arange(M * k)[None] < width[:, None]
    top1 = logprobs[..., 0].astype(np.float64)
    steps = np.full((P, M, M * k), U16, dtype=np.int64)
    # where each sample's id sits in its row's union (padding after the union holds 0, so search the valid prefix)
    padded = np.where(valid, packed, np.iinfo(np.int64).max)
    for m in range(M):
        where = np.stack([np.searchsorted(padded[p], ids[p, m]) for p in range(P)])
        np.put_along_axis(steps[:, m], where, steps_below(top1[:, m, None], logprobs[:, m], scale), -1)
    deltas = np.where(valid, np.diff(packed, axis=-1, prepend=0), 0)
    out = {"ids": deltas.astype(np.int32), "gaps": steps.astype(np.uint16)}
    out.update(scalars(top1, tail, scale, u16_scalars))
    return out, width


def scalars(top1, tail, scale, as_u16):
    if not as_u16:
        return {"top1": top1.astype(np.float32), "tail": tail.astype(np.float32)}
    return {"top1": steps_below(0.0, top1, scale).astype(np.uint16),
            "tail": np.where(np.isfinite(tail), steps_below(0.0, tail, scale), U16).astype(np.uint16)}


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
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral", 32000, hidden=128, layers=2, special_ids=ids)).eval()
    model.save_pretrained(str(folder / "teacher"))
    tokenizer.save_pretrained(str(folder / "teacher"))
    return folder / "teacher"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", help="a trained teacher checkpoint (e.g. bench/fidelity.py's)")
    ap.add_argument("--data", default=str(DEMO))
    ap.add_argument("--random-teacher", action="store_true", help="a random Mixtral-style teacher with a 32k vocabulary")
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="topk_codec_"))
    data = tmp / "data.jsonl"
    lines = Path(a.data).read_text().splitlines()
    data.write_text("\n".join((lines * (1 + a.examples // len(lines)))[:a.examples]) + "\n")
    teacher = a.teacher
    if a.random_teacher:
        teacher = random_teacher(tmp)
    elif teacher is None:
        ap.error("pass --teacher DIR or --random-teacher")
    caches = {}
    for name, policy in (("topk", {"policy": "topk"}), ("ka", {"policy": "ka", "policy_params": {"m": 2}})):
        out = tmp / f"{name}.zarr"
        build_cache(BuildOptions(teacher=str(teacher), data=str(data), out=str(out), k=64, device="cpu", **policy))
        r = CacheReader(out)
        d = r.read_positions(0, r.num_positions)
        caches[name] = (d["topk_ids"], d["topk_logprobs"], d["tail_logprob"])
    results = {}
    print(f"{'layout':<26}{'k':>4}{'M':>3}{'B/pos-sample':>14}{'max err nat':>13}")
    for cache, (ids_all, lp_all, tail_all) in caches.items():
        P, M, _ = ids_all.shape
        for k in (8, 16, 32, 64):
            ids, lp = ids_all[..., :k], lp_all[..., :k]
            # the tail of the first k from the stored top-64 and its tail (exact up to the codec)
            tail = np.log(np.exp(tail_all.astype(np.float64)) + np.exp(lp_all[..., k:].astype(np.float64)).sum(-1))
            for scale in (256.0, 64.0, 32.0, 16.0):
                for u16 in (False, True):
                    layouts = {"rank": rank_layout, "sorted": sorted_layout}
                    if M > 1:
                        layouts["shared"] = shared_layout
                    for layout, encode in layouts.items():
                        arrays, decoded = encode(ids, lp, tail, scale, u16)
                        size = stored_bytes(arrays, tmp / "probe")
                        err = "" if layout == "shared" else f"{np.abs(decoded - lp).max():.5f}"
                        label = f"{layout}/{scale:g}{'+u16' if u16 else ''}"
                        results[f"{cache} k={k} {label}"] = {"bytes": size / (P * M), "max_err": err}
                        print(f"{cache + ' ' + label:<26}{k:>4}{M:>3}{size / (P * M):>14.1f}{err:>13}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
