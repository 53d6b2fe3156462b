"""Training throughput: distilling from the cache vs plain CE fine-tuning vs online KD with the teacher in memory.

    .venv/bin/python bench/train_throughput.py                 # ~1-2 min on 2 CPU cores
    .venv/bin/python bench/train_throughput.py --vocab 151936   # a Qwen-sized output layer
    .venv/bin/python bench/train_throughput.py --device cuda --hidden 512 --vocab 4000 --steps 50

Builds a tiny tokenizer, teacher (Mixtral) and student (Llama) and a top-k cache of the bundled
demo data, then runs the same batches three ways: (a) the trainer's step on the cached sparse
distributions (`batch_loss`: chunked KD from the hidden states), (b) the trainer's step with --loss ce,
(c) teacher forward + `dense_kd_loss` + student step. Step times come from one process running
the three interleaved batch by batch (machine speed drifts 2-10x over minutes, and this way the
drift hits all three alike); peak memory from a fresh process per method. The loader is timed
alone (worker processes reading and collating cache batches).
--vocab is the models' vocabulary: their embedding and output layer have that many rows, and
the teacher's distributions and the student's loss run over all of them. The tokenizer is
trained on the demo data (at most 4,000 tokens) and, above that, filled up to --vocab with
reserved tokens that no merge produces, as real checkpoints reserve ids (Llama 3's
`<|reserved_special_token_N|>`): they are in every distribution and loss but never inputs or labels.
Targets: cache-KD step time / CE step time <= 1.15; loader batches/s >= 5x the steps/s of (a).
Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also in the spawned processes

import numpy as np
import torch
from peak_memory import PeakMemory  # bench/peak_memory.py
from transformers import AutoModelForCausalLM

from moekd.data.prompts import format_prompt
from moekd.data.records import load_records
from moekd.distill.loader import BatchDataset, make_loader
from moekd.distill.losses import dense_kd_loss
from moekd.distill.objective import batch_loss
from moekd.distill.options import TrainOptions
from moekd.distill.sources import CacheSource
from moekd.distill.student import Student
from moekd.models import output_vocab_size
from moekd.store.reader import CacheReader
from moekd.training.order import BatchOrder

DATA = Path(__file__).resolve().parents[1] / "moekd" / "data" / "demo_instructions.jsonl"
WARMUP = 3
METHODS = ("cache", "ce", "online")
LOADER_BATCHES = 300  # enough to amortise the start of the worker processes
TOKENIZER_VOCAB = 4000  # the most a BPE tokenizer trained on the demo data is asked for


def build_artifacts(root: Path, a) -> dict[str, Path]:
    from moekd.cache_builder.build import BuildOptions, build_cache
    from moekd.data.tokenizer import train_tokenizer
    from moekd.tiny_models import make_tiny_model

    records = load_records(DATA).records
    tokenizer = train_tokenizer(
        [format_prompt(r) + r.response for r in records] * 4, vocab_size=min(a.vocab, TOKENIZER_VOCAB)
    )
    trained = len(tokenizer)
    tokenizer = with_reserved_tokens(tokenizer, a.vocab)
    paths = {name: root / name for name in ("teacher", "student", "cache")}
    make_tiny_model("mixtral", tokenizer, paths["teacher"], seed=1, hidden=2 * a.hidden, vocab_size=a.vocab)
    make_tiny_model("llama", tokenizer, paths["student"], seed=2, hidden=a.hidden, vocab_size=a.vocab)
    build_cache(
        BuildOptions(
            teacher=str(paths["teacher"]),
            data=str(DATA),
            out=str(paths["cache"]),
            k=a.k,
            max_prompt_len=128,
            max_len=256,
            device=a.device,
            positions_per_shard=1024,
        )
    )
    return paths, trained


def with_reserved_tokens(tokenizer, size: int):
    """`tokenizer` with vocabulary entries <reserved_i> up to `size` ids: in the vocabulary, never produced."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    vocab.update({f"<reserved_{i}>": i for i in range(len(vocab), size)})
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)),
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        bos_token=None,
    )


def batch_plan(cache: Path, a, count: int) -> list:
    """The first `count` training batches (epoch after epoch of the cache)."""
    source = CacheSource(CacheReader(cache))
    order = BatchOrder(np.arange(len(source)), source.lengths, source.shards, a.batch_tokens, seed=0)
    return [item for item, _ in zip(order, range(count))]


def load_batches(paths: dict, plan: list) -> list[dict]:
    dataset = BatchDataset(CacheSource(CacheReader(paths["cache"])), pad_id=0)
    return [dataset[item] for item in plan]  # read up front: the steps are timed, not the loader


