"""The sampled and hidden encodings (and what they share with top-k): codecs, unbiasedness, build,
interrupt + resume, verify, and the refusals."""

import json
import math

import numpy as np
import pytest
import torch

from moekd import CacheReader
from moekd.cache_builder.build import build_cache
from moekd.encodings import check_flags
from moekd.encodings.hidden import FP8_MAX, HIDDEN_RELATIVE_ERROR, decode_hidden, encode_hidden
from moekd.encodings.sampled import SampledEncoder, draw_tokens, sampled_estimate
from moekd.errors import MoekdError
from moekd.store.info import store_info
from moekd.store.verify import verify_store
from tests.test_cache_build import interrupted_build
from tests.test_cache_build import options as topk_options

ENCODINGS = {
    "sampled": dict(encoding="sampled", draws=24),
    "sampled_t": dict(encoding="sampled", draws=24, proposal_temp=0.8),
    "hidden_bf16": dict(encoding="hidden"),
    "hidden_fp8": dict(encoding="hidden", hidden_dtype="fp8"),
}


def options(teacher, data, out, **kw):
    """test_cache_build's build options, without its --k for the other encodings."""
    return topk_options(teacher, data, out, **{"k": None if kw.get("encoding", "topk") != "topk" else 16, **kw})


def zipf_logits(vocab: int, rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float64))
    return (base + 0.3 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize("proposal_temp", [1.0, 0.7])
def test_sampled_estimate_is_unbiased(proposal_temp):
    """The mean of the estimate over S independent (example, position) seeds converges to p: every id
    within 5 standard errors of its mean, sigma_i^2 = p_i^2 (1 - r_i) / (r_i n S) (= p_i (1 - p_i) / (n S) at t = 1)."""
    vocab, draws, rows = 40, 16, 6000
    logits = zipf_logits(vocab, 1).expand(rows, vocab)  # one distribution, drawn at 6000 (seed, position) pairs
    encoder = SampledEncoder(draws, proposal_temp, vocab)
    seeds = torch.arange(rows, dtype=torch.int64) // 100
    positions = torch.arange(rows, dtype=torch.int64) % 100
    out = encoder.encode(logits, seeds, positions)
    assert (out["sampled_counts"].sum(-1) == draws).all()
    stored = {name: torch.from_numpy(value) for name, value in out.items()}
    estimate = sampled_estimate(
        stored["sampled_counts"], draws, proposal_temp, stored.get("sampled_logprobs"), stored.get("proposal_logz")
    ).numpy()
    dense = np.zeros((rows, vocab))
    np.add.at(dense, (np.arange(rows)[:, None], out["sampled_ids"]), estimate)
    p = torch.softmax(logits[0].double(), -1).numpy()
    r = torch.softmax(proposal_temp * torch.log_softmax(logits[0].double(), -1), -1).numpy()
    sigma = np.sqrt(p**2 * (1 - r) / (r * draws * rows))
    deviation = np.abs(dense.mean(0) - p)
    assert np.all(deviation <= 5 * sigma + 1e-12), (deviation / sigma).max()
    if proposal_temp != 1.0:  # not vacuous: the plain frequencies estimate r, not p, and fail the same bound
        frequencies = np.zeros((rows, vocab))
        np.add.at(frequencies, (np.arange(rows)[:, None], out["sampled_ids"]), out["sampled_counts"] / draws)
        assert np.any(np.abs(frequencies.mean(0) - p) > 5 * sigma)


def test_draws_depend_only_on_seed_position_and_distribution():
    logits = zipf_logits(300, 50, seed=1)
    seeds = torch.arange(50, dtype=torch.int64) * 7919
    positions = torch.arange(50, dtype=torch.int64) + 3
    encoder = SampledEncoder(32, 1.0, 300)
    whole = encoder.encode(logits, seeds, positions)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    shuffled = encoder.encode(logits[order], seeds[order], positions[order])
    for name in whole:
        np.testing.assert_array_equal(shuffled[name], whole[name][order.numpy()])
    other = encoder.encode(logits, seeds + 1, positions)
    assert not np.array_equal(other["sampled_ids"], whole["sampled_ids"])


def test_draw_tokens_packs_unique_ascending_ids():
    logprobs = torch.log_softmax(torch.tensor([[0.0, 5.0, 0.0, 4.0]]), -1)
    uniforms = torch.tensor([[0.9, 0.1, 0.5, 0.99, 0.2]], dtype=torch.float64)
    ids, counts = draw_tokens(logprobs, uniforms, 1.0)
    real = counts[0] > 0
    assert counts.sum() == 5 and torch.all(ids[0][real].diff() > 0) and torch.all(ids[0][~real] == 0)
    assert torch.all(real[: int(real.sum())])  # left-packed
    # a zero-probability id is never drawn
    ids, counts = draw_tokens(torch.tensor([[0.0, -math.inf, 0.0]]), torch.rand(1, 1000, dtype=torch.float64), 1.0)
    assert 1 not in ids[0][counts[0] > 0].tolist()


@pytest.mark.parametrize("dtype", ["bf16", "fp8", "fp32"])
def test_hidden_codec_roundtrip_within_documented_error(dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(500, 64, generator=g) * torch.rand(500, 1, generator=g) * 10
    h[0, 0], h[1] = 300.0, 0.0  # an outlier and an all-zero row
    stored = encode_hidden(h, dtype)
    decoded = decode_hidden(stored["hidden_states"], dtype, stored.get("hidden_scale"))
    error = (decoded - h).abs()
    bound = HIDDEN_RELATIVE_ERROR[dtype] * h.abs()
    if dtype == "fp8":  # below e4m3's normal range (2^-6 of the row's scale) the spacing is 2^-9 of the scale
        scale = torch.from_numpy(stored["hidden_scale"]).unsqueeze(-1)
        bound = torch.maximum(bound, 2.0**-10 * scale)
        assert decoded.abs().max() <= FP8_MAX * scale.max()
    assert torch.all(error <= bound * (1 + 1e-6))
    assert dtype == "fp32" or (error / bound.clamp(min=1e-30)).max() > 0.25  # the bound is tight, not vacuous
    assert torch.all(decoded[1] == 0)


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_each_encoding_builds_resumes_verifies_and_trains(name, make_teacher, data_file, tmp_path, student):
    teacher = make_teacher("mixtral")
    kw = ENCODINGS[name]
    interrupted = tmp_path / "interrupted.zarr"
    interrupted_build(options(teacher, data_file, interrupted, **kw))
    summary = build_cache(options(teacher, data_file, interrupted, resume=True, **kw))
    assert 0 < summary.units_done < summary.units_total
    build_cache(options(teacher, data_file, tmp_path / "reference.zarr", **kw))
    resumed, reference = CacheReader(interrupted), CacheReader(tmp_path / "reference.zarr")
    for array in resumed.teacher_names:
        np.testing.assert_array_equal(resumed.group[array][:], reference.group[array][:], err_msg=array)
    report = verify_store(str(interrupted), deep=True)
    assert report.ok and report.positions_checked == resumed.num_positions, report.problems
    info = store_info(str(interrupted))
    assert 0 < info["distribution_bytes_per_position_sample"] < info["bytes_per_position"]
    assert resumed.meta.encoding.kind == kw["encoding"]
    ex = resumed[3]
    if kw["encoding"] == "sampled":
        assert ex.topk_ids is None and ex.sampled_ids.shape == (len(ex.target_positions), 1, 24)
        assert (ex.sampled_counts.sum(-1) == 24).all()
        assert (ex.sampled_logprobs is not None) == ("proposal_temp" in kw)
        sparse = resumed.sparse_distribution(0, 50)
        assert sparse.estimate and sparse.rest is None and sparse.probs.shape == sparse.ids.shape
        if "proposal_temp" not in kw:
            np.testing.assert_allclose(sparse.probs.sum(-1), 1.0, rtol=1e-6)
        assert info["output_layer_bytes"] == 0
    else:
        assert ex.hidden_states.dtype == np.float32 and ex.hidden_states.shape[-1] == resumed.meta.encoding.hidden_size
        assert info["output_layer_bytes"] > 0
        with pytest.raises(MoekdError, match="full distribution"):
            resumed.sparse_distribution(0, 10)
    from moekd.distill.train import train

    # hidden caches give the exact distribution: any kind at any temperature
    extra = dict(loss="jsd", temperature=2.0) if kw["encoding"] == "hidden" else {}
    run = train(train_options(student, tmp_path / "run", interrupted, eval_every=2, **extra))
    assert run.steps == 4 and np.isfinite(run.eval_loss) and run.eval_loss < run.eval_loss_start


def test_hidden_states_are_the_teachers_and_give_its_logits(make_teacher, data_file, tmp_path):
    """A bfloat16 teacher's hidden states are stored without rounding: they are the input of its output
    layer bit for bit, and with the stored output layer give its logits."""
    from transformers import AutoModelForCausalLM

    teacher = make_teacher("mixtral")
    out = tmp_path / "h.zarr"
    # batch_tokens 1: every example runs alone, as in the forward below
    build_cache(options(teacher, data_file, out, encoding="hidden", dtype="bfloat16", batch_tokens=1))
    reader = CacheReader(out)
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.bfloat16).eval()
    weight = reader.output_layer()
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, model.lm_head.weight)
    assert reader.meta.encoding.output_layer_dtype == "bfloat16"
    for i in range(0, len(reader), 20):
        ex = reader[i]
        ids = torch.from_numpy(ex.input_ids[None]).long()
        keep = torch.zeros(ids.shape, dtype=torch.bool)
        keep[0, torch.from_numpy(ex.target_positions).long()] = True
        with torch.no_grad():
            hidden = model.model(ids).last_hidden_state[keep]
            logits = model(ids, logits_to_keep=keep).logits
        stored = torch.from_numpy(ex.hidden_states[:, 0]).to(torch.bfloat16)
        assert torch.equal(stored, hidden)
        assert torch.equal(torch.nn.functional.linear(stored, weight), logits)


