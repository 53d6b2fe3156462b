"""Student-Aware Router on tiny models: what trains, the loss terms, the router file, SAR caches, resume, bad input."""

import hashlib
import json

import numpy as np
import pytest
import torch

from moekd import CacheReader
from moekd.cache_builder.build import build_cache
from moekd.errors import MoekdError
from moekd.routing.router_file import (
    read_router_file,
    recognised_routers,
    router_gate_parameters,
    sha256_file,
    write_router_file,
)
from moekd.routing.routers import find_routers, frozen_router_tensors
from moekd.sar.objective import balance_terms, cv_squared, student_divergence, teacher_divergence
from moekd.sar.options import run_dir, student_dir
from moekd.sar.train import RouterTrainer, SarOptions, train_router
from moekd.store.verify import verify_store
from moekd.tiny_models import MOE_FAMILIES, make_tiny_family_model, make_tiny_model
from moekd.training.metrics import read_metrics
from tests.test_cache_build import interrupted_build
from tests.test_cache_build import options as build_options


@pytest.fixture(scope="module")
def data(tmp_path_factory, data_file):
    """The first 24 demo rows: enough for a few batches of a few examples."""
    out = tmp_path_factory.mktemp("sar_data") / "train.jsonl"
    out.write_text("".join(data_file.read_text().splitlines(keepends=True)[:24]))
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("sar_student")
    make_tiny_model("llama", tokenizer, out, seed=3, hidden=32)
    return out


def sar_options(teacher, student, data, out, **kw) -> SarOptions:
    base = dict(
        teacher=str(teacher),
        student=str(student),
        data=str(data),
        out=str(out),
        steps=3,
        lr=3e-2,
        batch_tokens=512,
        max_prompt_len=96,
        max_len=128,
        max_new_tokens=12,
        device="cpu",
        save_every=0,
    )
    return SarOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def router_file(tmp_path_factory, make_teacher, student, data):
    out = tmp_path_factory.mktemp("sar_run") / "router.safetensors"
    train_router(sar_options(make_teacher("mixtral"), student, data, out, steps=4))
    return out


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _checksums(model) -> dict[str, str]:
    return {
        name: hashlib.sha256(t.detach().float().numpy().tobytes()).hexdigest() for name, t in model.state_dict().items()
    }


def _all_experts_natively(model):
    """An independent all-expert teacher: every router's own top-k widened to N (for Mixtral,
    top-N of softmax renormalised = softmax over all experts, i.e. the `all` policy)."""
    for _, router in find_routers(model):
        router.top_k = router.num_experts
    return model


# ---------------------------------------------------------------- what trains


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_only_router_parameters_change_and_the_student_stays(family, make_teacher, student, data, tmp_path):
    trainer = RouterTrainer(sar_options(make_teacher(family), student, data, tmp_path / "r.safetensors", steps=2))
    routers = set(trainer.routers)
    assert routers and all(name.endswith("gate.weight") for name in routers)
    frozen = {f"{name}.{t}" for name, router in find_routers(trainer.teacher) for t in frozen_router_tensors(router)}
    teacher_before, student_before = _checksums(trainer.teacher), _checksums(trainer.student)
    trainer.train()
    teacher_after = _checksums(trainer.teacher)
    assert {n for n in teacher_before if teacher_before[n] != teacher_after[n]} == routers
    assert _checksums(trainer.student) == student_before
    tensors, meta = read_router_file(tmp_path / "r.safetensors")
    assert set(tensors) == routers == set(meta.parameters)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert meta.teacher.moe_layers == [n for n, _ in find_routers(trainer.teacher)] and not meta.student.co_trained
    assert not frozen & routers and frozen <= set(teacher_before)  # checksummed unchanged above, not stored
    if family == "deepseek_v3":  # the correction bias steers only the native choice: frozen
        assert frozen and all("e_score_correction_bias" in n for n in frozen)


def test_co_trained_student_changes_and_is_saved_beside_the_router_file(make_teacher, student, data, tmp_path):
    out = tmp_path / "router.safetensors"
    trainer = RouterTrainer(
        sar_options(make_teacher("mixtral"), student, data, out, steps=2, co_train_student=True, student_lr=1e-3)
    )
    before = _checksums(trainer.student)
    summary = trainer.train()
    assert summary.student_out == str(student_dir(out)) == str(tmp_path / "router.student")
    saved = _load(summary.student_out)
    assert _checksums(saved) == _checksums(trainer.student) != before
    assert read_router_file(out)[1].student.co_trained
    records = read_metrics(run_dir(out))
    assert [r["step"] for r in records] == [1, 2] and all(r["student_loss"] > 0 for r in records)