def make_step(method: str, paths: dict, device: torch.device):
    """A function doing one optimizer step of `method` on a batch, with its own fresh student."""

    student = AutoModelForCausalLM.from_pretrained(str(paths["student"])).to(device).train()
    trainer_student = Student(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    options = TrainOptions(student="", out="", cache="", loss="ce" if method == "ce" else "fkl").kd_loss()
    teacher = (
        AutoModelForCausalLM.from_pretrained(str(paths["teacher"])).to(device).eval() if method == "online" else None
    )

    def online_loss(b: dict) -> torch.Tensor:
        input_ids, rows = b["input_ids"].to(device), b["rows"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = student(input_ids=input_ids, use_cache=False).logits.flatten(0, 1)[rows]
            with torch.no_grad():
                teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits.flatten(0, 1)[rows]
        return dense_kd_loss(logits, torch.log_softmax(teacher_logits.float(), -1)).mean()

    def step(b: dict) -> None:
        loss = online_loss(b) if teacher is not None else batch_loss(trainer_student, b, options, device)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def step_times(paths: dict, plan: list, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each method, interleaved batch by batch so that drifts in machine speed hit all alike."""
    batches = load_batches(paths, plan)
    steps = {method: make_step(method, paths, device) for method in METHODS}
    times = {method: [] for method in METHODS}
    for n, b in enumerate(batches):
        for method in METHODS[n % 3 :] + METHODS[: n % 3]:
            start = time.perf_counter()
            steps[method](b)
            if n >= WARMUP:
                times[method].append(time.perf_counter() - start)
    return times


def peak_memory(method: str, paths: dict, plan: list, device_name: str, threads: int, results) -> None:
    """(baseline, peak) MB over a few steps of `method`, run alone in this fresh process."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    batches = load_batches(paths, plan[: WARMUP + 2])
    step = make_step(method, paths, device)
    memory = PeakMemory(device)
    base = memory.start()
    for b in batches:
        step(b)
    results.put((method, (base, memory.stop())))


def loader_rate(paths: dict, plan: list, workers: int) -> float:
    """Batches per second the loader delivers when nothing else runs."""
    loader = make_loader(BatchDataset(CacheSource(CacheReader(paths["cache"])), pad_id=0), plan, workers)
    start, count = time.perf_counter(), 0
    for _ in loader:
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=128, help="Student hidden size (the teacher has twice this).")
    p.add_argument(
        "--vocab",
        type=int,
        default=1000,
        help="Vocabulary of the models (output-layer rows) and tokenizer (up to 4,000 trained tokens, the rest reserved).",
    )
    p.add_argument("--k", type=int, default=32, help="Teacher ids stored per position.")
    p.add_argument("--batch-tokens", type=int, default=2048, help="Padded tokens per batch.")
    p.add_argument("--steps", type=int, default=60, help="Timed steps per method (after 3 warm-up steps).")
    p.add_argument("--workers", type=int, default=2, help="Loader processes for the loader measurement.")
    p.add_argument("--device", default="cpu", help="cpu or cuda.")
    a = p.parse_args()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths, trained_tokens = build_artifacts(Path(tmp), a)
        plan = batch_plan(paths["cache"], a, a.steps + WARMUP)
        vocab = output_vocab_size(AutoModelForCausalLM.from_pretrained(str(paths["student"])))
        print(
            f"setup {time.perf_counter() - t0:.1f} s: vocab {vocab:,} (the output layer's rows, student and teacher; "
            f"tokenizer {vocab:,} tokens, {trained_tokens:,} of them trained), student hidden {a.hidden}, teacher hidden "
            f"{2 * a.hidden} (Mixtral, 8 experts), k {a.k}, {len(plan)} batches of <= {a.batch_tokens} tokens, "
            f"device {a.device}, {threads} threads",
            flush=True,
        )
        ctx = mp.get_context("spawn")
        results, memory = ctx.Queue(), {}
        for method in METHODS:
            proc = ctx.Process(target=peak_memory, args=(method, paths, plan, a.device, threads, results))
            proc.start()
            name, memory[name] = results.get()
            proc.join()
        times = step_times(paths, plan, torch.device(a.device))
        long_plan = batch_plan(paths["cache"], a, LOADER_BATCHES)
        rates = {w: loader_rate(paths, long_plan, w) for w in sorted({0, a.workers})}
        lengths = CacheReader(paths["cache"]).example_lengths()
        tokens_per_batch = statistics.mean(int(lengths[x].sum()) for _, _, x in plan)
    labels = {
        "cache": "(a) KD from the cache",
        "ce": "(b) CE fine-tuning",
        "online": "(c) online KD, teacher in memory",
    }
    unit = "GPU MB" if a.device.startswith("cuda") else "RSS MB"
    print(f"{'method':<34} {'step ms':>8} {'tokens/s':>10} {'peak ' + unit:>12} {'before':>8}")
    median = {m: statistics.median(t) for m, t in times.items()}
    for method in METHODS:
        base, peak = memory[method]
        print(
            f"{labels[method]:<34} {1000 * median[method]:>8.1f} {tokens_per_batch / median[method]:>10,.0f} {peak:>12,.0f} {base:>8,.0f}"
        )
    for workers, rate in rates.items():
        print(f"loader, {workers} worker(s): {rate:,.1f} batches/s")
    print(f"cache-KD step / CE step:             {median['cache'] / median['ce']:.2f}  (target <= 1.15)")
    print(f"online-KD step / cache-KD step:      {median['online'] / median['cache']:.2f}")
    print(
        f"loader batches/s / cache-KD steps/s: {rates[a.workers] * median['cache']:.1f}x  (target >= 5x, {a.workers} workers)"
    )


if __name__ == "__main__":
    main()