def test_training_loss_of_a_hidden_cache_is_the_dense_loss_of_the_teachers_own_logits(
    make_teacher, data_file, tmp_path, student
):
    """The trainer's objective on a batch of a hidden bf16 cache of a bfloat16 teacher: the full-vocabulary
    divergence of the student's logits from the teacher's own forward (any kind, T != 1), values and gradients."""
    from transformers import AutoModelForCausalLM

    from moekd.distill.loader import BatchDataset
    from moekd.distill.losses import dense_kd_loss
    from moekd.distill.objective import batch_loss
    from moekd.distill.sources import CacheSource
    from moekd.distill.student import Student

    teacher = make_teacher("mixtral")
    out = tmp_path / "h.zarr"
    build_cache(options(teacher, data_file, out, encoding="hidden", dtype="bfloat16", batch_tokens=1))
    source = CacheSource(CacheReader(out))
    batch = BatchDataset(source, pad_id=0)[(0, 0, [0, 5, 9])]
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        own = model(batch["input_ids"]).logits.flatten(0, 1)[batch["rows"]]  # right padding: causal, no effect
    for kind, temperature in (("fkl", 1.0), ("jsd", 2.0)):
        learner = Student(AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32))
        o = train_options(student, tmp_path / "run", out, loss=kind, temperature=temperature, loss_chunk=7)
        batch_loss(
            learner,
            batch,
            o.kd_loss(source.encoding.kind),
            torch.device("cpu"),
            source.teacher_output_layer(torch.device("cpu")),
        )["loss"].backward()
        cached = [p.grad.clone() for p in learner.parameters()]
        learner.zero_grad()
        logits = learner.lm(batch["input_ids"]).logits.flatten(0, 1)[batch["rows"]]
        expected = dense_kd_loss(logits, torch.log_softmax(own.float(), -1), kind, temperature).mean()
        expected.backward()
        terms = batch_loss(
            learner,
            batch,
            o.kd_loss(source.encoding.kind),
            torch.device("cpu"),
            source.teacher_output_layer(torch.device("cpu")),
        )
        torch.testing.assert_close(terms["loss"], expected.detach(), rtol=1e-5, atol=1e-6)
        for got, want in zip(cached, (p.grad for p in learner.parameters())):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_hidden_refuses_teachers_whose_logits_are_not_linear(tokenizer, data_file, tmp_path):
    from transformers import AutoModelForCausalLM, GraniteMoeConfig

    config = GraniteMoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        logits_scaling=4.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "granite"))
    tokenizer.save_pretrained(str(tmp_path / "granite"))
    with pytest.raises(
        MoekdError, match=r"--encoding hidden: teacher GraniteMoeForCausalLM does not qualify: .*logits_scaling"
    ):
        build_cache(options(tmp_path / "granite", data_file, tmp_path / "c.zarr", encoding="hidden"))
    # the same teacher is fine for the sparse encodings
    build_cache(options(tmp_path / "granite", data_file, tmp_path / "s.zarr", encoding="sampled", draws=8))
    assert verify_store(str(tmp_path / "s.zarr"), deep=True).ok


