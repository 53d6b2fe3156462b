"""The chunked training loss against the exact references, values and gradients: the per-sample masked
computation it replaced (tests/reference_losses.py), F.cross_entropy on full logits and the dense
full-vocabulary losses; the tail bucket's error bound; the student split at its output layer."""

import math

import pytest
import torch
import torch.nn.functional as F

from moekd.distill.chunked import OutputLayer, chunked_output_loss
from moekd.distill.losses import KD_LOSSES, dense_kd_loss, student_bucket_logprobs
from moekd.distill.objective import KDLoss, SparseObjective, batch_loss
from moekd.distill.options import TrainOptions
from moekd.distill.student import Student
from moekd.errors import MoekdError
from moekd.tiny_models import tiny_config
from tests.reference_losses import exact_sparse_kd_loss, exact_tail_logsumexp

V, D, K = 48, 8, 5


def make_problem(positions=13, samples=2, k=K, seed=0, dtype=torch.float32, tiny_tail=False, padded=True):
    """Hidden states, an output layer with bias, a batch of sparse teacher targets and labels.

    tiny_tail: every position stores the same k ids, the teacher puts all but 1e-12 of its mass on
    them and the student's bias puts all but 1e-16 to 1e-10 of its mass there too. padded: two padded
    slots per sample (one repeating a stored id) and one position without a teacher.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(positions, D, generator=g, dtype=torch.float64)
    weight = 0.8 * torch.randn(V, D, generator=g, dtype=torch.float64)
    bias = 0.3 * torch.randn(V, generator=g, dtype=torch.float64)
    teacher = torch.log_softmax(2.0 * torch.randn(positions, samples, V, generator=g, dtype=torch.float64), -1)
    if tiny_tail:
        chosen = torch.randperm(V, generator=g)[:k]
        inside = torch.zeros(V, dtype=torch.bool)
        inside[chosen] = True
        teacher = torch.where(
            inside,
            teacher.masked_fill(~inside, -math.inf).log_softmax(-1) + math.log1p(-1e-12),
            teacher.masked_fill(inside, -math.inf).log_softmax(-1) + math.log(1e-12),
        )
        bias = bias + 33.0 * inside
    topk_logprobs, topk_ids = teacher.topk(k, dim=-1)
    tail = teacher.scatter(-1, topk_ids, -math.inf).logsumexp(-1)
    if padded:
        pad_ids = torch.stack([topk_ids[..., 0], torch.zeros_like(topk_ids[..., 0])], dim=-1)
        topk_ids = torch.cat([topk_ids, pad_ids], dim=-1)
        topk_logprobs = F.pad(topk_logprobs, (0, 2), value=-math.inf)
        topk_logprobs[1], tail[1] = -math.inf, -math.inf
    batch = {
        "topk_ids": topk_ids,
        "topk_logprobs": topk_logprobs.float(),
        "tail_logprob": tail.float(),
        "labels": torch.randint(V, (positions,), generator=g),
    }
    return hidden.to(dtype), OutputLayer(weight.to(dtype), bias.to(dtype)), batch, teacher


def options(kind="fkl", teacher="topk_tail", **kw) -> KDLoss:
    """The logit objective's settings for a cache of encoding kind `teacher`: a run's defaults with `kw` changed."""
    return TrainOptions(student="", out="", cache="", loss=kind, **kw).kd_loss(teacher)


def leaves(hidden, head):
    return hidden.clone().requires_grad_(), OutputLayer(
        head.weight.clone().requires_grad_(), head.bias.clone().requires_grad_(), head.scale, head.softcap
    )


def chunked(hidden, head, batch, o, chunk):
    """Terms and gradients (hidden, weight, bias) of the chunked objective."""
    hidden, head = leaves(hidden, head)
    terms = chunked_output_loss(hidden, head, SparseObjective(batch, o, torch.device("cpu")), chunk)
    grads = torch.autograd.grad(terms["loss"], (hidden, head.weight, head.bias))
    return {key: value.detach() for key, value in terms.items()}, grads


def reference(hidden, head, batch, o):
    """The same objective on full logits: the exact sparse loss it replaced and F.cross_entropy."""
    hidden, head = leaves(hidden, head)
    logits = head.logits(hidden)
    terms = {}
    if o.loss == "ce":
        terms["loss"] = F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, batch["labels"])
    else:
        kd = exact_sparse_kd_loss(
            logits,
            batch["topk_ids"],
            batch["topk_logprobs"],
            batch["tail_logprob"],
            o.loss,
            o.temperature,
            o.skew_lambda,
            o.jsd_beta,
        ).mean()
        ce = F.cross_entropy(logits.to(kd.dtype), batch["labels"])
        terms = (
            {"loss": (1 - o.ce_weight) * kd + o.ce_weight * ce, "kd_loss": kd, "ce_loss": ce}
            if o.ce_weight
            else {"loss": kd}
        )
    grads = torch.autograd.grad(terms["loss"], (hidden, head.weight, head.bias))
    return {key: value.detach() for key, value in terms.items()}, grads


def assert_same(actual, expected, rtol=2e-5, atol=2e-6):
    (terms, grads), (expected_terms, expected_grads) = actual, expected
    assert terms.keys() == expected_terms.keys()
    for key in terms:
        torch.testing.assert_close(terms[key].double(), expected_terms[key].double(), rtol=rtol, atol=atol)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == expected_grad.dtype
        torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("samples", [1, 2, 4])
@pytest.mark.parametrize("kind", KD_LOSSES)
def test_chunked_equals_the_exact_loss_with_padded_slots_and_uneven_chunks(kind, samples):
    """13 positions in chunks of 5, padded slots, a position without teacher, KD mixed with CE (one shared pass)."""
    hidden, head, batch, _ = make_problem(samples=samples)
    o = options(kind, ce_weight=0.3)
    assert_same(chunked(hidden, head, batch, o, chunk=5), reference(hidden, head, batch, o))
    # float64 throughout: equal to rounding, so the computation is exact, not approximate
    hidden, head, batch, _ = make_problem(samples=samples, dtype=torch.float64)
    assert_same(chunked(hidden, head, batch, o, chunk=5), reference(hidden, head, batch, o), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_tail_buckets_of_1e12_mass(kind):
    """Teacher and student both keep all but ~1e-12 of their mass on the stored ids."""
    hidden, head, batch, _ = make_problem(samples=2, tiny_tail=True, padded=False)
    student_tail = (
        head.logits(hidden).double().log_softmax(-1).scatter(-1, batch["topk_ids"][:, 0], -math.inf).logsumexp(-1)
    )
    assert student_tail.min() > -37 and student_tail.max() < -23  # 1e-16 .. 1e-10
    assert torch.allclose(batch["tail_logprob"].double(), torch.tensor(math.log(1e-12), dtype=torch.float64))
    o = options(kind)
    assert_same(chunked(hidden, head, batch, o, chunk=4), reference(hidden, head, batch, o), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_temperature_with_cross_entropy_uses_two_passes(kind):
    """KD at T = 2 and CE at T = 1 of the same chunk: two passes, one gradient."""
    hidden, head, batch, _ = make_problem(samples=2)
    o = options(kind, temperature=2.0, ce_weight=0.4)
    assert_same(chunked(hidden, head, batch, o, chunk=6), reference(hidden, head, batch, o))
    o = options(kind, temperature=2.0)
    assert_same(chunked(hidden, head, batch, o, chunk=6), reference(hidden, head, batch, o))


def test_plain_cross_entropy_equals_full_logits_cross_entropy():
    hidden, head, batch, _ = make_problem()
    sft = {"labels": batch["labels"]}
    assert_same(chunked(hidden, head, sft, options("ce"), chunk=4), reference(hidden, head, sft, options("ce")))


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_full_support_equals_the_dense_full_vocabulary_loss(kind):
    """k = V: the chunked KD is the dense loss over the whole vocabulary, values and gradients."""
    hidden, head, batch, teacher = make_problem(samples=2, k=V, padded=False)
    o = options(kind)
    terms, grads = chunked(hidden, head, batch, o, chunk=5)
    hidden_, head_ = leaves(hidden, head)
    logits = head_.logits(hidden_)
    dense = torch.stack([dense_kd_loss(logits, teacher[:, m].float(), kind) for m in range(2)], dim=1).mean()
    dense_grads = torch.autograd.grad(dense, (hidden_, head_.weight, head_.bias))
    assert_same((terms, grads), ({"loss": dense.detach()}, dense_grads), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("magnitude", [1, 4, 8, 12, 16, 20, 30, 80])
def test_tail_error_bound_against_the_exact_computation(magnitude):
    """Student tails of 1e-`magnitude` of the mass, from float32 logits: each tail log-prob within 2e-5
    of the float64 truth (the float32 rounding of a logsumexp) and of the per-sample masked
    computation this replaced, gradients within 1e-4.

    Sample 0 stores 8 ids holding all but 1e-`magnitude` of the mass; sample 1 shares 4 of them and
    stores 4 ids of that tiny rest, so sample 0's tail includes ids the pass leaves out of its rest.
    A tail taken as 1 - sum of the stored probabilities would lose all its digits below the epsilon
    of that sum (1e-7 in float32, 1e-16 in float64); this one is a sum of positive terms."""
    g = torch.Generator().manual_seed(magnitude)
    positions, vocab, k = 6, 1000, 8
    order = torch.stack([torch.randperm(vocab, generator=g) for _ in range(positions)])
    big = order[:, :k]
    ids = torch.stack([big, torch.cat([big[:, : k // 2], order[:, k : k + k // 2]], dim=1)], dim=1)
    outside = math.log(10.0**-magnitude * k / (vocab - k))  # the rest's logits, the stored ones around 0
    logits = (
        (outside + 0.5 * torch.randn(positions, vocab, generator=g, dtype=torch.float64))
        .scatter(-1, big, 0.3 * torch.randn(positions, k, generator=g, dtype=torch.float64))
        .float()
    )
    stored = torch.ones(positions, 2, k, dtype=torch.bool)

    student = logits.clone().requires_grad_()
    tail = student_bucket_logprobs(student, ids, stored)[..., -1]
    (grad,) = torch.autograd.grad(tail.sum(), student)

    exact = logits.clone().requires_grad_()
    exact_tail = torch.stack([exact_tail_logsumexp(exact, ids[:, m], stored[:, m]) for m in range(2)], 1)
    exact_tail = exact_tail - exact.logsumexp(-1, keepdim=True)
    (exact_grad,) = torch.autograd.grad(exact_tail.sum(), exact)

    truth_logits = logits.double().requires_grad_()
    log_q = truth_logits.log_softmax(-1)
    truth = torch.stack([log_q.scatter(-1, ids[:, m], -math.inf).logsumexp(-1) for m in range(2)], 1)
    (truth_grad,) = torch.autograd.grad(truth.sum(), truth_logits)
    assert torch.allclose(truth[:, 0], torch.tensor(-magnitude * math.log(10), dtype=torch.float64), atol=0.5)

    assert (tail.double() - truth).abs().max() < 2e-5
    assert (exact_tail.double() - truth).abs().max() < 2e-5
    assert (tail - exact_tail).abs().max() < 2e-5
    torch.testing.assert_close(grad.double(), truth_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, exact_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_bf16_hidden_states(weight_dtype):
    """bf16 hidden states: upcast per chunk (float32 output layer) or bf16 matmuls with float32 logits."""
    hidden, head, batch, _ = make_problem(samples=2)
    head = OutputLayer(head.weight.to(weight_dtype), head.bias.to(weight_dtype))
    hidden = hidden.to(torch.bfloat16)
    o = options("fkl", ce_weight=0.2)
    terms, grads = chunked(hidden, head, batch, o, chunk=5)
    assert [g.dtype for g in grads] == [torch.bfloat16, weight_dtype, weight_dtype]
    assert all(torch.isfinite(g.float()).all() for g in grads)
    expected = reference(hidden, head, batch, o)  # full logits in the same dtypes, the loss upcasts them
    tolerance = dict(rtol=1e-5, atol=1e-5) if weight_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    assert_same((terms, grads), expected, **tolerance)


def test_logit_scale_softcap_and_bias_of_the_output_layer():
    hidden, head, batch, _ = make_problem(samples=2)
    o = options("srkl", ce_weight=0.5)
    for layer in (
        OutputLayer(head.weight, head.bias, scale=0.25),
        OutputLayer(head.weight, head.bias, softcap=3.0),
        OutputLayer(head.weight, head.bias, scale=2.0, softcap=5.0),
    ):
        assert_same(chunked(hidden, layer, batch, o, chunk=5), reference(hidden, layer, batch, o))


def test_chunks_see_at_most_chunk_positions_and_no_grad_gives_the_same_terms():
    hidden, head, batch, _ = make_problem(positions=13)
    o = options("rkl", ce_weight=0.5)
    objective = SparseObjective(batch, o, torch.device("cpu"))
    shapes = []

    class Recording:
        terms = objective.terms

        def __call__(self, logits, rows, need_grad):
            shapes.append((tuple(logits.shape), rows, need_grad))
            return objective(logits, rows, need_grad)

    with torch.no_grad():
        terms = chunked_output_loss(hidden, head, Recording(), chunk=5)
    assert shapes == [((5, V), slice(0, 5), False), ((5, V), slice(5, 10), False), ((3, V), slice(10, 13), False)]
    assert not terms["loss"].requires_grad
    with_grad, _ = chunked(hidden, head, batch, o, chunk=5)
    for key in with_grad:
        assert torch.equal(terms[key], with_grad[key])


def test_the_loss_backward_scales_with_the_objective():
    """loss·w (gradient accumulation), or any function of it, gets its chain rule; other terms are detached."""
    hidden, head, batch, _ = make_problem()
    _, grads = chunked(hidden, head, batch, options("fkl", ce_weight=0.5), chunk=5)
    hidden_, head_ = leaves(hidden, head)
    terms = chunked_output_loss(
        hidden_, head_, SparseObjective(batch, options("fkl", ce_weight=0.5), torch.device("cpu")), 5
    )
    assert not terms["kd_loss"].requires_grad and not terms["ce_loss"].requires_grad
    (0.25 * terms["loss"] ** 2).backward()
    for param, grad in zip((hidden_, head_.weight, head_.bias), grads):
        torch.testing.assert_close(param.grad, 0.5 * terms["loss"].detach() * grad)


# ---------------------------------------------------------------- the student split at its output layer


def tiny_model(family, vocab=V, **extra):
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig

    torch.manual_seed(0)
    common = dict(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    configs = {
        "gemma2": lambda: Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0),
        "cohere": lambda: CohereConfig(**common, logit_scale=0.5),
        "granite": lambda: GraniteConfig(**common, logits_scaling=4.0),
    }
    config = configs[family]() if family in configs else tiny_config(family, vocab_size=vocab, hidden=16, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


def model_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(V, (2, 7), generator=g)
    rows = torch.tensor([1, 2, 3, 4, 5, 8, 9, 10, 11])  # flat b*T + t, as the loader gives them
    labels = input_ids.flatten()[rows + 1]
    teacher = torch.log_softmax(2.0 * torch.randn(len(rows), 2, V, generator=g), -1)
    topk_logprobs, topk_ids = teacher.topk(K, dim=-1)
    tail = teacher.scatter(-1, topk_ids, -math.inf).logsumexp(-1)
    return {
        "input_ids": input_ids,
        "rows": rows,
        "labels": labels,
        "topk_ids": topk_ids,
        "topk_logprobs": topk_logprobs,
        "tail_logprob": tail,
    }


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gemma2", "cohere", "granite"])
def test_batch_loss_equals_full_logits_of_the_model(family):
    """batch_loss through Student: the model's own logits (soft-capped, scaled) and the exact loss, parameter gradients too."""
    model = tiny_model(family)
    batch, o = model_batch(), options("jsd", ce_weight=0.25, loss_chunk=4)
    student = Student(model)
    terms = batch_loss(student, batch, o, torch.device("cpu"))
    terms["loss"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    logits = model(input_ids=batch["input_ids"], use_cache=False).logits.flatten(0, 1)[batch["rows"]]
    kd = exact_sparse_kd_loss(logits, batch["topk_ids"], batch["topk_logprobs"], batch["tail_logprob"], "jsd").mean()
    expected = 0.75 * kd + 0.25 * F.cross_entropy(logits, batch["labels"])
    expected.backward()
    torch.testing.assert_close(terms["loss"], expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["kd_loss"], kd.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_student_forward_returns_router_logits_of_the_same_forward():
    model = tiny_model("mixtral", experts=4)
    output = Student(model)(torch.randint(V, (2, 5)), output_router_logits=True)
    assert output.last_hidden_state.shape == (2, 5, 16)
    assert len(output.router_logits) == 2 and output.router_logits[0].shape == (10, 4)
    assert getattr(Student(model)(torch.randint(V, (2, 5))), "router_logits", None) is None


def test_a_family_with_other_logits_is_refused():
    from transformers import LlamaForCausalLM

    class ShiftedLogits(LlamaForCausalLM):  # a family that post-processes its logits in a way moekd does not know
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits + 1.0
            return output

    with pytest.raises(
        MoekdError, match="--student: ShiftedLogits computes its logits in a way moekd does not reproduce"
    ):
        Student(ShiftedLogits(tiny_config("llama", vocab_size=V, hidden=16)))


def _ddp_rank(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        student = DistributedDataParallel(Student(tiny_model("mixtral", experts=4)))
        terms = batch_loss(student, model_batch(seed=rank), options("fkl", loss_chunk=4), torch.device("cpu"))
        terms["loss"].backward()
        lm = student.module.lm
        results.put((rank, lm.lm_head.weight.grad.numpy(), lm.model.embed_tokens.weight.grad.numpy()))  # by value
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_wraps_the_student_forward(tmp_path):
    """Two gloo ranks on different batches: the output layer's gradient, which arrives through the
    chunked loss rather than the wrapped forward, is averaged across ranks like the others."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = [ctx.Process(target=_ddp_rank, args=(rank, str(tmp_path / "init"), results)) for rank in range(2)]
    for proc in procs:
        proc.start()
    grads = dict((rank, rest) for rank, *rest in (results.get() for _ in procs))
    for proc in procs:
        proc.join()
        assert proc.exitcode == 0

    single = []
    for rank in range(2):
        student = Student(tiny_model("mixtral", experts=4))
        batch_loss(student, model_batch(seed=rank), options("fkl", loss_chunk=4), torch.device("cpu"))[
            "loss"
        ].backward()
        single.append((student.lm.lm_head.weight.grad, student.lm.model.embed_tokens.weight.grad))
    for n in range(2):
        expected = (single[0][n] + single[1][n]) / 2
        for rank in range(2):
            torch.testing.assert_close(torch.from_numpy(grads[rank][n]), expected, rtol=1e-5, atol=1e-7)
