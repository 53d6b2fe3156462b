"""`torchrun ... moekd train` with two gloo ranks on CPU: DDP follows the one-process loss trajectory for the
same global batches, rank 0 alone writes metrics and checkpoints, and the run resumes on another world size."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from moekd.distill.train import TrainOptions, train
from moekd.store.reader import CacheReader
from moekd.tiny_models import make_tiny_model
from moekd.training.checkpoint import is_complete
from moekd.training.metrics import read_metrics
from moekd.training.order import BatchOrder, held_out_split

pytestmark = pytest.mark.timeout(300)

FLAGS = dict(
    lr=3e-3,
    batch_tokens=200,
    grad_accum=2,
    max_steps=6,
    eval_every=3,
    save_every=3,
    workers=0,
    device="cpu",
    eval_fraction=0.1,
    warmup=2,
)
CLI_FIELDS = {"instruction": None, "context": None, "response": None}  # what the CLI passes when no field flag is given


@pytest.fixture(scope="module")
def cache(small_cache):
    return small_cache


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("ddp_student")
    make_tiny_model("llama", tokenizer, out, seed=3, hidden=32)
    return out


def one_process(student, cache, out, **kw):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank
    try:
        return train(
            TrainOptions(student=str(student), out=str(out), cache=str(cache), fields=CLI_FIELDS, **{**FLAGS, **kw})
        )
    finally:
        torch.set_num_threads(threads)


def trajectory(out, steps=None) -> dict[str, np.ndarray]:
    records = [r for r in read_metrics(out) if steps is None or r["step"] in steps]
    keys = ("step", "loss", "eval_loss", "lr", "tokens", "grad_norm")
    return {k: np.array([np.nan if r.get(k) is None else r[k] for r in records], dtype=float) for k in keys}


def assert_same_trajectory(a: dict, b: dict) -> None:
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=1e-6, equal_nan=True, err_msg=key)


def test_ddp_matches_one_process_writes_once_and_resumes_on_one_rank(cache, student, tmp_path):
    reader = CacheReader(cache)
    train_idx, _ = held_out_split(len(reader), FLAGS["eval_fraction"])
    order = BatchOrder(
        train_idx,
        reader.example_lengths(),
        reader.position_offsets[:-1] // reader.meta.layout.positions_per_shard,
        FLAGS["batch_tokens"],
        0,
    )
    first = order.epoch(0)[: FLAGS["max_steps"] * FLAGS["grad_accum"]]
    assert any(len(b) == 1 for b in first), (
        "no batch leaves a rank with an empty share: the zero-backward path goes untested"
    )

    reference = one_process(student, cache, tmp_path / "one")
    args = ["train", "--cache", str(cache), "--student", str(student), "--out", str(tmp_path / "two")]
    for key, value in FLAGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moekd", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert " ".join(run.stderr.split()).count("trained 6 steps") == 1  # one summary, from rank 0
    two = tmp_path / "two"
    assert [r["step"] for r in read_metrics(two)] == list(range(7))  # every step logged once
    assert_same_trajectory(trajectory(two), trajectory(tmp_path / "one"))
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    for name in ("step-000003", "step-000006", "final"):
        assert is_complete(two / name)

    # a crash after step 5: the last checkpoint is step 3; resume it on one rank (world size 2 -> 1)
    shutil.rmtree(two / "final")
    shutil.rmtree(two / "step-000006")
    resumed = one_process(student, cache, two, resume="auto")
    assert resumed.resumed_from.endswith("step-000003") and resumed.steps == 6
    assert_same_trajectory(trajectory(two, steps={4, 5, 6}), trajectory(tmp_path / "one", steps={4, 5, 6}))
    assert reference.steps == 6


@pytest.fixture(scope="module")
def gate_cache(tmp_path_factory, make_teacher, data_file):
    from moekd.cache_builder.build import BuildOptions, build_cache

    out = tmp_path_factory.mktemp("ddp_gates") / "gates.zarr"
    build_cache(
        BuildOptions(
            teacher=str(make_teacher("mixtral")),
            data=str(data_file),
            out=str(out),
            k=16,
            max_prompt_len=96,
            max_len=128,
            batch_tokens=512,
            device="cpu",
            router_probs="full",
        )
    )
    return out


def test_ddp_bdistill_matches_one_process(gate_cache, tokenizer, tmp_path):
    """Balanced Distillation on two ranks: the router terms come from the wrapped forward and τ's gradient is
    all-reduced, so the trajectory (τ included) is the one-process one. The coverage term is a statistic of
    each rank's share (README), so it is off here; the Monte-Carlo draws are per example, hence the same."""
    student = tmp_path / "moe"
    make_tiny_model("mixtral", tokenizer, student, seed=3, hidden=32, layers=2, experts=2)
    bd = dict(router_loss="bdistill", coverage_weight=0.0, expert_weight=0.5, router_beta=0.5)
    one_process(student, gate_cache, tmp_path / "one", **bd)
    args = [
        "train",
        "--cache",
        str(gate_cache),
        "--student",
        str(student),
        "--out",
        str(tmp_path / "two"),
        "--router-loss",
        "bdistill",
        "--coverage-weight",
        "0",
        "--expert-weight",
        "0.5",
        "--router-beta",
        "0.5",
    ]
    for key, value in FLAGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moekd", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == list(range(7))
    for key in ("loss", "mc_loss", "router_loss", "tau/0", "tau/1", "eval_mc_loss", "grad_norm"):
        a = np.array([r.get(key, np.nan) for r in one], dtype=float)
        b = np.array([r.get(key, np.nan) for r in two], dtype=float)
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6, equal_nan=True, err_msg=key)
    assert one[-1]["tau/0"] != 1.0  # τ was trained