def test_hidden_refuses_a_model_that_changes_its_logits_after_the_output_layer(
    make_teacher, data_file, tmp_path, monkeypatch
):
    """Whatever the config says, the build checks that the model's logits are its output layer's."""
    import transformers

    real_forward = transformers.MixtralForCausalLM.forward

    def scaled(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    monkeypatch.setattr(transformers.MixtralForCausalLM, "forward", scaled)
    with pytest.raises(MoekdError, match="changes its logits after the output layer"):
        build_cache(options(make_teacher("mixtral"), data_file, tmp_path / "c.zarr", encoding="hidden"))


@pytest.mark.parametrize(
    "encoding, flags, message",
    [
        ("topk", dict(draws=8), "--draws applies only to --encoding sampled, not --encoding topk"),
        ("sampled", dict(k=8), "--k applies only to --encoding topk"),
        ("hidden", dict(proposal_temp=0.5), "--proposal-temp applies only to --encoding sampled"),
        ("sampled", dict(hidden_dtype="fp8"), "--hidden-dtype applies only to --encoding hidden"),
        ("sampled", dict(draws=0), r"--draws must be in \[1, 65535\]"),
        ("sampled", dict(proposal_temp=float("nan")), "--proposal-temp must be a finite number > 0"),
        ("hidden", dict(hidden_dtype="int4"), "--hidden-dtype must be bf16, fp8 or fp32"),
        ("dense", {}, "--encoding: 'dense' is not topk, sampled or hidden"),
    ],
)
def test_encoding_flags_are_checked(encoding, flags, message):
    with pytest.raises(MoekdError, match=message):
        check_flags(encoding, flags)


def test_resume_refuses_another_encoding(make_teacher, data_file, tmp_path):
    out = tmp_path / "c.zarr"
    interrupted_build(options(make_teacher("mixtral"), data_file, out, encoding="sampled", draws=16))
    with pytest.raises(MoekdError, match="draws: 16 in the store, 32 now"):
        build_cache(options(make_teacher("mixtral"), data_file, out, encoding="sampled", draws=32, resume=True))


def test_verify_deep_checks_the_sampled_invariants():
    from moekd.encodings.sampled import SAMPLED, SampledEncoder

    def _check_sampled(info, raw, decoded, vocab):
        return SAMPLED.value_problems(info, raw, decoded, vocab)

    encoder = SampledEncoder(8, 0.8, 50)
    raw = encoder.encode(zipf_logits(50, 20), torch.arange(20), torch.arange(20))
    decoded = {name: value.astype(np.int32) if name == "sampled_counts" else value for name, value in raw.items()}
    good = {name: value[:, None] for name, value in decoded.items()}
    assert _check_sampled(encoder.info, None, good, 50) == []
    broken = {name: value.copy() for name, value in good.items()}
    broken["sampled_counts"][0, 0, 0] += 1
    assert any("add up" in p for p in _check_sampled(encoder.info, None, broken, 50))
    broken = {name: value.copy() for name, value in good.items()}
    broken["sampled_ids"][1, 0, :2] = broken["sampled_ids"][1, 0, 1::-1]
    assert any("ascending" in p for p in _check_sampled(encoder.info, None, broken, 50))
    broken = {name: value.copy() for name, value in good.items()}
    broken["proposal_logz"][2] -= 5.0
    assert any("proposal mass" in p for p in _check_sampled(encoder.info, None, broken, 50))


def test_verify_deep_checks_the_output_layer(make_teacher, data_file, tmp_path):
    out = tmp_path / "h.zarr"
    build_cache(options(make_teacher("mixtral"), data_file, out, encoding="hidden"))
    root = out / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["moekd"]["encoding"]["output_layer_sha256"] = "0" * 64
    root.write_text(json.dumps(meta))  # the root metadata is outside the manifest
    problems = verify_store(str(out), deep=True).problems
    assert any("output_layer: sha256" in p for p in problems)
    with pytest.raises(MoekdError, match=r"output_layer has sha256 .* not the 000000000000\.\.\. recorded at build"):
        CacheReader(out).output_layer()  # what `moekd train` reads the teacher's output layer with


def test_a_store_written_by_schema_1_0_still_reads():
    """tests/data/store_v1_0.zarr was written by moekd before 1.1 (ids in rank order, u16 gaps below a
    float32 top-1) from the tiny Mixtral teacher committed beside it (tests/data/store_v1_0_teacher, 0.5 MB):
    it reads, verifies and decodes to that teacher's own distributions."""
    from pathlib import Path

    from moekd.models import checkpoint_sha256

    old = Path(__file__).parent / "data" / "store_v1_0.zarr"
    teacher = Path(__file__).parent / "data" / "store_v1_0_teacher"
    reader = CacheReader(old)
    assert reader.meta.schema_version == "1.0" and reader.meta.encoding.logprob_codec == "u16_gap_delta"
    assert verify_store(str(old), deep=True).ok
    assert reader.meta.teacher.weights_sha256 == checkpoint_sha256(teacher)  # the committed files wrote it
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher)).eval()
    for ex in reader:
        with torch.no_grad():
            full = torch.log_softmax(model(torch.from_numpy(ex.input_ids[None]).long()).logits[0].double(), -1)
        expected = full[torch.from_numpy(ex.target_positions).long()]
        ids = torch.from_numpy(ex.topk_ids[:, 0]).long()
        np.testing.assert_array_equal(ids, expected.topk(4, dim=-1).indices)
        np.testing.assert_allclose(ex.topk_logprobs[:, 0], expected.gather(1, ids), atol=1 / 512 + 2e-5)
    assert reader.largest_stored_id() < reader.meta.teacher.vocab_size


