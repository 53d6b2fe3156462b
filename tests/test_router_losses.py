"""Balanced Distillation for MoE students: each term against an explicit computation, the layer and
expert maps, gradients to the routers and τ, the clamp, bad input, resume, every supported family."""

from pathlib import Path

import numpy as np
import pytest
import torch

from moekd import CacheReader
from moekd.cache_builder.build import BuildOptions, build_cache
from moekd.distill.gate_maps import GateTargets, dense_gates, expert_map, parse_layer_map, uniform_layer_map
from moekd.distill.loader import BatchDataset, make_loader
from moekd.distill.objective import batch_loss
from moekd.distill.router_losses import (
    TAU_RANGE,
    coverage_kl,
    entropy_aware_kl,
    load_cv,
    mc_draws,
    mc_exploration_loss,
    router_objective,
    tempered,
)
from moekd.distill.sources import CacheSource
from moekd.distill.student import Student
from moekd.distill.train import TrainOptions, train
from moekd.errors import MoekdError
from moekd.models import load_causal_lm
from moekd.store.reader import decode_teacher
from moekd.tiny_models import MOE_FAMILIES, make_tiny_model
from moekd.training.metrics import read_metrics
from moekd.training.order import BatchOrder, held_out_split


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
def teacher(make_teacher):
    return make_teacher("mixtral", layers=3, experts=8)


@pytest.fixture(scope="module")
def half_data(tmp_path_factory, data_file) -> Path:
    out = tmp_path_factory.mktemp("bd_data") / "half.jsonl"
    out.write_text("".join(data_file.read_text().splitlines(keepends=True)[:48]))
    return out


@pytest.fixture(scope="module")
def gate_cache(tmp_path_factory, teacher, half_data):
    """Monte-Carlo routing with M = 2 samples and every teacher gate stored (3 MoE layers x 8 experts)."""
    return build(
        teacher,
        half_data,
        tmp_path_factory.mktemp("bd") / "full.zarr",
        policy="mc",
        policy_params={"samples": 2},
        router_probs="full",
    )


@pytest.fixture(scope="module")
def top_cache(tmp_path_factory, teacher, half_data):
    return build(teacher, half_data, tmp_path_factory.mktemp("bd") / "top.zarr", router_probs="top-3")


@pytest.fixture(scope="module")
def moe_student(tmp_path_factory, tokenizer) -> Path:
    """2 MoE layers x 4 experts against the teacher's 3 x 8."""
    out = tmp_path_factory.mktemp("moe_student")
    make_tiny_model("mixtral", tokenizer, out, seed=5, hidden=32, layers=2, experts=4)
    return out


def options(student, out, **kw) -> TrainOptions:
    base = dict(
        student=str(student),
        out=str(out),
        lr=3e-3,
        batch_tokens=1024,
        max_steps=3,
        eval_every=0,
        save_every=0,
        workers=0,
        device="cpu",
        eval_fraction=0.1,
        router_loss="bdistill",
    )
    return TrainOptions(**{**base, **kw})


def first_batch(cache, student, **kw):
    """(model, routing objective, one training batch) for `options(...)` on `cache`."""
    o = options(student, "unused", cache=str(cache), **kw)
    model = load_causal_lm(student, torch.float32, torch.device("cpu"), "--student")
    source = CacheSource(CacheReader(cache), gates=True)
    routing, targets = router_objective(o, model, source.gate_info)
    train_idx, _ = held_out_split(len(source), 0.1)  # as train() splits
    order = BatchOrder(train_idx, source.lengths, source.shards, 1024, seed=0)
    batch = next(iter(make_loader(BatchDataset(source, 0, o.sample_mode, 0, targets), order, workers=0)))
    return o, model, routing, batch


# ---------------------------------------------------------------- each term, explicitly


def random_gates(generator, shape, zeros=True):
    p = torch.rand(*shape, generator=generator) ** 3
    if zeros:
        p[..., 1] = 0.0  # an expert without mass is never drawn
    return p / p.sum(-1, keepdim=True)