@pytest.mark.parametrize("kld", ["reverse", "forward"])
@pytest.mark.parametrize("responses", ["data", "student"])
def test_teacher_loss_falls(kld, responses, make_teacher, student, data, tmp_path):
    out = tmp_path / "r.safetensors"
    s = train_router(
        sar_options(make_teacher("mixtral"), student, data, out, teacher_kld=kld, responses=responses, steps=4)
    )
    assert s.loss_end < s.loss_start
    meta = read_router_file(out)[1]
    assert (meta.loss_start, meta.loss_end, meta.steps) == (s.loss_start, s.loss_end, 4)
    assert meta.settings["teacher_kld"] == kld and meta.settings["responses"] == responses
    columns = (run_dir(out) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "divergence", "importance_cv2", "load_cv2", "grad_norm"} <= set(columns)


def test_gradient_checkpointing_trains_the_same_routers(make_teacher, student, data, tmp_path):
    teacher = make_teacher("qwen3_moe")
    plain = train_router(sar_options(teacher, student, data, tmp_path / "a.safetensors", steps=1))
    checkpointed = train_router(
        sar_options(teacher, student, data, tmp_path / "b.safetensors", steps=1, gradient_checkpointing=True)
    )
    assert checkpointed.loss_end == pytest.approx(plain.loss_end, rel=1e-5)
    a, b = read_router_file(tmp_path / "a.safetensors")[0], read_router_file(tmp_path / "b.safetensors")[0]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_bfloat16_teacher_trains_float32_router_weights(make_teacher, student, data, tmp_path):
    trainer = RouterTrainer(
        sar_options(make_teacher("mixtral"), student, data, tmp_path / "r.safetensors", steps=1, dtype="bfloat16")
    )
    routers = trainer.routers
    assert all(p.dtype == torch.float32 and p.requires_grad for p in routers.values())
    others = [p for n, p in trainer.teacher.named_parameters() if n not in routers]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in others)
    before = {n: p.detach().clone() for n, p in routers.items()}
    summary = trainer.train()
    assert np.isfinite(summary.loss_end) and all(not torch.equal(before[n], p) for n, p in routers.items())


def test_unsupported_router_class_is_refused(tokenizer, student, data, tmp_path):
    teacher = tmp_path / "jetmoe"  # its router returns an expert-grouped dispatch, not a per-token selection
    make_tiny_family_model("jetmoe", vocab_size=len(tokenizer), seed=1, out_dir=teacher, tokenizer=tokenizer)
    with pytest.raises(
        MoekdError, match="--teacher: router class JetMoeTopKGating is not supported by SAR: it returns"
    ):
        RouterTrainer(sar_options(teacher, student, data, tmp_path / "r.safetensors"))


# ---------------------------------------------------------------- loss terms


def test_divergences_equal_their_definitions():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(7, 50, generator=g) * 3, torch.randn(7, 50, generator=g) * 3
    p = torch.softmax(teacher.double(), -1).numpy()
    q = torch.softmax(student.double(), -1).numpy()
    np.testing.assert_allclose(
        teacher_divergence(teacher, student, "reverse").numpy(), (p * np.log(p / q)).sum(-1), rtol=1e-5
    )
    np.testing.assert_allclose(
        teacher_divergence(teacher, student, "forward").numpy(), -(q * np.log(p)).sum(-1), rtol=1e-5
    )
    np.testing.assert_allclose(student_divergence(student, teacher).numpy(), (q * np.log(q / p)).sum(-1), rtol=1e-5)


def test_balance_terms_equal_their_definitions():
    g = torch.Generator().manual_seed(1)
    gates = torch.softmax(torch.randn(30, 8, generator=g) * 2, -1)
    index = gates.topk(2, dim=-1).indices
    counted = torch.rand(30, generator=g) > 0.3
    importance_cv2, load_cv2 = balance_terms(gates, index, counted)
    importance = gates.numpy()[counted.numpy()].sum(0)
    load = np.zeros(8)
    for row in index.numpy()[counted.numpy()]:
        load[row] += 1
    assert importance_cv2.item() == pytest.approx(importance.var() / importance.mean() ** 2, rel=1e-5)
    assert load_cv2.item() == pytest.approx(load.var() / load.mean() ** 2, rel=1e-6)
    assert cv_squared(torch.ones(5)).item() == 0.0


