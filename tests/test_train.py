"""`moekd train` on tiny models: the loader, learning, exact resume, checkpoints, SFT, MoE students, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moekd import CacheReader
from moekd.cache_builder.build import BuildOptions, build_cache
from moekd.distill import objective as objective_module
from moekd.distill.loader import BatchDataset, make_loader
from moekd.distill.sources import CacheSource
from moekd.distill.train import TrainOptions, train
from moekd.errors import MoekdError
from moekd.tiny_models import make_tiny_model, tiny_config
from moekd.training.checkpoint import is_complete
from moekd.training.metrics import read_metrics
from moekd.training.order import BatchOrder, LoaderPosition, held_out_split


def build(teacher, data, out, **kw) -> Path:
    base = dict(
        teacher=str(teacher),
        data=str(data),
        out=str(out),
        k=16,
        max_prompt_len=96,
        max_len=128,
        batch_tokens=512,
        positions_per_shard=256,
        device="cpu",
    )
    build_cache(BuildOptions(**{**base, **kw}))
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory, make_teacher, data_file):
    """A KA cache with M = 2 samples, built from a copy of the teacher that is deleted afterwards:
    training must never need the teacher."""
    root = tmp_path_factory.mktemp("train_cache")
    teacher = shutil.copytree(make_teacher("mixtral"), root / "teacher")
    out = build(teacher, data_file, root / "ka.zarr", policy="ka", policy_params={"samples": 2})
    shutil.rmtree(teacher)
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("student")
    make_tiny_model("llama", tokenizer, out, seed=3, hidden=32)
    return out


def options(student, out, **kw) -> TrainOptions:
    base = dict(
        student=str(student),
        out=str(out),
        lr=3e-3,
        batch_tokens=1024,
        max_steps=6,
        eval_every=3,
        save_every=3,
        workers=0,
        device="cpu",
        eval_fraction=0.1,
    )
    return TrainOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def kd_run(cache, student, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "kd"
    return out, train(options(student, out, cache=str(cache)))


# ---------------------------------------------------------------- loader


def test_loader_covers_each_training_example_once_per_epoch_within_the_budget(cache):
    reader = CacheReader(cache)
    train_idx, eval_idx = held_out_split(len(reader), 0.1)
    assert len(eval_idx) == 10 and not set(train_idx) & set(eval_idx)
    np.testing.assert_array_equal(held_out_split(len(reader), 0.1)[1], eval_idx)  # fixed, independent of --seed
    lengths = reader.example_lengths()
    order = BatchOrder(train_idx, lengths, np.zeros(len(reader), int), 600, seed=1)
    for epoch in range(2):
        batches = order.epoch(epoch)
        assert sorted(i for b in batches for i in b) == sorted(train_idx)
        assert all(len(b) * lengths[b].max() <= 600 for b in batches)
    assert order.epoch(0) != order.epoch(1)
    assert BatchOrder(train_idx, lengths, np.zeros(len(reader), int), 600, seed=1).epoch(0) == order.epoch(0)
    assert BatchOrder(train_idx, lengths, np.zeros(len(reader), int), 600, seed=2).epoch(0) != order.epoch(0)


def test_loader_position_restores_the_same_order_and_workers_read_the_same_batches(cache):
    source = CacheSource(CacheReader(cache))
    train_idx, _ = held_out_split(len(source), 0.1)
    order = BatchOrder(train_idx, source.lengths, source.shards, 1024, seed=0, epochs=3)
    full = [(e, b, tuple(x)) for e, b, x in order]
    n0 = len(order.epoch(0))
    resumed = BatchOrder(
        train_idx, source.lengths, source.shards, 1024, seed=0, start=LoaderPosition(0, n0 - 2), epochs=3
    )
    assert [(e, b, tuple(x)) for e, b, x in resumed] == full[n0 - 2 :]
    # batches stay inside one position shard apart from examples straddling a boundary
    assert np.mean([len(set(source.shards[list(x)])) == 1 for _, _, x in full]) > 0.5

    dataset = BatchDataset(source, pad_id=0, sample_mode="random", seed=0)
    serial = list(make_loader(dataset, full[:6], workers=0))
    parallel = list(make_loader(dataset, full[:6], workers=2))
    for a, b in zip(serial, parallel):
        assert a["examples"].tolist() == b["examples"].tolist()
        for key in ("input_ids", "rows", "labels", "topk_ids", "topk_logprobs", "tail_logprob"):
            assert a[key].equal(b[key])
    batch = serial[0]
    assert batch["topk_ids"].shape[1] == 1 and batch["input_ids"].numel() <= 1024
    # each target position predicts the next token of its example
    ex = CacheReader(cache)[batch["examples"][0].item()]
    first = batch["labels"][: len(ex.target_positions)].numpy()
    np.testing.assert_array_equal(first, ex.input_ids[ex.target_positions + 1])
    mean = BatchDataset(source, pad_id=0, sample_mode="mean")[full[0]]
    assert mean["topk_ids"].shape[1] == 2


# ---------------------------------------------------------------- training


def test_kd_training_lowers_held_out_loss_and_writes_checkpoints(kd_run):
    from transformers import AutoModelForCausalLM

    out, summary = kd_run
    assert summary.steps == 6 and summary.eval_loss < summary.eval_loss_start
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(7))
    assert {"step", "loss", "lr", "tokens", "eval_loss"} <= set(records[3])
    assert (out / "metrics.csv").read_text().startswith("step,epoch,loss")
    config = json.loads((out / "config.json").read_text())
    assert config["loss"] == "fkl" and config["total_steps"] == 6 and config["eval_examples"] == 10
    for name in ("step-000003", "step-000006", "final"):
        assert is_complete(out / name)
        model = AutoModelForCausalLM.from_pretrained(str(out / name))
        assert model.config.model_type == "llama"
    assert (out / "step-000003" / "model.safetensors").exists() and (out / "step-000003" / "training_state.pt").exists()


def test_interrupted_run_resumes_to_identical_metrics(cache, student, tmp_path, interrupt_at_step):
    kw = dict(
        cache=str(cache),
        sample_mode="random",
        grad_accum=2,
        max_steps=5,
        save_every=2,
        eval_every=2,
        schedule="cosine",
        warmup=2,
        loss_chunk=96,
    )  # several chunks per batch
    train(options(student, tmp_path / "whole", **kw))

    interrupt_at_step(4, lambda: train(options(student, tmp_path / "cut", **kw)))
    assert [r["step"] for r in read_metrics(tmp_path / "cut")][-1] == 3  # step 3 logged, checkpoint at step 2
    # resumed from the run's recorded config alone: `moekd train --out RUN --resume auto`
    from typer.testing import CliRunner

    from moekd.cli import app

    resumed = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "cut"), "--resume", "auto", "--workers", "1"])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from" in resumed.output and "step-000002" in resumed.output.replace("\n", "")  # rich wraps

    def losses(name):
        return [
            (r["step"], r.get("loss"), r.get("eval_loss"), r["lr"], r["tokens"]) for r in read_metrics(tmp_path / name)
        ]

    assert losses("cut") == losses("whole")


def test_sft_from_data_lowers_loss(student, data_file, tmp_path):
    summary = train(
        options(
            student,
            tmp_path / "sft",
            data=str(data_file),
            loss="ce",
            max_prompt_len=96,
            max_len=128,
            max_steps=4,
            eval_every=0,
            save_every=0,
        )
    )
    assert summary.eval_loss < summary.eval_loss_start
    assert is_complete(tmp_path / "sft" / "final")


def test_moe_student_trains_from_the_cache_with_mixed_objective(cache, tokenizer, tmp_path):
    moe = tmp_path / "qwen3_moe"
    make_tiny_model("qwen3_moe", tokenizer, moe, seed=4, hidden=32, experts=4)
    summary = train(
        options(
            moe, tmp_path / "run", cache=str(cache), loss="jsd", ce_weight=0.3, max_steps=3, eval_every=0, save_every=0
        )
    )
    last = read_metrics(tmp_path / "run")[-1]
    assert summary.eval_loss < summary.eval_loss_start
    assert np.isclose(last["loss"], 0.7 * last["kd_loss"] + 0.3 * last["ce_loss"])


def test_cli_train(cache, student, tmp_path):
    from typer.testing import CliRunner

    from moekd.cli import app

    args = [
        "train",
        "--cache",
        str(cache),
        "--student",
        str(student),
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        "--lr",
        "3e-3",
        "--batch-tokens",
        "1024",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output and is_complete(tmp_path / "run" / "final")
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, MoekdError) and "--resume auto" in str(again.exception)


def test_cli_train_from_a_config_file_with_a_flag_overriding_it(cache, student, tmp_path):
    """`moekd train --config run.yaml`: the file's settings reach the run (its config.json), a flag wins."""
    from typer.testing import CliRunner

    from moekd.cli import app

    config = tmp_path / "run.yaml"
    config.write_text(
        f"cache: {cache}\nstudent: {student}\nout: {tmp_path / 'run'}\nmax-steps: 2\nlr: 0.003\n"
        "batch_tokens: 1024\neval_every: 0\nsave_every: 0\nworkers: 0\ndevice: cpu\nloss: rkl\n"
    )
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--loss", "jsd"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (recorded["loss"], recorded["max_steps"], recorded["lr"], recorded["batch_tokens"]) == ("jsd", 2, 3e-3, 1024)
    assert recorded["fields"] == {"instruction": None, "context": None, "response": None}  # as runs always recorded


