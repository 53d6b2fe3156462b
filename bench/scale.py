"""Scale-out throughput, measured side by side in one run.

    python bench/scale.py --json bench/results/scale.json     # ~25 minutes on this shared 2-core CPU
    python bench/scale.py --quick                             # a smaller workload, for a smoke run

Prints, on one workload (the built-in synthetic suite, a tiny Mixtral-style teacher, a Llama student):
- cache build, teacher tokens/s over all ranks, for 1 process x 1 thread, 1 process x 2 threads and
  `torchrun` 2 ranks x 1 thread; per-rank efficiency = 2-rank rate / (2 x the 1-rank 1-thread rate);
- training tokens/s (DDP over the same global batches), the same three ways;
- remote reads: the training loader's batches (one read per array per batch) from the store in a
  local directory, behind an S3-compatible server (moto, its own process on loopback) and behind a
  static HTTP server (werkzeug, in this process), interleaved; batches/s and the ratio to local.
Every configuration runs as its own command (as a user runs it) and the repeats are interleaved;
the best repeat of each is reported, because this machine's speed drifts. On a 2-core machine two
ranks of one thread each use both cores, as one process with two threads does: the 2-rank rows say
what splitting the work across processes costs or gains there, not what a second GPU would add.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.servers: the loopback HTTP server of the tests

import numpy as np  # noqa: E402
import torch  # noqa: E402

CONFIGS = {  # name -> (ranks, threads per rank)
    "1 rank x 1 thread": (1, 1),
    "1 rank x 2 threads": (1, 2),
    "2 ranks x 1 thread": (2, 1),
}


def moekd(ranks: int, threads: int, args: list[str]) -> str:
    """Run a moekd command (under torchrun for several ranks); its stderr, whitespace-normalised."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        if ranks > 1
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    run = subprocess.run([*launcher, "-m", "moekd", *args], env=env, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise SystemExit(f"moekd {' '.join(args[:2])} failed:\n{run.stderr[-3000:]}")
    return " ".join(run.stderr.split())


def rate(text: str, pattern: str) -> float:
    return float(re.search(pattern, text).group(1).replace(",", ""))


def setup(work: Path, a) -> dict:
    from moekd.data.prompts import format_prompt
    from moekd.data.records import load_records
    from moekd.data.synth import write_suite
    from moekd.data.tokenizer import train_tokenizer
    from moekd.tiny_models import make_tiny_model

    write_suite(work / "data", seed=0, n_train=a.examples, n_valid=10, n_test=10)
    records = load_records(work / "data" / "train.jsonl").records
    tokenizer = train_tokenizer([format_prompt(r) + r.response for r in records], vocab_size=a.vocab)
    make_tiny_model("mixtral", tokenizer, work / "teacher", seed=1, hidden=a.teacher_hidden, layers=a.teacher_layers)
    make_tiny_model("llama", tokenizer, work / "student", seed=2, hidden=a.student_hidden)
    return {
        "data": work / "data" / "train.jsonl",
        "teacher": work / "teacher",
        "student": work / "student",
        "vocab": len(tokenizer),
    }


def build_args(paths: dict, out: Path, a) -> list[str]:
    return [
        "cache",
        "build",
        "--teacher",
        str(paths["teacher"]),
        "--data",
        str(paths["data"]),
        "--out",
        str(out),
        "--k",
        str(a.k),
        "--batch-tokens",
        str(a.build_batch_tokens),
        "--positions-per-shard",
        str(a.positions_per_shard),
        "--max-prompt-len",
        "192",
        "--max-len",
        "256",
        "--device",
        "cpu",
    ]


def measure_builds(paths: dict, work: Path, a) -> dict:
    best: dict[str, dict] = {}
    for repeat in range(a.repeats):
        for name, (ranks, threads) in CONFIGS.items():
            out = work / "build.zarr"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            text = moekd(ranks, threads, build_args(paths, out, a))
            wall = time.perf_counter() - t0
            tokens_per_s = rate(text, r"teacher tokens at ([\d,]+) tok/s")
            if tokens_per_s > best.get(name, {}).get("tokens_per_s", 0):
                best[name] = {"tokens_per_s": tokens_per_s, "command_seconds": round(wall, 2)}
            print(
                f"  build  {name:20s} repeat {repeat}: {tokens_per_s:>10,.0f} teacher tok/s, command {wall:.1f} s",
                flush=True,
            )
    shutil.copytree(work / "build.zarr", work / "cache.zarr")  # kept for the training and read measurements
    return best


def measure_training(paths: dict, cache: Path, work: Path, a) -> dict:
    best: dict[str, dict] = {}
    for repeat in range(a.repeats):
        for name, (ranks, threads) in CONFIGS.items():
            out = work / "run"
            shutil.rmtree(out, ignore_errors=True)
            text = moekd(
                ranks,
                threads,
                [
                    "train",
                    "--cache",
                    str(cache),
                    "--student",
                    str(paths["student"]),
                    "--out",
                    str(out),
                    "--max-steps",
                    str(a.train_steps),
                    "--batch-tokens",
                    str(a.train_batch_tokens),
                    "--lr",
                    "1e-3",
                    "--eval-fraction",
                    "0",
                    "--save-every",
                    "0",
                    "--workers",
                    "0",
                    "--device",
                    "cpu",
                ],
            )
            tokens_per_s = rate(text, r"tokens at ([\d,]+) tok/s")
            best[name] = max(
                best.get(name, {"tokens_per_s": 0}), {"tokens_per_s": tokens_per_s}, key=lambda r: r["tokens_per_s"]
            )
            print(f"  train  {name:20s} repeat {repeat}: {tokens_per_s:>10,.0f} tok/s", flush=True)
    return best


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, dict]:
    """moto's S3-compatible server in its own process on loopback, and the fsspec options that reach it."""
    import fsspec

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    options = {
        "key": "bench",
        "secret": "bench",
        "skip_instance_cache": True,
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
    }
    deadline = time.time() + 60
    while True:
        try:
            fsspec.filesystem("s3", **options).mkdir("bench")
            return server, options
        except OSError as e:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit(
                    "moto's S3 server did not start (is moto[server] installed? pip install -e '.[test]')"
                ) from e
            time.sleep(0.3)