# ---------------------------------------------------------------- training from each encoding


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer):
    from moekd.tiny_models import make_tiny_model

    out = tmp_path_factory.mktemp("student")
    make_tiny_model("llama", tokenizer, out, seed=3, hidden=32)
    return out


def train_options(student, out, cache, **kw):
    from moekd.distill.train import TrainOptions

    base = dict(
        student=str(student),
        out=str(out),
        cache=str(cache),
        lr=3e-3,
        batch_tokens=1024,
        max_steps=4,
        eval_every=0,
        save_every=0,
        workers=0,
        device="cpu",
        eval_fraction=0.1,
    )
    return TrainOptions(**{**base, **kw})


def test_sampled_kd_loss_is_the_cross_entropy_of_its_weights():
    """With weights = p at every id, the estimate is the dense cross-entropy = forward KL + H(p), values and gradients."""
    from moekd.distill.losses import dense_kd_loss
    from moekd.distill.sampled_losses import sampled_kd_loss

    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 30, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_logp = torch.log_softmax(2 * torch.randn(5, 30, generator=g, dtype=torch.float64), -1)
    ids = torch.arange(30).expand(5, 1, 30)
    for temperature in (1.0, 2.0):
        tempered = torch.log_softmax(teacher_logp / temperature, -1)
        loss = sampled_kd_loss(student, ids, tempered.exp().unsqueeze(1), temperature)[:, 0]
        entropy = -(tempered.exp() * tempered).sum(-1)
        reference = dense_kd_loss(student, teacher_logp, "fkl", temperature) + entropy
        torch.testing.assert_close(loss, reference)
        (grad,) = torch.autograd.grad(loss.sum(), student)
        (ref_grad,) = torch.autograd.grad(reference.sum(), student)
        torch.testing.assert_close(grad, ref_grad)