def test_trainer_loss_equals_an_independent_all_expert_computation(make_teacher, student, data, tmp_path):
    teacher = make_teacher("mixtral")
    beta = 0.5
    trainer = RouterTrainer(sar_options(teacher, student, data, tmp_path / "r.safetensors", beta=beta))
    examples = trainer._order().epoch(0)[0]
    probe = trainer._probe_loss()
    reference_teacher, reference_student = _all_experts_natively(_load(teacher)), _load(student)
    divergences, importance, load = [], 0, 0
    for e in examples:
        ex = trainer.source.examples[e]
        ids = torch.from_numpy(ex.input_ids[None].astype(np.int64))
        with torch.no_grad():
            out = reference_teacher(ids, output_router_logits=True)
            q = torch.softmax(reference_student(ids).logits[0].double(), -1)[ex.target_positions]
        p = torch.softmax(out.logits[0].double(), -1)[ex.target_positions]
        divergences.append((p * (p.log() - q.log())).sum(-1))
        gates = [torch.softmax(layer.double(), -1) for layer in out.router_logits]  # [T, N] per layer
        importance = importance + torch.stack([gl.sum(0) for gl in gates])  # [L, N]
        hits = torch.stack([torch.zeros_like(gl).scatter_(1, gl.topk(2, -1).indices, 1.0).sum(0) for gl in gates])
        load = load + hits
    cv2 = lambda x: (x.var(-1, unbiased=False) / x.mean(-1) ** 2).sum()  # noqa: E731  summed over layers
    expected = torch.cat(divergences).mean() + beta * (cv2(importance) + cv2(load))
    assert probe == pytest.approx(expected.item(), rel=1e-4)


# ---------------------------------------------------------------- the router file


def test_router_file_round_trips_and_is_refused_for_another_teacher(router_file, make_teacher, tmp_path):
    from moekd.models import checkpoint_sha256
    from moekd.routing.router_file import check_router_file, load_router_file

    tensors, meta = read_router_file(router_file)
    copy = tmp_path / "copy.safetensors"
    write_router_file(copy, tensors, meta)
    again, meta_again = read_router_file(copy)
    assert meta_again == meta and all(torch.equal(tensors[n], again[n]) for n in tensors)
    teacher = make_teacher("mixtral")
    assert meta.teacher.weights_sha256 == checkpoint_sha256(teacher) and meta.steps == 4
    model = _load(teacher)
    ref = load_router_file(model, router_file, str(teacher), checkpoint_sha256(teacher))
    assert ref.sha256 == sha256_file(router_file) and ref.meta == meta
    assert all(torch.equal(p, tensors[n]) for n, p in router_gate_parameters(recognised_routers(model)).items())

    other = make_teacher("mixtral", hidden=48)
    with pytest.raises(MoekdError, match=r"--router .* was trained for another teacher: .*weights sha256"):
        load_router_file(_load(other), router_file, str(other), checkpoint_sha256(other))
    # same weights hash but other layers or shapes (a tampered file): named
    renamed = meta.model_copy(update={"teacher": meta.teacher.model_copy(update={"moe_layers": ["x", "y"]})})
    with pytest.raises(MoekdError, match=r"router layers \['x', 'y'\] are not the teacher's"):
        check_router_file(renamed, model, str(teacher), checkpoint_sha256(teacher), router_file)
    name = sorted(tensors)[0]
    reshaped = meta.model_copy(update={"parameters": {**meta.parameters, name: [3, 3]}})
    with pytest.raises(MoekdError, match=rf"{name} has shape \[3, 3\] in the file but \[8, 32\] in the teacher"):
        check_router_file(reshaped, model, str(teacher), checkpoint_sha256(teacher), router_file)
    fewer = meta.model_copy(update={"parameters": {k: v for k, v in meta.parameters.items() if k != name}})
    with pytest.raises(MoekdError, match=rf"router parameter {name} is missing from the file"):
        check_router_file(fewer, model, str(teacher), checkpoint_sha256(teacher), router_file)


