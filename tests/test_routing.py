"""Router discovery, the router controller and the routing policies on tiny teachers."""

from collections import defaultdict

import pytest
import torch
from torch import nn
from transformers.utils.output_capturing import OutputRecorder

from moekd.errors import MoekdError
from moekd.routing.controller import RouterController
from moekd.routing.policies import KnowledgeAugmentation, MonteCarloRouting, make_policy
from moekd.seeds import derive_seed, mix64, token_uniforms
from moekd.tiny_models import MOE_FAMILIES
from tests.test_tiny_teachers import assert_rerouted

SOFTMAX_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def batch(rows=2, length=12, seed=0, vocab=300):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, length), generator=gen)
    return ids, torch.ones_like(ids)


def run(model, policy, ids, mask, seeds=None, **kwargs):
    ctrl = RouterController(model, policy, capture_gates=True)
    with torch.no_grad(), ctrl.active(row_seeds=seeds):
        out = model(input_ids=ids, attention_mask=mask, **kwargs)
    assert len(ctrl.activated_experts()) == len(ctrl.moe_layers), "a MoE layer routed outside the controller"
    return out, ctrl


def block_io(model, policy, ids, mask, seeds=None, layer=0):
    """Input and output of the first MoE block, and the controller, for one forward under `policy`."""
    block = model.model.layers[layer].mlp
    seen = {}
    handle = block.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    try:
        _, ctrl = run(model, policy, ids, mask, seeds)
    finally:
        handle.remove()
    return block, seen["x"].reshape(-1, seen["x"].shape[-1]), seen["y"].reshape(-1, seen["y"].shape[-1]), ctrl


def expert_outputs(experts, x):
    """[N, T, H]: every expert applied to every token, from the expert weights."""
    gate, up = torch.einsum("th,nih->nti", x, experts.gate_up_proj).chunk(2, dim=-1)
    return torch.einsum("nti,nhi->nth", experts.act_fn(gate) * up, experts.down_proj)


def hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------- counter-based draws


def reference_mix64(x: int) -> int:
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def test_mix64_is_splitmix64_bit_for_bit():
    values = [0, 1, 7, 2**31, 2**62 + 12345, 2**63 - 1, -1, -(2**63)]
    got = mix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [g & ((1 << 64) - 1) for g in got] == [reference_mix64(v & ((1 << 64) - 1)) for v in values]


def test_derive_seed_formula_and_range():
    mask = (1 << 64) - 1
    expected = reference_mix64(reference_mix64(reference_mix64(42) ^ 3) ^ 1) & ((1 << 63) - 1)
    assert derive_seed(42, 3, 1) == expected
    seeds = {derive_seed(42, e, m) for e in range(50) for m in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(-1, 0, 0) == reference_mix64(reference_mix64(reference_mix64(mask))) & ((1 << 63) - 1)


def test_token_uniforms_depend_only_on_seed_layer_position_slot():
    u = token_uniforms(torch.tensor([5, 9]), 1, torch.tensor([[0, 1, 2], [0, 1, 2]]), 4)
    alone = token_uniforms(torch.tensor([9]), 1, torch.tensor([[1, 2]]), 4)
    assert torch.equal(u.reshape(2, 3, 4)[1, 1:], alone.reshape(2, 4))
    assert not torch.equal(u.reshape(2, 3, 4)[0], u.reshape(2, 3, 4)[1])
    assert not torch.equal(u, token_uniforms(torch.tensor([5, 9]), 0, torch.tensor([[0, 1, 2], [0, 1, 2]]), 4))
    assert float(u.min()) > 0 and float(u.max()) < 1
    by_position = u.reshape(2, 3, 4)[0]
    assert not torch.equal(by_position[0], by_position[1]) and not torch.equal(by_position[1], by_position[2])


# ---------------------------------------------------------------- discovery, errors, native routing


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_topk_is_bit_identical_and_hooks_are_removed(load, family):
    model = load(family)
    ids, mask = batch()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    before = hook_counts(model)  # after a first forward: transformers installs its output recorders lazily
    out, ctrl = run(model, make_policy("topk"), ids, mask, output_router_logits=True)
    assert torch.equal(out.logits, reference.logits)
    assert all(torch.equal(a, b) for a, b in zip(out.router_logits, reference.router_logits))
    assert ctrl.num_experts == 8 and ctrl.top_k == 2 and len(ctrl.moe_layers) == 2
    assert all(a.sum(dim=-1).eq(2).all() for a in ctrl.activated_experts())
    ka, _ = run(model, make_policy("ka", ka_lambda=0.5), ids, mask, seeds=[1, 2])
    assert_rerouted(ka.logits, reference.logits)
    assert hook_counts(model) == before
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, reference.logits)