def test_sampled_kd_gradient_is_unbiased_for_the_forward_kl_gradient():
    """Averaged over the draws of S (seed, position) pairs, the gradient of the sampled loss converges to the
    full-vocabulary forward-KL gradient: within 5 standard errors (estimated from the draws) everywhere."""
    from moekd.distill.losses import dense_kd_loss
    from moekd.distill.sampled_losses import sampled_kd_loss

    vocab, draws, rows = 40, 8, 4000
    teacher = zipf_logits(vocab, 1)
    out = SampledEncoder(draws, 1.0, vocab).encode(
        teacher.expand(rows, vocab), torch.arange(rows), torch.zeros(rows, dtype=torch.int64)
    )
    student = torch.randn(1, vocab, generator=torch.Generator().manual_seed(1), dtype=torch.float64).expand(rows, vocab)
    student = student.clone().requires_grad_(True)
    weights = torch.from_numpy(out["sampled_counts"]).double() / draws
    loss = sampled_kd_loss(student, torch.from_numpy(out["sampled_ids"]).unsqueeze(1), weights.unsqueeze(1))
    (per_draw,) = torch.autograd.grad(loss.sum(), student)
    exact = student[:1].detach().requires_grad_(True)
    (ref,) = torch.autograd.grad(dense_kd_loss(exact, torch.log_softmax(teacher.double(), -1)).sum(), exact)
    mean, stderr = per_draw.mean(0), per_draw.std(0) / rows**0.5
    assert torch.all((mean - ref[0]).abs() <= 5 * stderr + 1e-12)


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, make_teacher, data_file):
    out = tmp_path_factory.mktemp("sampled") / "s.zarr"
    build_cache(options(make_teacher("mixtral"), data_file, out, encoding="sampled", draws=8))
    return out


@pytest.mark.parametrize("kind", ["rkl", "skl", "srkl", "jsd", "tvd"])
def test_training_from_a_sampled_cache_refuses_biased_losses(kind, sampled_cache, tmp_path, student):
    from moekd.distill.train import train

    cache = sampled_cache
    with pytest.raises(MoekdError, match=f"--loss {kind}: .* sampled teacher tokens, and .*not linear in p"):
        train(train_options(student, tmp_path / "run", cache, loss=kind))
    with pytest.raises(MoekdError, match=r"--temperature 2: .*temperature 1 only; .*--proposal-temp 0.5"):
        train(train_options(student, tmp_path / "run", cache, temperature=2.0))