def test_training_code_never_imports_the_teacher_side():
    code = "import sys, moekd.distill.train; print([m for m in sys.modules if m.startswith('moekd.cache_builder')])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- bad input


def test_nan_loss_stops_naming_step_and_examples_and_keeps_last_checkpoint(cache, student, tmp_path, monkeypatch):
    real, calls = objective_module.sparse_losses_, []

    def nan_from_third_step(
        logits, topk_ids, topk_logprobs, tail_logprob, labels, kd_weight, ce_weight, need_grad, *rest
    ):
        kd, ce, grad = real(
            logits, topk_ids, topk_logprobs, tail_logprob, labels, kd_weight, ce_weight, need_grad, *rest
        )
        if need_grad:  # a training step, not an evaluation
            calls.append(1)
            if len(calls) >= 3:
                kd = kd * float("nan")
        return kd, ce, grad

    monkeypatch.setattr(objective_module, "sparse_losses_", nan_from_third_step)
    with pytest.raises(
        MoekdError, match=r"step 3: the loss is nan on batch \d+ of epoch 0 \(examples \[\d+.*step-000002"
    ):
        train(options(student, tmp_path / "run", cache=str(cache), save_every=2, eval_every=0))
    assert is_complete(tmp_path / "run" / "step-000002") and not (tmp_path / "run" / "step-000003").exists()
    assert not (tmp_path / "run" / "final").exists()