def test_mc_loss_equals_a_hand_written_loop_over_draws():
    g = torch.Generator().manual_seed(0)
    P, M, L, N, K, alpha = 7, 2, 3, 5, 4, 0.5
    p = random_gates(g, (P, M, L, N))
    log_q = torch.log_softmax(torch.randn(P, 1, L, N, generator=g) * 2, -1)
    uniforms = 1.0 - torch.rand(K, P, M, L, generator=g)
    experts, weights = mc_draws(p, uniforms, alpha)
    loss = mc_exploration_loss(log_q, experts, weights)
    assert loss.shape == (P, M, L)
    for i in range(P):
        for m in range(M):
            for l in range(L):
                current = p[i, m, l].double().numpy().copy()
                num = den = 0.0
                for j in range(K):
                    current_norm = current / current.sum()
                    e = int(np.argmax(np.cumsum(current_norm) >= uniforms[j, i, m, l].item()))
                    assert experts[j, i, m, l] == e and e != 1
                    w = current_norm[e]
                    assert weights[j, i, m, l].item() == pytest.approx(w, rel=1e-5)
                    num += w * -log_q[i, 0, l, e].item()
                    den += w
                    current[e] *= alpha
                assert loss[i, m, l].item() == pytest.approx(num / den, rel=1e-5)
    # suppression changes the draws: with α = 1 the same uniforms draw with replacement
    again, _ = mc_draws(p, uniforms, 1.0)
    assert (again[0] == experts[0]).all() and not (again == experts).all()


def test_draws_depend_only_on_seed_epoch_and_example():
    """An example's uniforms are the same in any batch (resume, held-out, any number of ranks)."""
    targets = GateTargets([(0, 0), (1, 1)], 4, expert_map("group", 4, 2), draws=3, seed=0)
    together = targets.uniforms([7, 9], np.array([2, 5]), epoch=1, samples=2)
    assert together.shape == (3, 7, 2, 2) and together.min() > 0 and together.max() <= 1
    assert together[:, 2:].equal(targets.uniforms([9], np.array([5]), epoch=1, samples=2))
    assert together[:, :2].equal(targets.uniforms([7], np.array([2]), epoch=1, samples=2))
    other_seed = GateTargets([(0, 0), (1, 1)], 4, expert_map("group", 4, 2), draws=3, seed=1)
    for other in (
        other_seed.uniforms([7], np.array([2]), 1, 2),
        targets.uniforms([7], np.array([2]), 2, 2),
        targets.uniforms([8], np.array([2]), 1, 2),
    ):
        assert not together[:, :2].equal(other)


def test_coverage_kl_is_the_kl_between_the_batch_mean_gates():
    g = torch.Generator().manual_seed(1)
    p, q = random_gates(g, (6, 2, 3, 4)), random_gates(g, (6, 3, 4), zeros=False)
    got = coverage_kl(p, q)
    for l in range(3):
        pm = p[:, :, l].double().numpy().reshape(-1, 4).mean(0)
        qm = q[:, l].double().numpy().mean(0)
        expected = sum(a * np.log(a / b) for a, b in zip(pm, qm) if a > 0)
        assert got[l].item() == pytest.approx(expected, rel=1e-5)


def test_entropy_aware_kl_with_temperature():
    g = torch.Generator().manual_seed(2)
    P, M, L, N, beta = 5, 2, 2, 4, 0.3
    p = random_gates(g, (P, M, L, N))
    logits, tau = torch.randn(P, L, N, generator=g) * 3, torch.tensor([0.7, 1.3])
    q_tau = tempered(torch.log_softmax(logits, -1), tau[:, None])
    torch.testing.assert_close(q_tau, torch.softmax(logits / tau[None, :, None], -1))  # softmax routers: softmax(g/τ)
    got = entropy_aware_kl(p, q_tau, beta)
    sigmoid = logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True)  # a sigmoid router's g: tempered itself
    expected = sigmoid ** (1 / tau[None, :, None])
    torch.testing.assert_close(tempered(sigmoid.log(), tau[:, None]), expected / expected.sum(-1, keepdim=True))
    for l in range(L):
        total = 0.0
        for i in range(P):
            z = logits[i, l].double().numpy() / tau[l].item()
            q = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            entropy = -(q * np.log(q)).sum()
            for m in range(M):
                pt = p[i, m, l].double().numpy()
                kl = sum(a * np.log(a / b) for a, b in zip(pt, q) if a > 0)
                total += kl - beta * entropy
        assert got[l].item() == pytest.approx(total / (P * M), rel=1e-5)


def test_load_cv_of_the_top_k_choices():
    q = torch.tensor([[[0.7, 0.2, 0.1, 0.0]], [[0.6, 0.3, 0.05, 0.05]], [[0.1, 0.2, 0.3, 0.4]]])  # [P=3, L=1, N=4]
    load = np.array([2, 2, 1, 1]) / 6  # top-2 of each position: {0,1}, {0,1}, {3,2}
    assert load_cv(q, 2).item() == pytest.approx(load.std() / load.mean(), rel=1e-6)


