"""The run lifecycle: SIGINT/SIGTERM stop `cache build`, `train` and `sar train` with one line naming where
they stopped and the command that resumes them; that command resumes them."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moekd.store.layout import BUILD_DIR
from moekd.tiny_models import make_tiny_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("student")
    make_tiny_model("llama", tokenizer, out, seed=3, hidden=32)
    return out


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "moekd", *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def stop_when(proc: subprocess.Popen, ready, sig: signal.Signals) -> tuple[int, str]:
    """Send `sig` once `ready()` holds; returns (exit code, stderr)."""
    deadline = time.time() + 180
    while not ready():
        assert proc.poll() is None, f"finished before it could be stopped: {proc.communicate()[1]}"
        assert time.time() < deadline, "never got ready"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def resume_args(err: str) -> list[str]:
    """The arguments of the resume command the stop line printed (after `moekd`)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "resume with:" in line]
    assert len(lines) == 1, err
    command = shlex.split(re.search(r"resume with: (.*)", lines[0]).group(1))
    assert command[0] == "moekd"
    return command[1:]


def steps(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in run.glob("step-*") if (p / "checkpoint.json").is_file())


def test_sigint_and_sigterm_stop_training_with_a_resume_command(small_cache, student, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--cache", str(small_cache), "--student", str(student), "--out", str(run)]
    args += ["--max-steps", "100000", "--save-every", "2", "--batch-tokens", "256", "--workers", "2", "--device", "cpu"]
    code, err = stop_when(start(args), lambda: steps(run), signal.SIGINT)
    assert code == 130, err
    resume = resume_args(err)
    assert resume == ["train", "--out", str(run), "--resume", "auto"]
    first = steps(run)[-1]
    assert f"the last complete checkpoint is {run / f'step-{first:06d}'}" in err
    # the printed command resumes (no other flag) and goes on past that checkpoint
    code, err = stop_when(start(resume), lambda: steps(run)[-1] > first, signal.SIGTERM)
    assert code == 143, err
    assert f"resuming from {run / f'step-{first:06d}'}" in err.replace("\n", "")
    assert "interrupted by SIGTERM" in err and resume_args(err) == resume


def test_sigint_stops_a_build_and_the_printed_command_resumes_it(make_teacher, data_file, tmp_path):
    out = tmp_path / "run.zarr"
    args = ["cache", "build", "--teacher", str(make_teacher("mixtral")), "--data", str(data_file), "--out", str(out)]
    args += ["--k", "16", "--max-prompt-len", "96", "--max-len", "128", "--batch-tokens", "128"]
    args += ["--positions-per-shard", "256", "--device", "cpu"]
    units = out / BUILD_DIR / "units"
    code, err = stop_when(start(args), lambda: len(list(units.glob("*.json"))) >= 2, signal.SIGINT)
    assert code == 130, err
    resume = resume_args(err)
    assert resume == ["cache", "build", "--out", str(out), "--resume"]
    written, total = map(int, re.search(r"(\d+) of (\d+) units of", err).groups())
    assert 2 <= written < total
    done = subprocess.run([sys.executable, "-m", "moekd", *resume], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "zarr.json").is_file() and not (out / BUILD_DIR).exists()


def test_sigterm_stops_sar_training_and_the_printed_command_resumes_it(make_teacher, student, data_file, tmp_path):
    out = tmp_path / "router.safetensors"
    run = tmp_path / "router.run"
    args = ["sar", "train", "--teacher", str(make_teacher("mixtral")), "--student", str(student)]
    args += ["--data", str(data_file), "--out", str(out), "--steps", "100000", "--save-every", "1"]
    args += ["--batch-tokens", "256", "--max-prompt-len", "96", "--max-len", "128", "--device", "cpu"]
    code, err = stop_when(start(args), lambda: steps(run), signal.SIGTERM)
    assert code == 143, err
    resume = resume_args(err)
    assert resume == ["sar", "train", "--out", str(out), "--resume", "auto"]
    first = steps(run)[-1]
    code, err = stop_when(start(resume), lambda: steps(run)[-1] > first, signal.SIGINT)
    assert code == 130, err
    assert f"resuming from {run / f'step-{first:06d}'}" in err.replace("\n", "")
    assert resume_args(err) == resume


# ---------------------------------------------------------------- --max-examples: smoke runs


def test_build_max_examples_stores_the_first_rows_and_is_a_recorded_setting(make_teacher, data_file, tmp_path):
    from moekd import CacheReader
    from moekd.cache_builder.build import BuildOptions, build_cache
    from moekd.errors import MoekdError

    def options(out, **kw):
        base = dict(teacher=str(make_teacher("mixtral")), data=str(data_file), out=str(out), k=16, device="cpu")
        return BuildOptions(**{**base, "max_prompt_len": 96, "max_len": 128, **kw})

    out = tmp_path / "five.zarr"
    assert build_cache(options(out, max_examples=5)).examples == 5
    reader = CacheReader(out)
    assert len(reader) == 5 and reader.source_index.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(MoekdError, match="max_examples: 5 in the store, 6 now"):
        build_cache(options(out, max_examples=6, resume=True))


def test_train_max_examples_uses_the_first_examples_of_data_and_cache(small_cache, student, data_file, tmp_path):
    from moekd.distill.sources import open_source
    from moekd.distill.train import TrainOptions, train
    from moekd.models import load_tokenizer

    base = dict(student=str(student), max_steps=1, eval_every=0, save_every=0, workers=0, device="cpu")
    for name, source in {"data": dict(data=str(data_file), loss="ce"), "cache": dict(cache=str(small_cache))}.items():
        o = TrainOptions(out=str(tmp_path / name), max_examples=7, eval_fraction=0.2, **base, **source)
        assert len(open_source(o, load_tokenizer(o.student), None)[0]) > 7  # the data holds more
        train(o)
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert (config["train_examples"], config["eval_examples"], config["max_examples"]) == (6, 1, 7)


def test_sar_max_examples_reads_the_first_rows(make_teacher, student, data_file, tmp_path):
    from moekd.data.records import load_records
    from moekd.sar.options import SarOptions
    from moekd.sar.train import RouterTrainer

    o = SarOptions(
        teacher=str(make_teacher("mixtral")),
        student=str(student),
        data=str(data_file),
        out=str(tmp_path / "r.safetensors"),
        max_examples=4,
        max_prompt_len=96,
        max_len=128,
        device="cpu",
    )
    trainer = RouterTrainer(o)
    assert len(trainer.source) == 4
    assert trainer.config["data_fingerprint"] == load_records(data_file).first(4).fingerprint()


# ---------------------------------------------------------------- checkpoints: --save-total-limit, --save-dtype


def test_save_total_limit_keeps_the_newest_and_save_dtype_writes_a_loadable_final(small_cache, student, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from moekd.distill.train import TrainOptions, train

    base = dict(cache=str(small_cache), student=str(student), max_steps=5, save_every=1, eval_every=0)
    base.update(workers=0, device="cpu", batch_tokens=512)
    train(TrainOptions(out=str(tmp_path / "all"), **base))
    train(TrainOptions(out=str(tmp_path / "kept"), save_total_limit=2, save_dtype="bfloat16", **base))
    assert steps(tmp_path / "all") == [1, 2, 3, 4, 5]
    assert steps(tmp_path / "kept") == [4, 5] and len(list((tmp_path / "kept").glob("step-*"))) == 2
    final = tmp_path / "kept" / "final"
    assert (final / "generation_config.json").is_file()
    half = AutoModelForCausalLM.from_pretrained(str(final))
    full = AutoModelForCausalLM.from_pretrained(str(tmp_path / "all" / "final"))
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert all(p.dtype == torch.float32 for p in full.parameters())
    expected = full.state_dict()
    for name, value in half.state_dict().items():
        torch.testing.assert_close(value, expected[name].to(torch.bfloat16), rtol=0, atol=0)
    # both are run-only settings: the run resumes with other values (and is finished here)
    from moekd.errors import MoekdError

    with pytest.raises(MoekdError, match="this run is finished"):
        train(TrainOptions(out=str(tmp_path / "kept"), resume="auto", **base))
