"""Stores shared between teams: reading, verifying and training over S3 and HTTP servers started on
loopback (tests/servers.py), `cache push` / `cache pull` / `cache pack`, resumed and corrupted transfers."""

import json
import shutil
import zipfile

import fsspec
import numpy as np
import pytest
from typer.testing import CliRunner

from moekd import CacheReader
from moekd.cli import app
from moekd.errors import MoekdError
from moekd.store import transfer
from moekd.store.info import store_info
from moekd.store.transfer import copy_store, pack_store
from moekd.store.verify import verify_store
from tests.servers import http_server, s3_server

pytestmark = pytest.mark.timeout(300)

ARRAYS = ("input_ids", "target_positions", "topk_ids", "topk_logprobs", "tail_logprob")


@pytest.fixture(scope="module")
def cache(small_cache):
    return small_cache


@pytest.fixture(scope="module")
def s3():
    """fsspec options for a bucket `team` on an S3-compatible server on loopback."""
    with s3_server() as options:
        fsspec.filesystem("s3", **options).mkdir("team")
        yield options


def objects(options, prefix: str) -> dict:
    fs = fsspec.filesystem("s3", **options)
    fs.invalidate_cache()
    return {path: info["ETag"] for path, info in fs.find(prefix, detail=True).items()}


def assert_same_store(remote: CacheReader, local: CacheReader) -> None:
    assert len(remote) == len(local) and remote.meta == local.meta
    everything = (0, local.num_positions)
    for name, value in local.read_positions(*everything).items():
        np.testing.assert_array_equal(remote.read_positions(*everything)[name], value, err_msg=name)
    for i in (0, len(local) // 2, len(local) - 1):
        for name in ARRAYS:
            np.testing.assert_array_equal(getattr(remote[i], name), getattr(local[i], name), err_msg=f"{name}[{i}]")


def cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


def test_push_read_verify_info_pull_over_s3(cache, s3, tmp_path):
    url, options = "s3://team/caches/run.zarr", json.dumps(s3)
    pushed = cli("cache", "push", str(cache), url, "--storage-options", options, "--jobs", "4")
    assert pushed.exit_code == 0, pushed.output
    assert "0 already there" in pushed.output
    before = objects(s3, "team/caches/run.zarr")
    assert_same_store(CacheReader(url, s3), CacheReader(cache))
    verified = cli("cache", "verify", url, "--deep", "--storage-options", options)
    assert verified.exit_code == 0 and "OK" in verified.output, verified.output
    info = cli("cache", "info", url, "--storage-options", options)
    assert info.exit_code == 0 and f"{store_info(str(cache))['bytes_total']:,} B" in info.output, info.output
    assert objects(s3, "team/caches/run.zarr") == before, "reading wrote to the store"
    pulled = cli("cache", "pull", url, str(tmp_path / "copy.zarr"), "--storage-options", options)
    assert pulled.exit_code == 0, pulled.output
    assert verify_store(str(tmp_path / "copy.zarr"), deep=True).ok
    for rel in json.loads((cache / "manifest.json").read_text())["files"]:
        assert (tmp_path / "copy.zarr" / rel).read_bytes() == (cache / rel).read_bytes(), rel
    again = cli("cache", "pull", url, str(tmp_path / "copy.zarr"), "--storage-options", options)
    assert again.exit_code == 0 and " 0 copied" in again.output, again.output


def test_interrupted_push_resumes_and_never_reads_as_complete(cache, s3, monkeypatch):
    url = "s3://team/interrupted/run.zarr"
    real_blocks, started, cut = transfer._blocks, [], []

    def dies_inside_the_tenth_file(fs, path, advance):
        started.append(path)
        for block in real_blocks(fs, path, advance):
            yield block
            if len(started) == 10:  # Ctrl-C in the middle of an upload
                cut.append(path.split("run.zarr/")[-1])
                raise KeyboardInterrupt

    monkeypatch.setattr(transfer, "_blocks", dies_inside_the_tenth_file)
    with pytest.raises(KeyboardInterrupt):
        copy_store(str(cache), url, destination_options=s3, jobs=1)
    monkeypatch.undo()
    there = objects(s3, "team/interrupted")
    assert "team/interrupted/run.zarr/zarr.json" not in there
    assert f"team/interrupted/run.zarr/{cut[0]}" not in there  # the aborted upload left no object behind
    with pytest.raises(MoekdError, match="not a readable Zarr v3 group"):
        CacheReader(url, s3)
    assert not verify_store(url, storage_options=s3).ok
    report = copy_store(str(cache), url, destination_options=s3, jobs=4)
    assert report.kept == len(there) >= 9 and report.copied == report.files - len(there)
    assert verify_store(url, deep=True, storage_options=s3).ok


def test_corrupted_object_is_caught_by_verify_and_pull_and_healed_by_push(cache, s3, tmp_path):
    url = "s3://team/corrupted/run.zarr"
    copy_store(str(cache), url, destination_options=s3)
    fs = fsspec.filesystem("s3", **s3)
    shard = "team/corrupted/run.zarr/topk_ids/c/0/0/0"
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(shard, bytes(data))
    assert any("topk_ids/c/0/0/0: checksum mismatch" in p for p in verify_store(url, storage_options=s3).problems)
    with pytest.raises(MoekdError, match=r"pull: 1 file\(s\) failed: topk_ids/c/0/0/0: checksum mismatch"):
        copy_store(url, str(tmp_path / "copy.zarr"), source_options=s3, verb="pull")
    assert not (tmp_path / "copy.zarr" / "zarr.json").exists()
    with pytest.raises(MoekdError, match="not a readable Zarr v3 group"):
        CacheReader(tmp_path / "copy.zarr")
    healed = copy_store(str(cache), url, destination_options=s3)
    assert healed.copied == 1 and healed.kept == healed.files - 1
    assert verify_store(url, storage_options=s3).ok
    pulled = copy_store(url, str(tmp_path / "copy.zarr"), source_options=s3, verb="pull")
    assert pulled.copied == 1 and verify_store(str(tmp_path / "copy.zarr"), deep=True).ok  # resumed: the rest was kept


def test_two_pushes_of_one_store_at_once_leave_it_complete(cache, s3):
    """No lock guards a URL: two pushes of the same store race file by file, and the store they leave is whole."""
    from concurrent.futures import ThreadPoolExecutor

    url = "s3://team/twice/run.zarr"
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda _: copy_store(str(cache), url, destination_options=s3, jobs=4), range(2)))
    assert all(r.files == r.copied + r.kept and not r.problems for r in reports)
    assert verify_store(url, deep=True, storage_options=s3).ok
    assert_same_store(CacheReader(url, s3), CacheReader(cache))


