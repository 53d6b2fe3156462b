"""The cache builder end to end on tiny teachers: fidelity, alignment, crash safety, bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moekd import CacheReader
from moekd.cache_builder.build import BuildOptions, build_cache
from moekd.encodings.topk import MAX_ABS_ERROR
from moekd.errors import MoekdError
from moekd.store.layout import BUILD_DIR

ARRAYS = ("input_ids", "target_positions", "topk_ids", "topk_logprobs", "tail_logprob")


def options(teacher, data, out, **kw) -> BuildOptions:
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
    base.update(kw)
    return BuildOptions(**base)


def read_all(path) -> dict:
    r = CacheReader(path)
    return {name: np.concatenate([getattr(ex, name).ravel() for ex in r]) for name in ARRAYS}


def interrupted_build(build_options: BuildOptions) -> None:
    """A build stopped right after its first unit is committed: an unfinished store."""
    from moekd.store.writer import CacheWriter

    real_write_unit = CacheWriter.write_unit

    def crash_after_first(self, unit, *args):
        real_write_unit(self, unit, *args)
        raise KeyboardInterrupt

    CacheWriter.write_unit = crash_after_first
    try:
        with pytest.raises(KeyboardInterrupt):
            build_cache(build_options)
    finally:
        CacheWriter.write_unit = real_write_unit


@pytest.fixture(scope="session")
def mixtral_cache(tmp_path_factory, make_teacher, data_file):
    out = tmp_path_factory.mktemp("caches") / "mixtral.zarr"
    build_cache(options(make_teacher("mixtral"), data_file, out))
    return out


@pytest.fixture
def cache_copy(mixtral_cache, tmp_path):
    dst = tmp_path / "copy.zarr"
    shutil.copytree(mixtral_cache, dst)
    return dst


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama"])
def test_cached_distributions_match_full_teacher_forward(family, make_teacher, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = make_teacher(family)
    out = tmp_path / "c.zarr"
    build_cache(options(teacher, data_file, out, k=8))
    reader = CacheReader(out)
    model = AutoModelForCausalLM.from_pretrained(str(teacher)).eval()
    assert len(reader) == 96 and reader.meta.layout.num_samples == 1
    for i in range(0, len(reader), 7):
        ex = reader[i]
        with torch.no_grad():
            full = torch.log_softmax(model(torch.from_numpy(ex.input_ids[None]).long()).logits[0].double(), -1)
        # alignment: one stored position per response token, position t predicts token t+1
        np.testing.assert_array_equal(ex.target_positions, np.arange(ex.prompt_len - 1, len(ex.input_ids) - 1))
        expected = full[torch.from_numpy(ex.target_positions).long()]
        ids = torch.from_numpy(ex.topk_ids[:, 0]).long()
        stored = torch.from_numpy(ex.topk_logprobs[:, 0]).double()
        np.testing.assert_allclose(stored, expected.gather(1, ids), atol=MAX_ABS_ERROR + 2e-5)
        # the stored ids are the top-k: nothing outside them beats the k-th stored log-prob
        outside = expected.scatter(1, ids, float("-inf")).max(1).values
        assert torch.all(outside <= stored[:, -1] + MAX_ABS_ERROR + 2e-5)
        tail = torch.log1p(-expected.gather(1, ids).exp().sum(1))
        # the tail is quantised like every log-prob (exact before rounding)
        np.testing.assert_allclose(
            ex.tail_logprob[:, 0], tail, rtol=0, atol=reader.meta.encoding.max_abs_error_nats + 2e-5
        )
    # the next-token the data holds is one of the teacher's candidates at least sometimes: a shifted
    # alignment would put input_ids[t] there instead, which the checks above already exclude


def test_metadata_and_info(mixtral_cache, tokenizer):
    meta = CacheReader(mixtral_cache).meta
    assert meta.build.status == "complete" and meta.schema_version == "1.3"
    assert meta.policy.weighting == "native"
    assert meta.teacher.architecture == "MixtralForCausalLM" and meta.teacher.num_experts == 8
    assert meta.teacher.experts_per_token == 2 and len(meta.teacher.moe_layers) == 2
    assert meta.teacher.weights_sha256 and meta.tokenizer.size == len(tokenizer)
    assert meta.policy.name == "topk" and meta.encoding.k == 16
    assert meta.layout.num_positions == sum(len(ex.target_positions) for ex in CacheReader(mixtral_cache))
    assert not (Path(mixtral_cache) / BUILD_DIR).exists()


def test_resume_after_sigkill_is_identical(make_teacher, data_file, tmp_path):
    teacher = make_teacher("mixtral")
    out = tmp_path / "killed.zarr"
    args = [
        sys.executable,
        "-m",
        "moekd",
        "cache",
        "build",
        "--teacher",
        str(teacher),
        "--data",
        str(data_file),
        "--out",
        str(out),
        "--k",
        "16",
        "--max-prompt-len",
        "96",
        "--max-len",
        "128",
        "--batch-tokens",
        "128",
        "--positions-per-shard",
        "256",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed_planning = killed_with_units = False
    for wait_for_units in (0, 2):  # once while planning, once between/inside units
        # a resume repeats no flag: `cache build --out STORE --resume` takes the rest from the store's plan
        resume = [*args[:5], "--out", str(out), "--resume"]
        proc = subprocess.Popen(
            resume if out.exists() else args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        units = out / BUILD_DIR / "units"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if wait_for_units == 0 and list(tmp_path.glob(".killed.zarr.plan-*/.moekd-build/settings.json")):
                killed_planning = True
                break
            if wait_for_units == 0 and (out / BUILD_DIR).exists():
                break  # the plan was published before the draft was seen: killed right after planning
            if wait_for_units and units.exists() and len(list(units.glob("*.json"))) >= wait_for_units:
                killed_with_units = True
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if killed_planning:  # a planner killed before its rename leaves no store, only its hidden draft
            assert not out.exists() or (out / BUILD_DIR / "init.done").exists()
    assert killed_with_units, "the build finished before it could be killed mid-way"
    with pytest.raises(MoekdError, match="unfinished build"):
        CacheReader(out)
    # resume and the uninterrupted reference run in the same environment (thread count included)
    resumed = subprocess.run(resume, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    done, total = map(int, re.search(r"units\s+(\d+)/(\d+)", resumed.stderr).groups())
    assert 0 < done < total, "the resumed build redid every unit"
    reference = args[: args.index("--out") + 1] + [str(tmp_path / "reference.zarr")] + args[args.index("--out") + 2 :]
    subprocess.run(reference, env=env, check=True, capture_output=True)
    resumed, reference = read_all(out), read_all(tmp_path / "reference.zarr")
    for name in ARRAYS:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)


def test_resume_refuses_other_settings_and_overwrite_rules(make_teacher, data_file, tmp_path, mixtral_cache):
    teacher = make_teacher("mixtral")
    out = tmp_path / "c.zarr"
    shutil.copytree(mixtral_cache, out)
    with pytest.raises(MoekdError, match="complete cache; pass --overwrite"):
        build_cache(options(teacher, data_file, out))
    # --resume on a complete store: nothing to do when the settings match, a refusal naming the fields otherwise
    before = (out / "zarr.json").read_bytes()
    summary = build_cache(options(teacher, data_file, out, resume=True))
    assert summary.already_complete and summary.units_done == 0 and (out / "zarr.json").read_bytes() == before
    with pytest.raises(MoekdError, match=r"complete cache at .* other settings \(k: 16 in the store, 8 now\)"):
        build_cache(options(teacher, data_file, out, resume=True, k=8))
    out2 = tmp_path / "u.zarr"
    interrupted_build(options(teacher, data_file, out2))
    with pytest.raises(MoekdError, match="unfinished build .* --resume"):
        build_cache(options(teacher, data_file, out2))
    with pytest.raises(
        MoekdError, match=r"other settings \(.*k: 16 in the store, 8 now; max_len: 128 in the store, 100 now"
    ):
        build_cache(options(teacher, data_file, out2, resume=True, k=8, max_len=100))
    build_cache(options(teacher, data_file, out2, overwrite=True))
    assert CacheReader(out2).meta.build.status == "complete"


def test_verify_catches_corruption(cache_copy):
    from moekd.store.verify import verify_store

    assert verify_store(str(cache_copy), deep=True).ok
    shard = sorted((cache_copy / "topk_ids" / "c").rglob("*"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert any("checksum mismatch" in p for p in verify_store(str(cache_copy)).problems)
    shard.write_bytes(bytes(data[: len(data) // 2]))
    assert any("truncated" in p for p in verify_store(str(cache_copy)).problems)
    shard.unlink()
    assert any("missing" in p for p in verify_store(str(cache_copy)).problems)
    (cache_copy / "stray.bin").write_bytes(b"x")
    assert any("unexpected file" in p for p in verify_store(str(cache_copy)).problems)


def test_verify_and_reader_refuse_incomplete_and_newer_stores(cache_copy):
    from moekd.store.verify import verify_store

    root = cache_copy / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["moekd"]["build"]["status"] = "building"
    root.write_text(json.dumps(meta))
    assert "incomplete build" in verify_store(str(cache_copy)).problems[0]
    with pytest.raises(MoekdError, match="unfinished build"):
        CacheReader(cache_copy)
    meta["attributes"]["moekd"]["build"]["status"] = "complete"
    meta["attributes"]["moekd"]["schema_version"] = "2.0"
    root.write_text(json.dumps(meta))
    with pytest.raises(MoekdError, match="newer than this moekd reads"):
        CacheReader(cache_copy)
    assert "upgrade moekd" in verify_store(str(cache_copy)).problems[0]
    meta["attributes"]["moekd"]["schema_version"] = "1.7"  # a newer minor: unknown optional fields ignored
    meta["attributes"]["moekd"]["teacher"]["some_future_field"] = 1
    root.write_text(json.dumps(meta))
    assert CacheReader(cache_copy).meta.teacher.num_experts == 8
    root.write_text(root.read_text()[:100])
    assert "not valid JSON" in verify_store(str(cache_copy)).problems[0]


def test_stores_before_1_3_read_without_a_weighting(cache_copy):
    """Schema 1.3 added the optional `policy.weighting`: a 1.2 store, which has none, reads and verifies."""
    from moekd.store.verify import verify_store

    root = cache_copy / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["moekd"]["schema_version"] = "1.2"
    del meta["attributes"]["moekd"]["policy"]["weighting"]
    root.write_text(json.dumps(meta))
    reader = CacheReader(cache_copy)
    assert reader.meta.schema_version == "1.2" and reader.meta.policy.weighting is None
    assert verify_store(str(cache_copy)).ok


def test_reader_from_object_storage_url(mixtral_cache):
    import fsspec

    from moekd.store.verify import verify_store

    fs = fsspec.filesystem("memory")
    fs.put(str(mixtral_cache), "/shared/run.zarr", recursive=True)
    remote, local = CacheReader("memory://shared/run.zarr"), CacheReader(mixtral_cache)
    assert len(remote) == len(local)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(remote[5], name), getattr(local[5], name))
    assert verify_store("memory://shared/run.zarr", deep=True).ok


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(k=100000), "--k 100000 exceeds the teacher's vocabulary"),
        (dict(resume=True, overwrite=True), "--resume and --overwrite exclude each other"),
        (dict(device="tpu9"), "--device"),
        (dict(dtype="float8"), "--dtype"),
        (dict(max_prompt_len=8), "over --max-prompt-len 8"),
        (dict(teacher="/nonexistent/teacher"), "--teacher"),
        (dict(data="/nonexistent.jsonl"), "--data: /nonexistent.jsonl does not exist"),
    ],
)
def test_bad_input(change, message, make_teacher, data_file, tmp_path):
    with pytest.raises(MoekdError, match=message):
        build_cache(
            options(**{"teacher": make_teacher("mixtral"), "data": data_file, "out": tmp_path / "c.zarr", **change})
        )
    assert not (tmp_path / "c.zarr").exists() or not (tmp_path / "c.zarr" / "zarr.json").exists()


def test_bad_output_paths(make_teacher, data_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MoekdError, match="--out: cannot create"):
        build_cache(options(make_teacher("mixtral"), data_file, blocker / "c.zarr"))
    with pytest.raises(MoekdError, match="not a moekd cache"):
        build_cache(options(make_teacher("mixtral"), data_file, blocker, overwrite=True))
    assert blocker.read_text() == "x"


def test_teacher_vocab_must_cover_tokenizer(tmp_path, tokenizer, data_file):
    from moekd.tiny_models import make_tiny_model

    small = make_tiny_model("mixtral", tokenizer, None)
    small.resize_token_embeddings(len(tokenizer) // 2)
    small.save_pretrained(str(tmp_path / "t"))
    tokenizer.save_pretrained(str(tmp_path / "t"))
    with pytest.raises(MoekdError, match="output layer only"):
        build_cache(options(tmp_path / "t", data_file, tmp_path / "c.zarr"))


def test_moe_policy_on_dense_teacher(make_teacher, data_file, tmp_path):
    with pytest.raises(MoekdError, match="MoE"):
        build_cache(options(make_teacher("llama"), data_file, tmp_path / "c.zarr", policy="all"))


def test_cli_info_and_verify(mixtral_cache, cache_copy):
    from typer.testing import CliRunner

    from moekd.cli import app

    runner = CliRunner()
    info = runner.invoke(app, ["cache", "info", str(mixtral_cache)])
    assert info.exit_code == 0, info.output
    assert "bytes per position-sample" in info.output and "MixtralForCausalLM" in info.output
    assert "native weighting" in info.output
    ok = runner.invoke(app, ["cache", "verify", str(mixtral_cache), "--deep"])
    assert ok.exit_code == 0 and "OK" in ok.output
    (cache_copy / "manifest.json").unlink()
    bad = runner.invoke(app, ["cache", "verify", str(cache_copy)])
    assert bad.exit_code == 1 and "manifest.json is missing" in bad.output


def test_json_schema_file_is_in_sync():
    from moekd.schemas import JSON_SCHEMA_PATH, json_schema

    assert json.loads(JSON_SCHEMA_PATH.read_text()) == json_schema(), "run `python -m moekd.schemas`"


def test_resume_refuses_changed_examples(make_teacher, data_file, tmp_path):
    """The same kept records at other source rows seed other samples: resume must notice."""
    teacher = make_teacher("mixtral")
    out = tmp_path / "c.zarr"
    interrupted_build(options(teacher, data_file, out))
    shifted = tmp_path / "shifted.jsonl"
    shifted.write_text('{"instruction": "bad row"}\n' + data_file.read_text())
    with pytest.raises(MoekdError, match="examples_sha256"):
        build_cache(options(teacher, shifted, out, resume=True, skip_invalid=True))


def test_overwrite_never_leaves_a_partial_store_readable(make_teacher, data_file, tmp_path, mixtral_cache, monkeypatch):
    out = tmp_path / "c.zarr"
    shutil.copytree(mixtral_cache, out)

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # the process dies while deleting the old store

    monkeypatch.setattr("moekd.store.writer.shutil.rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        build_cache(options(make_teacher("mixtral"), data_file, out, overwrite=True))
    assert not out.exists()  # renamed away first: nothing at --out can be read as the old store


def test_seed_and_device_are_checked(make_teacher, data_file, tmp_path):
    with pytest.raises(MoekdError, match="--seed must be in"):
        build_cache(options(make_teacher("mixtral"), data_file, tmp_path / "c.zarr", seed=-1))
    with pytest.raises(MoekdError, match="--device: 'meta'"):
        build_cache(options(make_teacher("mixtral"), data_file, tmp_path / "c.zarr", device="meta"))
    assert not (tmp_path / "c.zarr").exists()


def test_non_finite_teacher_output_is_an_error(tmp_path, tokenizer, data_file):
    from moekd.tiny_models import make_tiny_model

    model = make_tiny_model("mixtral", tokenizer, None)
    with torch.no_grad():
        model.lm_head.weight[:, 0] = float("nan")
    model.save_pretrained(str(tmp_path / "t"))
    tokenizer.save_pretrained(str(tmp_path / "t"))
    with pytest.raises(MoekdError, match="non-finite logits in a batch of data rows"):
        build_cache(options(tmp_path / "t", data_file, tmp_path / "c.zarr"))
    with pytest.raises(MoekdError, match="unfinished build"):
        CacheReader(tmp_path / "c.zarr")


def test_info_on_an_unfinished_store_counts_the_written_units(make_teacher, data_file, tmp_path, mixtral_cache):
    """`cache info` mid-build: per-position figures over the positions written, the store said to be unfinished."""
    from typer.testing import CliRunner

    from moekd.cli import app
    from moekd.store.info import store_info

    out = tmp_path / "unfinished.zarr"
    interrupted_build(options(make_teacher("mixtral"), data_file, out))
    info, done = store_info(str(out)), store_info(str(mixtral_cache))
    assert info["units_written"] == 1 < info["units_total"] == done["units_total"] == done["units_written"]
    assert info["positions_written"] == 256 and done["positions_written"] == done["meta"].layout.num_positions
    for figure in ("bytes_per_position", "distribution_bytes_per_position_sample"):
        assert abs(info[figure] / done[figure] - 1) < 0.2, (figure, info[figure], done[figure])
    shown = CliRunner().invoke(app, ["cache", "info", str(out)], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    assert f"unfinished: 1/{info['units_total']} units written" in shown.output
    assert f"{info['bytes_per_position']:.1f}" in shown.output
    (out / BUILD_DIR / "units" / "000000.json").unlink()  # the unit's marker: as if killed before its commit
    shown = CliRunner().invoke(app, ["cache", "info", str(out)], env={"COLUMNS": "300"})
    assert shown.exit_code == 0 and f"unfinished: 0/{info['units_total']} units written" in shown.output, shown.output
    assert "no unit written yet" in shown.output and "bytes per position" not in shown.output