# ---------------------------------------------------------------- maps


def test_layer_maps_on_uneven_layer_counts():
    assert uniform_layer_map(3, 8) == [(0, 0), (1, 4), (2, 7)]  # 3.5 rounds up
    assert uniform_layer_map(4, 6) == [(0, 0), (1, 2), (2, 3), (3, 5)]
    assert uniform_layer_map(1, 5) == [(0, 4)]
    assert uniform_layer_map(2, 2) == [(0, 0), (1, 1)]
    student, teacher = [f"s{i}" for i in range(3)], [f"t{i}" for i in range(5)]
    assert parse_layer_map("auto", student, teacher) == [(0, 0), (1, 2), (2, 4)]
    assert parse_layer_map("2:1, 0:4", student, teacher) == [(0, 4), (2, 1)]
    for spec, message in [
        ("0:0,3:1", "student MoE layer 3 does not exist; the student has 3 MoE layers"),
        ("0:5", "teacher MoE layer 5 \\(for student layer 0\\) is not in the cache"),
        ("1:0,1:2", "student MoE layer 1 \\(s1\\) is mapped twice"),
        ("0-1", "'0-1' is neither auto nor student:teacher pairs"),
    ]:
        with pytest.raises(MoekdError, match=f"--layer-map: {message}"):
            parse_layer_map(spec, student, teacher)


def test_expert_maps_on_uneven_expert_counts():
    p = torch.tensor([0.05, 0.10, 0.15, 0.20, 0.05, 0.25, 0.15, 0.05])
    # 8 teacher experts onto 3: groups {0,1}, {2,3,4}, {5,6,7}; stride keeps 0, 2, 5
    grouped = p @ expert_map("group", 8, 3)
    np.testing.assert_allclose(grouped, [0.15, 0.40, 0.45], rtol=1e-6)
    strided = p @ expert_map("stride", 8, 3)
    np.testing.assert_allclose(strided / strided.sum(), np.array([0.05, 0.15, 0.25]) / 0.45, rtol=1e-6)
    assert expert_map("group", 8, 4).sum(0).tolist() == [2, 2, 2, 2]
    assert torch.equal(expert_map("stride", 4, 4), torch.eye(4))
    with pytest.raises(
        MoekdError,
        match="--expert-map group: the student has 8 experts per layer, more than the teacher's 4; "
        "student expert 4 would get no teacher expert",
    ):
        expert_map("group", 4, 8)


def test_top_r_gates_spread_the_rest_evenly_and_targets_follow_the_maps():
    # one position, one sample, 2 teacher layers of 6 experts, top-2 stored
    ids = np.array([[[[4, 1], [0, 5]]]], dtype=np.uint16)
    probs = np.array([[[[0.5, 0.3], [0.6, 0.4]]]], dtype=np.float16)
    rest = np.array([[[0.2, 0.0]]], dtype=np.float32)
    dense = dense_gates(
        {
            "gate_ids": torch.from_numpy(ids.astype(np.int64)),
            "gate_probs": torch.from_numpy(probs),
            "gate_rest": torch.from_numpy(rest),
        },
        6,
    )
    np.testing.assert_allclose(dense[0, 0, 0], [0.05, 0.3, 0.05, 0.05, 0.5, 0.05], atol=1e-3)
    np.testing.assert_allclose(dense[0, 0, 1], [0.6, 0, 0, 0, 0, 0.4], atol=1e-3)
    assert torch.allclose(dense.sum(-1), torch.ones(1, 1, 2))  # float16 storage renormalised
    arrays = {"gate_ids": ids, "gate_probs": probs, "gate_rest": rest}

    # student layer 0 <- teacher layer 1, student layer 1 <- teacher layer 0; 6 experts onto 3 groups {0,1}, {2,3}, {4,5}
    def targets(pairs, kind, n_student, arrays):
        return GateTargets(pairs, 6, expert_map(kind, 6, n_student), 2, 0)(arrays, [0], np.array([1]), 0)[
            "teacher_gates"
        ]

    grouped = targets([(0, 1), (1, 0)], "group", 3, arrays)
    np.testing.assert_allclose(grouped[0, 0], [[0.6, 0.0, 0.4], [0.35, 0.1, 0.55]], atol=1e-3)
    # stride keeps teacher experts 0, 2, 4: layer 1 of the teacher has mass only on 0 -> [1, 0, 0]
    strided = targets([(0, 1), (1, 0)], "stride", 3, arrays)
    np.testing.assert_allclose(strided[0, 0], [[1.0, 0, 0], np.array([0.05, 0.05, 0.5]) / 0.6], atol=1e-3)
    # a stride target whose kept experts carry no mass is uniform
    empty = targets(
        [(0, 0)],
        "stride",
        2,  # keeps teacher experts 0 and 3
        {
            "gate_ids": np.array([[[[1, 5]]]], dtype=np.uint16),
            "gate_probs": np.array([[[[0.5, 0.5]]]], dtype=np.float16),
            "gate_rest": np.array([[[0.0]]], dtype=np.float32),
        },
    )
    np.testing.assert_allclose(empty[0, 0, 0], [0.5, 0.5])