def test_damaged_or_foreign_router_files_are_refused(router_file, tmp_path):
    from safetensors.torch import save_file

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(router_file.read_bytes()[:-100])
    with pytest.raises(MoekdError, match="not a readable safetensors file, truncated or damaged"):
        read_router_file(truncated)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(MoekdError, match="without moekd metadata"):
        read_router_file(plain)
    with pytest.raises(MoekdError, match="no such file"):
        read_router_file(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- the SAR cache


def test_sar_store_equals_an_independent_forward_with_the_trained_routers(router_file, make_teacher, data, tmp_path):
    from safetensors.torch import load_file

    teacher = make_teacher("mixtral")
    out = tmp_path / "sar.zarr"
    build_cache(build_options(teacher, data, out, policy="sar", router=str(router_file), router_probs="full"))
    reader = CacheReader(out)
    meta = reader.meta
    assert meta.policy.name == "sar" and not meta.policy.stochastic
    assert meta.policy.router.sha256 == sha256_file(router_file)
    assert meta.policy.router.meta == read_router_file(router_file)[1]
    assert verify_store(str(out), deep=True).ok

    model = _load(teacher)
    missing, unexpected = model.load_state_dict(load_file(str(router_file)), strict=False)
    assert not unexpected and len(missing) == len(model.state_dict()) - len(meta.teacher.moe_layers)
    _all_experts_natively(model)
    for i in (0, 7, 23):
        ex = reader[i]
        with torch.no_grad():
            out_ = model(torch.from_numpy(ex.input_ids[None]).long(), output_router_logits=True)
        positions = torch.from_numpy(ex.target_positions).long()
        logprobs = torch.log_softmax(out_.logits[0].float(), -1)[positions].numpy()
        stored = ex.topk_logprobs[:, 0]
        np.testing.assert_allclose(np.take_along_axis(logprobs, ex.topk_ids[:, 0], -1), stored, atol=1 / 512 + 1e-4)
        np.testing.assert_allclose(stored[:, 0], logprobs.max(-1), atol=1 / 512 + 1e-4)
        gates = torch.stack([torch.softmax(layer.float(), -1) for layer in out_.router_logits], dim=1)[positions]
        np.testing.assert_allclose(ex.extra["gate_probs"][:, 0].astype(np.float32), gates.numpy(), atol=1e-3, rtol=2e-3)

    # a SAR store differs from the `all` store of the untrained routers
    plain = tmp_path / "all.zarr"
    build_cache(build_options(teacher, data, plain, policy="all"))
    assert not np.array_equal(CacheReader(plain)[0].topk_logprobs, reader[0].topk_logprobs)


def test_resume_of_a_sar_build_refuses_another_router_file(router_file, make_teacher, data, tmp_path):
    teacher = make_teacher("mixtral")
    out = tmp_path / "sar.zarr"
    interrupted_build(build_options(teacher, data, out, policy="sar", router=str(router_file), positions_per_shard=128))
    tensors, meta = read_router_file(router_file)
    other = tmp_path / "other.safetensors"
    write_router_file(other, {k: v * 2 for k, v in tensors.items()}, meta)
    with pytest.raises(MoekdError, match=r"other settings \(router_sha256: "):
        build_cache(
            build_options(teacher, data, out, policy="sar", router=str(other), positions_per_shard=128, resume=True)
        )
    build_cache(
        build_options(teacher, data, out, policy="sar", router=str(router_file), positions_per_shard=128, resume=True)
    )
    assert CacheReader(out).meta.build.status == "complete"


# ---------------------------------------------------------------- resume


def test_interrupted_run_resumes_to_the_same_router_and_student(
    make_teacher, student, data, tmp_path, interrupt_at_step
):
    kw = dict(steps=4, save_every=2, co_train_student=True, student_lr=1e-3, responses="student")
    teacher = make_teacher("mixtral")
    whole = train_router(sar_options(teacher, student, data, tmp_path / "whole.safetensors", **kw))

    cut = tmp_path / "cut.safetensors"
    interrupt_at_step(3, lambda: train_router(sar_options(teacher, student, data, cut, **kw)))
    assert not cut.exists() and [r["step"] for r in read_metrics(run_dir(cut))] == [1, 2]
    with pytest.raises(MoekdError, match="already holds this run; pass --resume auto"):
        train_router(sar_options(teacher, student, data, cut, **kw))
    # resumed from the run's recorded config alone: `moekd sar train --out FILE --resume auto`
    from typer.testing import CliRunner

    from moekd.cli import app

    resumed = CliRunner().invoke(app, ["sar", "train", "--out", str(cut), "--resume", "auto"])
    printed = resumed.output.replace("\n", "")  # rich wraps long paths
    assert resumed.exit_code == 0 and "resumed from" in printed and "step-000002" in printed

    def metrics(out):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run_dir(out))]

    # the same run, up to float32 rounding: CPU matmul kernels may round a last bit differently
    # from one process state to another (seen on this machine now and then, ~1e-8 in a router weight)
    resumed_metrics, whole_metrics = metrics(cut), metrics(tmp_path / "whole.safetensors")
    assert [r["step"] for r in resumed_metrics] == [r["step"] for r in whole_metrics] == [1, 2, 3, 4]
    for got, expected in zip(resumed_metrics, whole_metrics):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    (a, _), (b, meta_b) = read_router_file(tmp_path / "whole.safetensors"), read_router_file(cut)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-6)
    assert meta_b.loss_start == whole.loss_start and meta_b.loss_end == pytest.approx(whole.loss_end, rel=1e-6)
    got, expected = (
        _load(student_dir(cut)).state_dict(),
        _load(student_dir(tmp_path / "whole.safetensors")).state_dict(),
    )
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-6, atol=1e-6)
    with pytest.raises(MoekdError, match="already exists"):
        train_router(sar_options(teacher, student, data, cut, resume="auto", **kw))