def read_batches(location: str, options: dict | None, plan: list) -> float:
    """Seconds to read and decode `plan`'s training batches through the loader (no workers)."""
    from moekd.distill.loader import BatchDataset
    from moekd.distill.sources import CacheSource
    from moekd.store.reader import CacheReader

    dataset = BatchDataset(CacheSource(CacheReader(location, options)), pad_id=0)
    t0 = time.perf_counter()
    for item in plan:
        dataset[item]
    return time.perf_counter() - t0


def measure_reads(cache: Path, a) -> dict:
    from moekd.store.reader import CacheReader
    from moekd.store.transfer import copy_store
    from moekd.training.order import BatchOrder
    from tests.servers import http_server

    reader = CacheReader(cache)
    shards = reader.position_offsets[:-1] // reader.meta.layout.positions_per_shard
    order = BatchOrder(np.arange(len(reader)), reader.example_lengths(), shards, a.train_batch_tokens, seed=0)
    plan = [item for item, _ in zip(order, range(a.read_batches))]
    tokens = sum(int(reader.example_lengths()[list(examples)].sum()) for _, _, examples in plan)
    server, s3 = start_moto()
    best = {"local": np.inf, "s3": np.inf, "http": np.inf}
    try:
        copy_store(str(cache), "s3://bench/cache.zarr", destination_options=s3)
        with http_server(cache.parent) as (base, _):
            locations = {
                "local": (str(cache), None),
                "s3": ("s3://bench/cache.zarr", s3),
                "http": (f"{base}/{cache.name}", None),
            }
            for repeat in range(a.repeats):
                for name, (location, options) in locations.items():
                    seconds = read_batches(location, options, plan)
                    best[name] = min(best[name], seconds)
                    print(f"  read   {name:6s} repeat {repeat}: {len(plan) / seconds:8.1f} batches/s", flush=True)
    finally:
        server.kill()
        server.wait()
    return {
        name: {"batches_per_s": len(plan) / s, "tokens_per_s": tokens / s, "vs_local": best["local"] / s}
        for name, s in best.items()
    } | {"batches": len(plan), "tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=1500, help="Training records of the synthetic suite.")
    p.add_argument("--vocab", type=int, default=2000, help="BPE vocabulary trained on them.")
    p.add_argument(
        "--teacher-hidden", type=int, default=256, help="Teacher hidden size (Mixtral-style, 8 experts, top-2)."
    )
    p.add_argument("--teacher-layers", type=int, default=4, help="Teacher layers.")
    p.add_argument("--student-hidden", type=int, default=128, help="Student hidden size (Llama-style, 2 layers).")
    p.add_argument("--k", type=int, default=32, help="Teacher ids stored per position.")
    p.add_argument("--build-batch-tokens", type=int, default=4096, help="Padded tokens per teacher forward.")
    p.add_argument(
        "--positions-per-shard", type=int, default=2048, help="Positions per unit (units are dealt to ranks)."
    )
    p.add_argument("--train-batch-tokens", type=int, default=2048, help="Padded tokens per global training batch.")
    p.add_argument("--train-steps", type=int, default=40, help="Optimizer steps per training run.")
    p.add_argument("--read-batches", type=int, default=100, help="Loader batches per read measurement.")
    p.add_argument("--repeats", type=int, default=2, help="Interleaved repeats of every configuration.")
    p.add_argument("--quick", action="store_true", help="A small workload for a smoke run.")
    p.add_argument("--json", type=Path, help="Also write the results here.")
    a = p.parse_args()
    if a.quick:
        a.examples, a.teacher_hidden, a.teacher_layers, a.train_steps, a.read_batches, a.repeats = 300, 64, 2, 8, 20, 1
        a.positions_per_shard = 512
    with tempfile.TemporaryDirectory(prefix="moekd-scale-") as tmp:
        work = Path(tmp)
        paths = setup(work, a)
        print(
            f"workload: {a.examples} examples, vocabulary {paths['vocab']}, teacher hidden {a.teacher_hidden} x "
            f"{a.teacher_layers} layers, student hidden {a.student_hidden}; {os.cpu_count()} CPU cores",
            flush=True,
        )
        builds = measure_builds(paths, work, a)
        training = measure_training(paths, work / "cache.zarr", work, a)
        reads = measure_reads(work / "cache.zarr", a)
        from moekd.store.reader import CacheReader

        layout = CacheReader(work / "cache.zarr").meta.layout
    base_build, base_train = builds["1 rank x 1 thread"]["tokens_per_s"], training["1 rank x 1 thread"]["tokens_per_s"]
    for table in (builds, training):
        base = table["1 rank x 1 thread"]["tokens_per_s"]
        for name, (ranks, _threads) in CONFIGS.items():
            table[name]["speedup"] = table[name]["tokens_per_s"] / base
            table[name]["per_rank_efficiency"] = table[name]["tokens_per_s"] / (ranks * base)
    print(
        f"\nstore: {layout.num_examples} examples, {layout.num_tokens:,} tokens, {layout.num_positions:,} positions, "
        f"{-(-layout.num_positions // layout.positions_per_shard)} units"
    )
    print(
        f"{'':22s} {'build tok/s':>12s} {'x 1 rank':>9s} {'per rank':>9s}   {'train tok/s':>12s} {'x 1 rank':>9s} {'per rank':>9s}"
    )
    for name in CONFIGS:
        b, t = builds[name], training[name]
        print(
            f"{name:22s} {b['tokens_per_s']:>12,.0f} {b['speedup']:>9.2f} {b['per_rank_efficiency']:>9.2f}   "
            f"{t['tokens_per_s']:>12,.0f} {t['speedup']:>9.2f} {t['per_rank_efficiency']:>9.2f}"
        )
    print(
        f"\nremote reads ({reads['batches']} training batches, {reads['tokens']:,} tokens, one read per array per batch):"
    )
    for name in ("local", "s3", "http"):
        r = reads[name]
        print(
            f"  {name:6s} {r['batches_per_s']:8.1f} batches/s {r['tokens_per_s']:>10,.0f} tok/s  {r['vs_local']:.2f} x local"
        )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(
            json.dumps(
                {
                    "machine": {
                        "platform": platform.platform(),
                        "cpus": os.cpu_count(),
                        "torch": torch.__version__,
                        "date": time.strftime("%Y-%m-%d"),
                    },
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                    "store": {
                        "examples": layout.num_examples,
                        "tokens": layout.num_tokens,
                        "positions": layout.num_positions,
                    },
                    "build": builds,
                    "train": training,
                    "reads": reads,
                    "base_rates": {"build": base_build, "train": base_train},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