def test_dense_teacher_allows_topk_only(load):
    model = load("llama")
    ctrl = RouterController(model, make_policy("topk"))
    assert ctrl.moe_layers == [] and ctrl.router_class is None
    with pytest.raises(MoekdError, match="--policy ka needs an MoE teacher"):
        RouterController(model, make_policy("ka"))


class SquaredLogitsRouter(nn.Module):
    """Weights no known computation gives: squared logits of the top-2."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        logits = x.reshape(-1, 8) @ self.weight.T
        weights, index = (logits**2).topk(2, dim=-1)
        return logits, weights, index


class ModelWithUnknownRouter(nn.Module):
    _can_record_outputs = {"router_logits": OutputRecorder(SquaredLogitsRouter, index=0)}

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.router = SquaredLogitsRouter()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return self.router(self.embed(input_ids))


def test_unknown_router_computation_takes_the_published_weighting():
    """No known computation gives its weights, but it has a logit per expert and token: the policies weight the
    kept experts by the softmax of their logits (the others at -inf), g is softmax(logits)."""
    model = ModelWithUnknownRouter()
    with torch.no_grad():
        model.router.weight.copy_(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    ids = torch.randint(0, 16, (1, 12), generator=torch.Generator().manual_seed(1))
    assert RouterController(model, make_policy("topk")).weighting == "native"
    for policy, keep in ((make_policy("all"), 4), (make_policy("ka", samples=1, ka_lambda=0.0), 3)):
        ctrl = RouterController(model, policy, capture_gates=True)
        assert ctrl.weighting == "published" and ctrl.router_class == "SquaredLogitsRouter"
        assert "published (softmax over the kept experts' logits" in ctrl.weighting_text()
        assert "no known function of the selected experts' scores" in ctrl.weighting_text()
        with torch.no_grad(), ctrl.active(row_seeds=[0]):
            logits, weights, index = model(ids)
        kept = torch.zeros(12, 4, dtype=torch.bool).scatter(1, logits.topk(keep, dim=-1).indices, True)
        expected = logits.masked_fill(~kept, float("-inf")).softmax(dim=-1)
        torch.testing.assert_close(torch.zeros(12, 4).scatter(1, index, weights), expected)
        torch.testing.assert_close(ctrl.gate_probs()[0], logits.softmax(dim=-1))


class LogitsOnlyRouter(SquaredLogitsRouter):
    def forward(self, x):
        return x.reshape(-1, 8) @ self.weight.T


class ModelWithLogitsOnlyRouter(ModelWithUnknownRouter):
    _can_record_outputs = {"router_logits": OutputRecorder(LogitsOnlyRouter, index=0)}

    def __init__(self):
        super().__init__()
        self.router = LogitsOnlyRouter()


def test_router_without_a_selection_is_refused_naming_why():
    model = ModelWithLogitsOnlyRouter()
    ctrl = RouterController(model, make_policy("topk"))
    assert ctrl.router_class == "LogitsOnlyRouter" and ctrl.moe_layers == ["router"]
    with pytest.raises(MoekdError, match="router class LogitsOnlyRouter is not supported: it returns only its logits"):
        RouterController(model, make_policy("all"))
    with pytest.raises(MoekdError, match="capturing gate distributions: router class LogitsOnlyRouter"):
        RouterController(model, make_policy("topk"), capture_gates=True)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(name="topk", samples=2), "--m 2 with --policy topk"),
        (dict(name="all", samples=3), "deterministic"),
        (dict(name="ka", samples=0), "--m"),
        (dict(name="ka", ka_lambda=1.5), "--ka-lambda"),
        (dict(name="ka", ka_drop=0), "--ka-drop"),
        (dict(name="topp", top_p=0.0), "--top-p"),
        (dict(name="mc", top_p=0.5), "--top-p applies only to --policy topp"),
        (dict(name="greedy"), "--policy"),
    ],
)
def test_bad_policy_parameters_name_the_flag(kwargs, flag):
    with pytest.raises(MoekdError, match=flag):
        make_policy(**kwargs)


def test_ka_drop_must_leave_an_expert(load):
    with pytest.raises(MoekdError, match="--ka-drop 8 leaves no expert"):
        RouterController(load("mixtral"), make_policy("ka", ka_drop=8))


def test_describe_rebuilds_the_policy():
    policy = make_policy("ka", samples=4, ka_lambda=0.1)
    assert (policy.name, policy.samples, policy.stochastic) == ("ka", 4, True)
    assert policy.describe() == {"ka_lambda": 0.1, "ka_drop": 1}
    for p in (
        policy,
        make_policy("topp", top_p=0.8),
        make_policy("mc", samples=3),
        make_policy("all"),
        make_policy("topk"),
    ):
        assert make_policy(p.name, samples=p.samples, **p.describe()) == p


# ---------------------------------------------------------------- policy definitions against explicit computations


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_ka_lambda0_keeps_top_n_minus_1_with_renormalised_weights(load, family):
    """Renormalised on OLMoE too, whose native top-k is not (norm_topk_prob=False)."""
    model = load(family)
    ids, mask = batch()
    block, x, y, ctrl = block_io(model, make_policy("ka", samples=1, ka_lambda=0.0), ids, mask, seeds=[1, 2])
    for gates, active in zip(ctrl.gate_probs(), ctrl.activated_experts()):
        expected = torch.ones_like(active).scatter_(1, gates.argmin(dim=-1, keepdim=True), False)
        assert torch.equal(active, expected)
    logits = x @ block.gate.weight.T
    masked = logits.masked_fill(~ctrl.activated_experts()[0], float("-inf"))
    weights = torch.softmax(masked, dim=-1)  # docs/methods.md §2: unselected logits -inf, softmax over the rest
    explicit = torch.einsum("tn,nth->th", weights, expert_outputs(block.experts, x))
    torch.testing.assert_close(y, explicit, atol=1e-5, rtol=1e-4)


def test_ka_on_deepseek_v3_keeps_native_weighting(load):
    model = load("deepseek_v3")
    ids, mask = batch()
    block, x, y, ctrl = block_io(model, make_policy("ka", samples=1, ka_lambda=0.0), ids, mask, seeds=[1, 2])
    router = block.gate
    scores = (x.float() @ router.weight.T).sigmoid()
    active = ctrl.activated_experts()[0]
    assert torch.equal(active.sum(dim=-1), torch.full((x.shape[0],), 7))
    assert torch.equal(active, scores > scores.min(dim=-1, keepdim=True).values)
    weights = scores * active
    weights = weights / weights.sum(dim=-1, keepdim=True) * router.routed_scaling_factor
    explicit = torch.einsum("tn,nth->th", weights, expert_outputs(block.experts, x)) + block.shared_experts(x)
    torch.testing.assert_close(y, explicit, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ctrl.gate_probs()[0], scores / scores.sum(dim=-1, keepdim=True))


def test_topp_selects_smallest_set_reaching_p(load):
    model = load("mixtral")
    ids, mask = batch()
    block, x, y, ctrl = block_io(model, make_policy("topp", top_p=0.7), ids, mask)
    for gates, active in zip(ctrl.gate_probs(), ctrl.activated_experts()):
        size = active.sum(dim=-1)
        top = gates.sort(dim=-1, descending=True).values.cumsum(dim=-1)
        assert (top.gather(1, (size - 1)[:, None]) >= 0.7 - 1e-6).all()
        smaller = top.gather(1, (size - 2).clamp(min=0)[:, None]).squeeze(1)
        assert ((size == 1) | (smaller < 0.7)).all()
        assert torch.equal(active, gates >= gates.masked_fill(~active, 2.0).min(dim=-1, keepdim=True).values)
        assert size.min() < size.max()  # the set size really varies per token
    gates = ctrl.gate_probs()[0]
    weights = gates * ctrl.activated_experts()[0]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    explicit = torch.einsum("tn,nth->th", weights, expert_outputs(block.experts, x))
    torch.testing.assert_close(y, explicit, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_mc_keeps_native_weighting_of_the_sampled_experts(load, family):
    """OLMoE (norm_topk_prob=False) weights the raw gate probs; Mixtral renormalises them."""
    model = load(family)
    ids, mask = batch()
    block, x, y, ctrl = block_io(model, make_policy("mc"), ids, mask, seeds=[3, 4])
    gates, active = ctrl.gate_probs()[0], ctrl.activated_experts()[0]
    assert torch.equal(active.sum(dim=-1), torch.full((x.shape[0],), 2))
    assert not torch.equal(active, torch.zeros_like(active).scatter_(1, gates.topk(2).indices, True))
    weights = gates * active
    if family == "mixtral":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    explicit = torch.einsum("tn,nth->th", weights, expert_outputs(block.experts, x))
    torch.testing.assert_close(y, explicit, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_all_equals_native_routing_with_k_equal_n(load, family):
    ids, mask = batch()
    out, ctrl = run(load(family), make_policy("all"), ids, mask)
    with torch.no_grad():
        native = load(family, num_experts_per_tok=8)(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out.logits, native.logits, atol=1e-5, rtol=1e-4)
    assert all(a.all() for a in ctrl.activated_experts())


def test_all_on_deepseek_v3_uses_native_weighting_over_every_expert(load):
    model = load("deepseek_v3")
    ids, mask = batch()
    block, x, y, _ = block_io(model, make_policy("all"), ids, mask)
    scores = (x.float() @ block.gate.weight.T).sigmoid()
    weights = scores / scores.sum(dim=-1, keepdim=True) * block.gate.routed_scaling_factor
    explicit = torch.einsum("tn,nth->th", weights, expert_outputs(block.experts, x)) + block.shared_experts(x)
    torch.testing.assert_close(y, explicit, atol=1e-5, rtol=1e-4)


def test_captured_gates_are_softmax_of_recorded_router_logits(load):
    ids, mask = batch()
    out, ctrl = run(load("qwen2_moe"), make_policy("ka"), ids, mask, seeds=[1, 2], output_router_logits=True)
    for gates, logits in zip(ctrl.gate_probs(), out.router_logits):
        assert gates.dtype == torch.float32
        torch.testing.assert_close(gates, torch.softmax(logits.float(), dim=-1))


# ---------------------------------------------------------------- sampling statistics


def inclusion_probabilities(p: list[float], k: int) -> list[float]:
    """P(expert i is among k draws without replacement from p), exactly, by dynamic programming over subsets."""
    states = {0: 1.0}
    for _ in range(k):
        following = defaultdict(float)
        for chosen, prob in states.items():
            left = 1.0 - sum(p[i] for i in range(len(p)) if chosen >> i & 1)
            for j in range(len(p)):
                if not chosen >> j & 1:
                    following[chosen | 1 << j] += prob * p[j] / left
        states = following
    return [sum(prob for chosen, prob in states.items() if chosen >> i & 1) for i in range(len(p))]


def selection_frequencies(policy, gates, draws, top_k=2):
    rows = torch.arange(draws, dtype=torch.int64)
    uniforms = token_uniforms(rows, 0, torch.zeros(draws, 1, dtype=torch.int64), gates.numel() + 1)
    index, _ = policy.select(gates.expand(draws, -1), uniforms, top_k)
    chosen = torch.zeros(draws, gates.numel(), dtype=torch.bool).scatter_(1, index, True)
    return chosen, chosen.double().mean(dim=0)


def assert_frequencies(observed, expected, draws):
    expected = torch.tensor(expected, dtype=torch.float64)
    tolerance = 5 * (expected * (1 - expected) / draws).sqrt() + 1e-9
    assert ((observed - expected).abs() <= tolerance).all(), (observed, expected)


GATES = torch.softmax(torch.linspace(1.5, -1.5, 8), dim=0)


def test_ka_lambda1_samples_without_replacement_from_the_gates():
    draws = 40000
    _, freq = selection_frequencies(KnowledgeAugmentation(ka_lambda=1.0), GATES, draws)
    assert_frequencies(freq, inclusion_probabilities(GATES.tolist(), 7), draws)


def test_ka_coin_explores_with_probability_lambda():
    draws = 40000
    chosen, _ = selection_frequencies(KnowledgeAugmentation(ka_lambda=0.3), GATES, draws)
    not_top = chosen[:, -1].double().mean()  # the last expert has the smallest gate: the top N-1 leave it out
    sampled_keeps_smallest = inclusion_probabilities(GATES.tolist(), 7)[-1]
    assert_frequencies(not_top.reshape(1), [0.3 * sampled_keeps_smallest], draws)


def test_mc_samples_k_experts_without_replacement_from_the_gates():
    draws = 40000
    chosen, freq = selection_frequencies(MonteCarloRouting(), GATES, draws, top_k=2)
    assert chosen.sum(dim=-1).eq(2).all()
    assert_frequencies(freq, inclusion_probabilities(GATES.tolist(), 2), draws)


# ---------------------------------------------------------------- reproducibility


def test_same_seed_reproduces_and_different_seeds_differ(load):
    model = load("mixtral")
    ids, mask = batch()
    policy = make_policy("ka", ka_lambda=1.0)
    first, ctrl = run(model, policy, ids, mask, seeds=[11, 12])
    first_active = ctrl.activated_experts()
    again, ctrl = run(model, policy, ids, mask, seeds=[11, 12])
    assert torch.equal(first.logits, again.logits)
    assert all(torch.equal(a, b) for a, b in zip(first_active, ctrl.activated_experts()))
    other, ctrl = run(model, policy, ids, mask, seeds=[13, 14])
    assert not torch.equal(first.logits, other.logits)
    assert not all(torch.equal(a, b) for a, b in zip(first_active, ctrl.activated_experts()))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_row_draws_do_not_depend_on_batch_composition_or_padding(load, padding_side):
    model = load("mixtral")
    policy = make_policy("ka", ka_lambda=1.0)
    row, _ = batch(rows=1, length=9, seed=1)
    other, _ = batch(rows=1, length=14, seed=2)
    alone, ctrl = run(model, policy, row, torch.ones_like(row), seeds=[7])
    alone_active = ctrl.activated_experts()
    with torch.no_grad():
        assert_rerouted(alone.logits, model(input_ids=row).logits)
    cols = slice(0, 9) if padding_side == "right" else slice(5, 14)
    padded = torch.zeros(1, 14, dtype=torch.long)
    padded[0, cols] = row[0]
    ids = torch.cat([other, padded])
    mask = torch.ones_like(ids)
    mask[1] = padded[0] != 0
    out, ctrl = run(model, policy, ids, mask, seeds=[3, 7])
    torch.testing.assert_close(out.logits[1, cols], alone.logits[0], atol=1e-5, rtol=1e-4)
    for in_batch, single in zip(ctrl.activated_experts(), alone_active):
        assert torch.equal(in_batch.reshape(2, 14, -1)[1, cols], single)


def test_generate_with_kv_cache_uses_absolute_positions(make_teacher, tokenizer):
    """A decoding step routes its token as a full forward routes the same position (flat gates: draws decide)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(make_teacher("mixtral", gate_mass=0.3))).eval()
    prompt, mask = batch(rows=1, length=6, seed=3)
    policy = make_policy("mc")
    ctrl = RouterController(model, policy, capture_gates=True)
    with torch.no_grad(), ctrl.active(row_seeds=[5]):
        seq = model.generate(
            prompt,
            attention_mask=mask,
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    last_step = ctrl.activated_experts()
    assert seq.shape[1] == 9 and len(last_step) == 2 and last_step[0].shape[0] == 1
    _, full = run(model, policy, seq[:, :-1], torch.ones_like(seq[:, :-1]), seeds=[5])
    for step, whole in zip(last_step, full.activated_experts()):
        assert torch.equal(step[0], whole[-1])
    drawn = full.activated_experts()
    native = [torch.zeros_like(a).scatter_(1, g.topk(2).indices, True) for g, a in zip(full.gate_probs(), drawn)]
    assert any(not torch.equal(a, n) for a, n in zip(drawn, native)), "mc drew the native top-k"


def test_gradient_checkpointing_replays_the_same_draws(make_teacher):
    from transformers import AutoModelForCausalLM

    ids, mask = batch()
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(str(make_teacher("mixtral", gate_mass=0.3)))
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        with torch.no_grad():
            native = model(input_ids=ids, attention_mask=mask).logits
        ctrl = RouterController(model, make_policy("mc"))
        with ctrl.active(row_seeds=[1, 2]):
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
            out.loss.backward()
        assert_rerouted(out.logits.detach(), native)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