def test_resume_with_other_settings_is_refused(make_teacher, student, data, tmp_path):
    out = tmp_path / "r.safetensors"
    run_dir(out).mkdir()
    (run_dir(out) / "config.json").write_text(json.dumps({"lr": 1.0}))
    with pytest.raises(MoekdError, match="holds a run with another configuration"):
        RouterTrainer(sar_options(make_teacher("mixtral"), student, data, out, resume="auto"))


# ---------------------------------------------------------------- routing stats --compare


def test_routing_stats_compare_reports_the_kl_to_the_trained_routers(router_file, make_teacher, data, tmp_path):
    from typer.testing import CliRunner

    from moekd.cli import app

    teacher = make_teacher("mixtral")
    args = [
        "routing",
        "stats",
        "--teacher",
        str(teacher),
        "--data",
        str(data),
        "--max-examples",
        "6",
        "--policy",
        "all",
    ]
    result = CliRunner().invoke(app, args + ["--compare", str(router_file), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["trained_routers"] == str(router_file)
    kls = [layer["kl_to_trained"] for layer in stats["layers"]]
    assert len(kls) == 2 and all(kl > 0 for kl in kls)

    # each layer's KL against two independent all-expert forwards (the original and the trained routers):
    # layer 0 sees the same input in both, layer 1 the output of layer 0 routed to every expert
    from moekd.data.prompts import tokenize_records
    from moekd.data.records import load_records
    from moekd.models import load_tokenizer

    loaded = load_records(data)
    examples = tokenize_records(loaded.records[:6], loaded.source_index[:6], load_tokenizer(teacher), 256, 512).examples
    original, trained = _all_experts_natively(_load(teacher)), _load(teacher)
    trained.load_state_dict(read_router_file(router_file)[0], strict=False)
    _all_experts_natively(trained)
    total, tokens = torch.zeros(2, dtype=torch.float64), 0
    for ex in examples:
        ids = torch.from_numpy(ex.input_ids[None].astype(np.int64))
        with torch.no_grad():
            g = torch.softmax(torch.stack(original(ids, output_router_logits=True).router_logits).double(), -1)
            t = torch.softmax(torch.stack(trained(ids, output_router_logits=True).router_logits).double(), -1)
        g, t = g[:, ex.target_positions], t[:, ex.target_positions]
        total += (g * (g.log() - t.log())).sum(dim=(1, 2))
        tokens += len(ex.target_positions)
    assert kls == pytest.approx((total / tokens).tolist(), rel=1e-3)

    # the teacher's own routers in a router file: nothing moved
    tensors, meta = read_router_file(router_file)
    same = tmp_path / "same.safetensors"
    write_router_file(
        same, {n: p.detach() for n, p in router_gate_parameters(recognised_routers(_load(teacher))).items()}, meta
    )
    unchanged = json.loads(CliRunner().invoke(app, args + ["--compare", str(same), "--json"]).stdout)
    assert all(layer["kl_to_trained"] == 0 for layer in unchanged["layers"])
    table = CliRunner().invoke(app, args + ["--compare", str(router_file)])
    assert table.exit_code == 0 and "KL" in table.output
    refused = CliRunner().invoke(app, args[:-2] + ["--policy", "sar"])
    assert "use --policy all --compare" in str(refused.exception)


# ---------------------------------------------------------------- the command and bad input


def test_cli_sar_train_then_sar_cache(make_teacher, student, data, tmp_path):
    from typer.testing import CliRunner

    from moekd.cli import app

    teacher, out = make_teacher("olmoe"), tmp_path / "router.safetensors"
    args = [
        "sar",
        "train",
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "1",
        "--lr",
        "1e-3",
        "--batch-tokens",
        "512",
        "--max-prompt-len",
        "96",
        "--max-len",
        "128",
        "--device",
        "cpu",
        "--save-every",
        "0",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trained the routers for 1 steps" in result.output and out.exists()
    built = CliRunner().invoke(
        app,
        [
            "cache",
            "build",
            "--teacher",
            str(teacher),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "sar.zarr"),
            "--policy",
            "sar",
            "--router",
            str(out),
            "--k",
            "8",
            "--max-prompt-len",
            "96",
            "--max-len",
            "128",
            "--device",
            "cpu",
        ],
    )
    assert built.exit_code == 0, built.output
    assert CacheReader(tmp_path / "sar.zarr").meta.policy.router.sha256 == sha256_file(out)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(beta=-0.1), "--beta must be >= 0"),
        (dict(lr=0.0), r"--lr must be > 0"),
        (dict(lr=-1e-3), r"--lr must be > 0"),
        (dict(teacher_kld="jsd"), "--teacher-kld must be one of reverse, forward"),
        (dict(responses="mixed"), "--responses must be one of data, student"),
        (dict(student_lr=1e-4), "--student-lr applies only with --co-train-student"),
        (dict(out="router.pt"), "give it the .safetensors suffix"),
        (dict(dtype="float16"), "--dtype float16"),
        (dict(steps=0), "--steps must be positive"),
    ],
)
def test_bad_options_are_refused(change, message, make_teacher, student, data, tmp_path):
    o = sar_options(make_teacher("mixtral"), student, data, tmp_path / "r.safetensors")
    with pytest.raises(MoekdError, match=message):
        RouterTrainer(SarOptions(**{**vars(o), **change}))