def test_copies_refuse_unfinished_sources_and_foreign_destinations(cache, s3, tmp_path):
    shutil.copytree(cache, tmp_path / "other.zarr")
    root = tmp_path / "other.zarr" / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["moekd"]["build"]["status"] = "building"
    root.write_text(json.dumps(meta))
    with pytest.raises(MoekdError, match="push: .* is an unfinished build"):
        copy_store(str(tmp_path / "other.zarr"), "s3://team/never/run.zarr", destination_options=s3)
    with pytest.raises(MoekdError, match="pack: .* is an unfinished build"):
        pack_store(str(tmp_path / "other.zarr"), tmp_path / "other.zip")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(MoekdError, match="holds files that are not part of this store"):
        copy_store(str(cache), str(tmp_path / "mine"), verb="pull")
    fsspec.filesystem("s3", **s3).pipe_file("team/taken/run.zarr/zarr.json", b'{"attributes": {}}')
    with pytest.raises(MoekdError, match="already holds another store"):
        copy_store(str(cache), "s3://team/taken/run.zarr", destination_options=s3)
    bad = cli("cache", "verify", "s3://team/x", "--storage-options", "{not json")
    assert isinstance(bad.exception, MoekdError) and "--storage-options: not valid JSON" in str(bad.exception)


def test_read_only_http_access_and_verify(cache, tmp_path):
    served = tmp_path / "www"
    shutil.copytree(cache, served / "run.zarr")
    with http_server(served) as (base, server):
        url = f"{base}/run.zarr"
        assert_same_store(CacheReader(url), CacheReader(cache))
        assert any(r.startswith("bytes=-") for r in server.ranges), "zarr read no shard index by a suffix range"
        report = verify_store(url, deep=True)
        assert report.ok, report.problems
        assert report.files_checked == len(json.loads((cache / "manifest.json").read_text())["files"])
        info = cli("cache", "info", url)
        assert info.exit_code == 0 and "bytes per position-sample" in info.output, info.output
        assert store_info(url)["bytes_total"] == store_info(str(cache))["bytes_total"]
        pulled = copy_store(url, str(tmp_path / "copy.zarr"), verb="pull", jobs=4)
        assert pulled.copied == pulled.files and verify_store(str(tmp_path / "copy.zarr"), deep=True).ok
        (served / "run.zarr" / "tail_steps" / "c" / "0" / "0").unlink()
        assert "tail_steps/c/0/0: missing" in verify_store(url).problems
        with pytest.raises(MoekdError, match="tail_steps/c/0/0: missing at the source"):
            copy_store(url, str(tmp_path / "second.zarr"), verb="pull")


def test_pack_opens_directly_and_catches_a_corrupted_member(cache, tmp_path):
    out = tmp_path / "run.zip"
    packed = cli("cache", "pack", str(cache), str(out))
    assert packed.exit_code == 0, packed.output
    assert_same_store(CacheReader(out), CacheReader(cache))
    assert verify_store(str(out), deep=True).ok
    with zipfile.ZipFile(out) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        assert zf.namelist()[-1] == "zarr.json"  # written last
        members = {name: zf.read(name) for name in zf.namelist()}
    members["topk_steps/c/0/0/0"] = members["topk_steps/c/0/0/0"][::-1]
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    assert "topk_steps/c/0/0/0: checksum mismatch (corrupted)" in verify_store(str(tmp_path / "bad.zip")).problems
    with pytest.raises(MoekdError, match="exists; remove it or choose another name"):
        pack_store(str(cache), out)


def test_train_reads_a_cache_from_s3_and_from_a_zip(cache, s3, tokenizer, tmp_path):
    from moekd.distill.train import TrainOptions, train
    from moekd.tiny_models import make_tiny_model
    from moekd.training.checkpoint import is_complete

    student = tmp_path / "student"
    make_tiny_model("llama", tokenizer, student, seed=3, hidden=32)
    url = "s3://team/train/run.zarr"
    copy_store(str(cache), url, destination_options=s3)
    pack_store(str(cache), tmp_path / "run.zip")
    common = dict(
        student=str(student),
        lr=3e-3,
        batch_tokens=1024,
        max_steps=2,
        eval_every=0,
        save_every=0,
        workers=1,
        device="cpu",
        eval_fraction=0.1,
    )
    remote = train(TrainOptions(out=str(tmp_path / "s3"), cache=url, storage_options=s3, **common))
    packed = train(TrainOptions(out=str(tmp_path / "zip"), cache=str(tmp_path / "run.zip"), **common))
    local = train(TrainOptions(out=str(tmp_path / "local"), cache=str(cache), **common))
    assert remote.loss == packed.loss == local.loss and is_complete(tmp_path / "s3" / "final")
    assert "secret" not in (tmp_path / "s3" / "config.json").read_text()  # credentials never reach the run directory
