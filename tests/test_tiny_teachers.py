"""The tiny teachers exercise routing, whatever the library's random initialisation.

Every MoE family's tiny teacher (built as the conformance suite builds it) and every hand-configured
one (the `make_teacher` fixture) must have gates that are neither one-hot nor flat and experts that
move the output, so that routing tests on them can fail. Floors (the extremes measured over the
families in brackets; the table and its command: docs/tiny_models.md):
- the top-k experts' mean share of g is below `MAX_GATE_MASS` (max 0.64) and above the uniform
  share k / N (min 0.28: Llama 4's top-1 sigmoid router, against 1/8);
- the mean KL(topk || all) per position is above `MIN_KL_ALL` nats (min 0.019, Gemma 4 text);
- the mean KL between two `ka` samples (λ = 0.5, other row seeds) is above `MIN_KL_KA` nats
  (min 2e-6, Llama 4; 8e-4 or more on the hand-configured teachers).
"""

import pytest
import torch

from moekd.families import moe_families
from moekd.routing.routers import recognise_routers
from moekd.tiny_models import MOE_FAMILIES, make_tiny_family_model, make_tiny_model
from moekd.tiny_routing import kl, routing_strength

MAX_GATE_MASS = 0.9
MIN_KL_ALL = 0.01
MIN_KL_KA = 1e-6
VOCAB = 258


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_rerouted(logits, native):
    """`logits` come from other experts than the `native` ones: mean KL(native || them) per position above
    MIN_KL_ALL, which every tiny teacher's KL(topk || all) passes. Routing tests use it to fail when the
    policy hooks do nothing."""
    p, q = (x.float().log_softmax(-1).flatten(0, -2) for x in (native, logits))
    assert kl(p, q) > MIN_KL_ALL, f"KL {kl(p, q):.2g} nats: the policy did not change the routing"


def tokens(vocab=VOCAB):
    return torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def assert_exercises_routing(model, ids):
    strength = routing_strength(model, ids)
    family = model.config.model_type
    if strength.gate_mass is None:
        pytest.skip(f"{family}: its routers return no per-token logits [T, N] (product keys): no gate distribution")
    assert strength.uniform_mass < strength.gate_mass < MAX_GATE_MASS, strength
    if not strength.supported:
        reason = next(i.reason for i in recognise_routers(model) if i.adapter is None)
        pytest.skip(f"{family}: gate mass checked; moekd routes it by --policy topk only ({reason})")
    assert strength.kl_topk_all > MIN_KL_ALL, strength
    assert strength.kl_ka_samples > MIN_KL_KA, strength


@pytest.mark.parametrize("family", moe_families(), ids=lambda f: f.model_type)
def test_family_teacher_exercises_routing(family):
    try:
        model = make_tiny_family_model(family.model_type, vocab_size=VOCAB, seed=1)
    except Exception as e:
        pytest.skip(f"{family.model_type} does not build small on CPU: {type(e).__name__}: {e}")
    assert_exercises_routing(model, tokens())


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_hand_configured_teacher_exercises_routing(family, load, tokenizer):
    assert_exercises_routing(load(family), tokens(len(tokenizer)))


@pytest.mark.parametrize("builder", ["family", "hand"])
def test_weights_do_not_depend_on_the_library_init(builder, tokenizer):
    """The same seed gives the same weights under any global torch seed; another seed other weights."""

    def build(seed, global_seed):
        torch.manual_seed(global_seed)
        if builder == "family":
            return make_tiny_family_model("qwen3_moe", vocab_size=VOCAB, seed=seed).state_dict()
        return make_tiny_model("mixtral", tokenizer, seed=seed).state_dict()

    first, again, other = build(1, 0), build(1, 12345), build(2, 0)
    assert first.keys() == again.keys() and all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    routers = [n for n in first if n.endswith("gate.weight")]
    assert routers and all(not torch.equal(first[n], other[n]) for n in routers)


def test_training_init_is_the_usual_small_one(tokenizer):
    model = make_tiny_model("mixtral", tokenizer, seed=1, init="training")
    std = model.config.initializer_range
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            assert abs(float(param.detach().std()) - std) < 0.2 * std, name
        else:
            assert torch.equal(param, torch.ones_like(param)), name  # RMSNorm weights, as the library sets them
    strength = routing_strength(model, tokens(len(tokenizer)))
    assert strength.gate_mass < strength.uniform_mass + 0.1  # near-uniform gates, as before training