def test_out_dir_holding_another_run_is_refused(kd_run, cache, student):
    out, _ = kd_run
    with pytest.raises(MoekdError, match="already holds this run; pass --resume auto"):
        train(options(student, out, cache=str(cache)))
    with pytest.raises(MoekdError, match=r"another configuration \(lr: 0.003 -> 0.001"):
        train(options(student, out, cache=str(cache), lr=1e-3, resume="auto"))
    with pytest.raises(MoekdError, match="this run is finished"):
        train(options(student, out, cache=str(cache), resume="auto"))
    with pytest.raises(MoekdError, match=r"step-000003 was trained with another configuration: lr"):
        train(options(student, out.parent / "elsewhere", cache=str(cache), lr=1e-3, resume=str(out / "step-000003")))
    with pytest.raises(MoekdError, match="not a complete checkpoint"):
        train(options(student, out.parent / "elsewhere", cache=str(cache), resume=str(out / "step-000004")))


def test_incomplete_or_corrupted_cache_is_refused(cache, student, tmp_path):
    building = shutil.copytree(cache, tmp_path / "building.zarr")
    meta = json.loads((building / "zarr.json").read_text())
    meta["attributes"]["moekd"]["build"]["status"] = "building"
    (building / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(MoekdError, match="fails verification: incomplete build"):
        train(options(student, tmp_path / "a", cache=str(building)))
    corrupted = shutil.copytree(cache, tmp_path / "corrupted.zarr")
    chunk = next(p for p in sorted((corrupted / "topk_ids").rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:-3])
    with pytest.raises(MoekdError, match="fails verification: .*topk_ids"):
        train(options(student, tmp_path / "b", cache=str(corrupted)))
    with pytest.raises(MoekdError, match="nothing.zarr does not exist"):
        train(options(student, tmp_path / "c", cache=str(tmp_path / "nothing.zarr")))


def test_cache_too_small_to_hold_out_is_refused(make_teacher, data_file, student, tmp_path):
    one_row = tmp_path / "one.jsonl"
    one_row.write_text(data_file.read_text().splitlines()[0] + "\n")
    tiny = build(make_teacher("mixtral"), one_row, tmp_path / "one.zarr")
    with pytest.raises(MoekdError, match="holds 1 example"):
        train(options(student, tmp_path / "run", cache=str(tiny)))


def test_tokenizer_mismatch_names_both_and_how_they_differ(cache, tokenizer, tmp_path):
    from moekd.data.tokenizer import train_tokenizer

    other = train_tokenizer(["a few words of text for another tokenizer"] * 4, vocab_size=300)
    foreign = tmp_path / "foreign"
    make_tiny_model("llama", other, foreign, hidden=32)
    with pytest.raises(
        MoekdError,
        match=rf"student's tokenizer \({foreign}\) differs from the cache's \(.*teacher\): "
        r"size \d+ vs 400; token-to-id mapping differs .*cannot help",
    ):
        train(options(foreign, tmp_path / "a", cache=str(cache), allow_tokenizer_mismatch=True))

    renamed = tmp_path / "renamed"
    make_tiny_model("llama", tokenizer, renamed, hidden=32)
    config = json.loads((renamed / "tokenizer_config.json").read_text())
    config["bos_token"] = "<|pad|>"  # same ids, other special tokens
    (renamed / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(MoekdError, match="same token-to-id mapping.*pass --allow-tokenizer-mismatch"):
        train(options(renamed, tmp_path / "b", cache=str(cache)))
    summary = train(
        options(
            renamed,
            tmp_path / "c",
            cache=str(cache),
            allow_tokenizer_mismatch=True,
            max_steps=1,
            eval_fraction=0,
            save_every=0,
        )
    )
    assert summary.steps == 1


def test_student_vocabulary_smaller_than_the_cache_is_refused(cache, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    small = tmp_path / "small"
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=200)).save_pretrained(str(small))
    tokenizer.save_pretrained(str(small))
    with pytest.raises(
        MoekdError, match="output layer has 200 entries, fewer than the teacher's 400, and the cache holds token id"
    ):
        train(options(small, tmp_path / "run", cache=str(cache)))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(data="x.jsonl"), "exactly one of --cache"),
        (dict(cache=None, data="x.jsonl"), "--loss fkl needs teacher distributions"),
        (dict(ce_weight=1.5), "--ce-weight must be in"),
        (dict(max_steps=3, epochs=1), "one of --max-steps and --epochs"),
        (dict(batch_tokens=64), "--batch-tokens 64 is below the longest training example"),
        (dict(sample_mode="all"), "--samples must be mean or random"),
        (dict(loss_chunk=0), "--loss-chunk must be positive"),
    ],
)
def test_bad_options_are_refused(cache, student, tmp_path, change, message):
    with pytest.raises(MoekdError, match=message):
        train(options(student, tmp_path / "run", **{"cache": str(cache), **change}))