# ---------------------------------------------------------------- the student's routers


def test_router_logits_are_taken_at_the_target_positions_of_the_padded_batch(gate_cache, moe_student):
    o, model, routing, batch = first_batch(gate_cache, moe_student)
    rows = batch["rows"]
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], output_router_logits=True).router_logits
        width = batch["input_ids"].shape[1]
        assert (batch["lengths"] < width).any()  # the batch holds padding
        for b, length in enumerate(batch["lengths"].tolist()):
            alone = model(input_ids=batch["input_ids"][b : b + 1, :length], output_router_logits=True).router_logits
            mine = rows[(rows // width) == b]
            assert len(mine) > 0
            for layer in range(2):
                torch.testing.assert_close(padded[layer][mine], alone[layer][mine % width], rtol=1e-4, atol=1e-5)


def test_batch_objective_adds_the_weighted_router_terms_and_gradients_reach_routers_and_tau(gate_cache, moe_student):
    o, model, routing, batch = first_batch(
        gate_cache, moe_student, ce_weight=0.2, router_aux_coef=0.01, expert_weight=0.3, coverage_weight=0.4
    )
    model.train()
    terms = batch_loss(Student(model, router_terms=routing), batch, o.kd_loss(), torch.device("cpu"))
    expected = (
        terms["logit_loss"]
        + 0.3 * (terms["mc_loss"] + 0.4 * terms["coverage_loss"] + terms["router_loss"])
        + 0.01 * terms["aux_loss"]
    )
    torch.testing.assert_close(terms["loss"], expected)
    assert torch.isclose(terms["logit_loss"], 0.8 * terms["kd_loss"] + 0.2 * terms["ce_loss"])
    assert {"gate_entropy/0", "load_cv/1", "gate_kl/1", "tau/0", "tau/1"} <= set(terms)
    terms["loss"].backward()
    for name, param in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert routing.tau.grad is not None and (routing.tau.grad != 0).all()
    # the router terms alone reach the routers too
    model.zero_grad()
    routing.tau.grad = None
    out = model(input_ids=batch["input_ids"], output_router_logits=True)
    routing(out.router_logits, batch, training=True)["router_loss"].backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0 and routing.tau.grad.abs().sum() > 0


def test_teacher_gates_follow_the_random_sample_pick(gate_cache, moe_student):
    o, model, routing, batch = first_batch(gate_cache, moe_student, sample_mode="random")
    reader = CacheReader(gate_cache)
    examples = batch["examples"].tolist()
    rows = np.concatenate([np.arange(reader.position_offsets[e], reader.position_offsets[e + 1]) for e in examples])
    stored = {name: reader.group[name].oindex[rows] for name in reader.teacher_names}
    ids, gates = decode_teacher(reader.encoding, stored)["topk_ids"], reader.group["gate_probs"].oindex[rows]
    # the loader's pick: one sample per example and epoch, from (seed, epoch, example)
    drawn = {e: np.random.default_rng([0, batch["epoch"], e]).integers(2) for e in examples}
    pick = np.repeat([drawn[e] for e in examples], np.diff(reader.position_offsets)[examples])
    assert set(pick.tolist()) == {0, 1}  # both samples occur in this batch
    at = np.arange(len(rows))
    np.testing.assert_array_equal(batch["topk_ids"][:, 0].numpy(), ids[at, pick])
    targets = GateTargets([(0, 0), (1, 2)], 8, expert_map("group", 8, 4), 3, 0)
    positions = np.diff(reader.position_offsets)[examples]
    other = targets({"gate_probs": gates[at, 1 - pick][:, None]}, examples, positions, 0)["teacher_gates"]
    expected = targets({"gate_probs": gates[at, pick][:, None]}, examples, positions, 0)["teacher_gates"]
    assert batch["teacher_gates"].shape == (len(rows), 1, 2, 4) and not torch.equal(other, expected)
    torch.testing.assert_close(batch["teacher_gates"], expected)


def test_tau_is_clamped_after_every_step(gate_cache, moe_student, tmp_path):
    o, model, routing, batch = first_batch(gate_cache, moe_student)
    with torch.no_grad():
        routing.tau.copy_(torch.tensor([3.0, -1.0]))
    routing.clamp_()
    assert routing.tau.tolist() == [1.5, 0.5]
    # a large entropy bonus pushes τ up; starting at the upper bound it must stay there
    train(options(moe_student, tmp_path / "run", cache=str(gate_cache), router_tau_init=1.5, router_beta=50.0))
    records = read_metrics(tmp_path / "run")[1:]
    assert all(r["tau/0"] == r["tau/1"] == TAU_RANGE[1] for r in records)
    # and without the bound τ moves: it is optimised
    train(options(moe_student, tmp_path / "free", cache=str(gate_cache), router_tau_init=1.0))
    last = read_metrics(tmp_path / "free")[-1]
    assert last["tau/0"] != 1.0 and TAU_RANGE[0] <= last["tau/0"] <= TAU_RANGE[1]


# ---------------------------------------------------------------- training runs


def test_bdistill_resumes_to_identical_metrics(gate_cache, moe_student, tmp_path, interrupt_at_step):
    kw = dict(
        cache=str(gate_cache),
        sample_mode="random",
        grad_accum=2,
        max_steps=4,
        save_every=2,
        eval_every=2,
        warmup=2,
        router_aux_coef=0.01,
    )
    train(options(moe_student, tmp_path / "whole", **kw))
    interrupt_at_step(4, lambda: train(options(moe_student, tmp_path / "cut", **kw)))
    resumed = train(options(moe_student, tmp_path / "cut", resume="auto", workers=1, **kw))
    assert resumed.resumed_from.endswith("step-000002")
    whole, cut = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
    for a, b in zip(whole, cut):
        a.pop("tokens_per_s", None), b.pop("tokens_per_s", None)
    assert cut == whole
    assert {"mc_loss", "tau/1", "eval_gate_kl/0", "aux_loss"} <= set(whole[4])
    header = (tmp_path / "whole" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"mc_loss", "gate_entropy/0", "load_cv/1", "gate_kl/0", "tau/1", "eval_load_cv/0"} <= set(header)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_supported_student_family_trains_with_bdistill(family, top_cache, tokenizer, tmp_path):
    student = tmp_path / family
    make_tiny_model(family, tokenizer, student, seed=6, hidden=32, layers=2, experts=4)
    aux = 0.0 if family == "deepseek_v3" else 0.01
    summary = train(
        options(
            student,
            tmp_path / "run",
            cache=str(top_cache),
            max_steps=2,
            router_aux_coef=aux,
            router_layers="last",
            loss="rkl",
        )
    )
    records = read_metrics(tmp_path / "run")
    assert summary.eval_loss < summary.eval_loss_start
    assert "tau/1" in records[-1] and "tau/0" not in records[-1] and np.isfinite(records[-1]["router_loss"])


def test_family_aux_loss_alone_is_added_over_the_non_padding_tokens(gate_cache, moe_student, tmp_path):
    o, model, routing, batch = first_batch(gate_cache, moe_student, router_loss="none", router_aux_coef=0.05)
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    terms = batch_loss(Student(model, router_terms=routing), batch, o.kd_loss(), torch.device("cpu"))
    assert set(terms) == {"loss", "logit_loss", "aux_loss"}
    logits = model(input_ids=batch["input_ids"], output_router_logits=True).router_logits
    mask = torch.arange(batch["input_ids"].shape[1])[None] < batch["lengths"][:, None]
    torch.testing.assert_close(terms["aux_loss"], load_balancing_loss_func(logits, 4, 2, mask))
    assert not torch.isclose(terms["aux_loss"], load_balancing_loss_func(logits, 4, 2, None))  # padding left out
    torch.testing.assert_close(terms["loss"], terms["logit_loss"] + 0.05 * terms["aux_loss"])
    summary = train(
        options(
            moe_student, tmp_path / "run", cache=str(gate_cache), router_loss="none", router_aux_coef=0.05, max_steps=2
        )
    )
    assert summary.steps == 2 and "aux_loss" in read_metrics(tmp_path / "run")[-1]


def test_cli_takes_every_router_flag(gate_cache, moe_student, tmp_path):
    from typer.testing import CliRunner

    from moekd.cli import app

    args = [
        "train",
        "--cache",
        str(gate_cache),
        "--student",
        str(moe_student),
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "1",
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
        "--router-loss",
        "bdistill",
        "--expert-weight",
        "0.2",
        "--mc-draws",
        "2",
        "--mc-alpha",
        "0.7",
        "--coverage-weight",
        "0.3",
        "--router-beta",
        "0.05",
        "--router-tau-init",
        "0.9",
        "--router-layers",
        "all",
        "--layer-map",
        "0:2,1:0",
        "--expert-map",
        "stride",
        "--router-aux-coef",
        "0.02",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = read_metrics(tmp_path / "run")[-1]
    assert record["tau/0"] == pytest.approx(0.9, abs=0.01) and "aux_loss" in record


# ---------------------------------------------------------------- bad input


def test_store_without_gates_is_refused(teacher, data_file, moe_student, tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(data_file.read_text().splitlines(keepends=True)[:4]))
    plain = build(teacher, few, tmp_path / "plain.zarr")
    with pytest.raises(
        MoekdError,
        match="stores no teacher gate distributions; rebuild it with `moekd cache build ... --router-probs full`",
    ):
        train(options(moe_student, tmp_path / "run", cache=str(plain)))


def test_dense_student_is_refused(gate_cache, tokenizer, tmp_path):
    dense = tmp_path / "dense"
    make_tiny_model("llama", tokenizer, dense, hidden=32)
    with pytest.raises(MoekdError, match="--router-loss bdistill needs an MoE student: LlamaForCausalLM"):
        train(options(dense, tmp_path / "run", cache=str(gate_cache)))
    with pytest.raises(MoekdError, match="--router-aux-coef needs an MoE student"):
        train(options(dense, tmp_path / "run2", cache=str(gate_cache), router_loss="none", router_aux_coef=0.1))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(mc_alpha=0.0), "--mc-alpha must be in \\(0, 1\\]"),
        (dict(mc_alpha=1.5), "--mc-alpha must be in \\(0, 1\\]"),
        (dict(mc_draws=0), "--mc-draws must be at least 1"),
        (dict(router_loss="sar"), "--router-loss must be one of none, bdistill"),
        (dict(router_tau_init=2.0), "--router-tau-init must be in \\[0.5, 1.5\\]"),
        (dict(router_layers="first"), "--router-layers must be all or last"),
        (dict(expert_map="random"), "--expert-map must be one of group, stride"),
        (dict(expert_weight=-1.0), "--expert-weight must be a finite number >= 0"),
        (dict(layer_map="0:0,2:1"), "--layer-map: student MoE layer 2 does not exist; the student has 2 MoE layers"),
        (
            dict(layer_map="1:3"),
            "--layer-map: teacher MoE layer 3 \\(for student layer 1\\) is not in the cache, which stores 3",
        ),
    ],
)
def test_bad_router_options_are_refused(gate_cache, moe_student, tmp_path, change, message):
    with pytest.raises(MoekdError, match=message):
        train(options(moe_student, tmp_path / "run", cache=str(gate_cache), **change))


def test_bdistill_needs_a_cache_and_fitting_experts(gate_cache, data_file, tokenizer, tmp_path):
    with pytest.raises(MoekdError, match="--router-loss bdistill needs the teacher's gate distributions: pass --cache"):
        train(options("x", tmp_path / "a", data=str(data_file), loss="ce"))
    wide = tmp_path / "wide"
    make_tiny_model("qwen3_moe", tokenizer, wide, hidden=32, layers=2, experts=16)
    with pytest.raises(
        MoekdError, match="student has 16 experts per layer, more than the teacher's 8; student expert 8"
    ):
        train(options(wide, tmp_path / "b", cache=str(gate_cache)))
    deepseek = tmp_path / "deepseek"
    make_tiny_model("deepseek_v3", tokenizer, deepseek, hidden=32, layers=2, experts=4)
    with pytest.raises(
        MoekdError, match="--router-aux-coef: DeepseekV3ForCausalLM has no auxiliary load-balancing loss"
    ):
        train(options(deepseek, tmp_path / "c", cache=str(gate_cache), router_aux_coef=0.1))