def test_dense_teacher_and_foreign_student_tokenizer_are_refused(make_teacher, student, data, tokenizer, tmp_path):
    from moekd.data.tokenizer import train_tokenizer

    with pytest.raises(MoekdError, match=r"--teacher.*LlamaForCausalLM is dense \(no MoE routers\)"):
        RouterTrainer(sar_options(make_teacher("llama"), student, data, tmp_path / "a.safetensors"))
    other = train_tokenizer(["a few words of text for another tokenizer"] * 4, vocab_size=300)
    foreign = tmp_path / "foreign"
    make_tiny_model("llama", other, foreign, hidden=32)
    with pytest.raises(
        MoekdError,
        match=r"--student: the student's tokenizer .* differs from the teacher's .*"
        r"token-to-id mapping differs.*use a student built with the teacher's tokenizer",
    ):
        RouterTrainer(sar_options(make_teacher("mixtral"), foreign, data, tmp_path / "b.safetensors"))


def test_cache_build_router_flags_are_checked(router_file, make_teacher, data, tmp_path):
    teacher = make_teacher("mixtral")
    with pytest.raises(MoekdError, match="--policy sar needs --router FILE"):
        build_cache(build_options(teacher, data, tmp_path / "a.zarr", policy="sar"))
    with pytest.raises(MoekdError, match="--router applies only to --policy sar, not --policy all"):
        build_cache(build_options(teacher, data, tmp_path / "b.zarr", policy="all", router=str(router_file)))
    with pytest.raises(MoekdError, match="was trained for another teacher"):
        build_cache(
            build_options(make_teacher("qwen2_moe"), data, tmp_path / "c.zarr", policy="sar", router=str(router_file))
        )
    with pytest.raises(MoekdError, match="is dense"):
        build_cache(
            build_options(make_teacher("llama"), data, tmp_path / "d.zarr", policy="sar", router=str(router_file))
        )
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(router_file.read_bytes()[:40])
    with pytest.raises(MoekdError, match="truncated or damaged"):
        build_cache(build_options(teacher, data, tmp_path / "e.zarr", policy="sar", router=str(damaged)))
    assert not any((tmp_path / name).exists() for name in ("a.zarr", "b.zarr", "c.zarr", "d.zarr", "e.zarr"))