def test_trains_from_a_cache_in_object_storage(cache, student, tmp_path):
    import fsspec

    fsspec.filesystem("memory").put(str(cache), "/bucket/ka.zarr", recursive=True)
    summary = train(options(student, tmp_path / "remote", cache="memory://bucket/ka.zarr", max_steps=2, workers=0))
    assert summary.steps == 2 and is_complete(tmp_path / "remote" / "final")


def test_metrics_reader_drops_a_line_torn_by_a_crash(tmp_path):
    from moekd.training.metrics import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


def test_sft_data_takes_the_field_flags_of_cache_build(student, data_file, tmp_path):
    import json

    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    custom = tmp_path / "custom.jsonl"
    custom.write_text("".join(json.dumps({"q": r["instruction"], "a": r["response"]}) + "\n" for r in rows))
    fields = {"instruction": "q", "context": "", "response": "a"}
    summary = train(options(student, tmp_path / "sft", data=str(custom), loss="ce", max_steps=2, fields=fields))
    assert summary.steps == 2
    with pytest.raises(MoekdError, match="field 'instruction' is missing"):
        train(options(student, tmp_path / "sft2", data=str(custom), loss="ce", max_steps=2))


def test_two_resume_auto_runs_of_a_killed_run_one_trains_and_the_other_is_refused(cache, student, tmp_path):
    """A run SIGKILLed after its first checkpoint leaves its lock; two `--resume auto` at once: the first takes
    the lock over and finishes, the second exits 2 naming it; the run equals an uninterrupted one."""
    import os
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    from moekd.locking import lock_path

    kw = dict(cache=str(cache), max_steps=6, save_every=2, eval_every=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the processes below run
    try:
        train(options(student, tmp_path / "whole", **kw))
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "run"
    o = options(student, run, **kw)
    args = [sys.executable, "-m", "moekd", "train", "--cache", str(cache), "--student", str(student), "--out", str(run)]
    for flag in ("lr", "batch_tokens", "max_steps", "eval_every", "save_every", "workers", "device", "eval_fraction"):
        args += [f"--{flag.replace('_', '-')}", str(getattr(o, flag))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "10000"}

    def start(extra: list[str], log: str) -> subprocess.Popen:
        with open(tmp_path / log, "w") as fh:
            return subprocess.Popen(args + extra, env=env, stdout=fh, stderr=subprocess.STDOUT)

    def wait_until(done, proc) -> None:
        deadline = time.time() + 200
        while not done() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert done(), (tmp_path / "first.log").read_text() if (tmp_path / "first.log").exists() else proc.poll()

    def holds(proc) -> bool:
        try:
            return json.loads(lock_path(run).read_bytes())["pid"] == proc.pid
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    killed = start([], "killed.log")
    try:
        wait_until(lambda: is_complete(run / "step-000002"), killed)
    finally:
        killed.kill()
        killed.wait()
    assert holds(killed) and not is_complete(run / "final")  # the kill left its lock behind

    first = start(["--resume", "auto"], "first.log")
    try:
        wait_until(lambda: holds(first), first)
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run(args + ["--resume", "auto"], env=env, capture_output=True, text=True, timeout=200)
        lines = (second.stdout + second.stderr).strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in lines[0], lines
        assert f"--out: {run} is being written by another moekd (`moekd train --cache" in lines[0]
        assert f"pid {first.pid} on " in lines[0]
    finally:
        os.kill(first.pid, signal.SIGCONT)
        first.wait(timeout=240)
    log = (tmp_path / "first.log").read_text()
    assert first.returncode == 0 and "Traceback" not in log and "resuming from" in log, log[-3000:]

    def losses(path):
        return [(r["step"], r.get("loss"), r.get("eval_loss"), r["lr"], r["tokens"]) for r in read_metrics(path)]

    assert losses(run) == losses(tmp_path / "whole")
    resumed, whole = (
        load_file(run / "final" / "model.safetensors"),
        load_file(tmp_path / "whole/final/model.safetensors"),
    )
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert not lock_path(run).exists()
