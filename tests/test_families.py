"""Conformance suite generated from the installed transformers: every MoE causal-LM family.

The families come from `moekd.families.moe_families()` (the library's causal-LM mapping and
its router recorders), each built small from its own config class by
`tiny_models.make_tiny_family_model`, saved and loaded back like a user's checkpoint. A family
that does not build small on CPU is skipped with the reason; a check that the family's config
cannot express (no native top-k = N, no renormalisation to compare with) is skipped with why.
A family whose own weighting is no known computation takes the published weighting (softmax
over the kept experts' logits): its checks compare with that, computed here independently. A
family without one logit per expert per token must refuse every policy but `topk`, naming its class.
"""

import json

import pytest
import torch
from transformers import PretrainedConfig

from moekd import CacheReader
from moekd.cache_builder.build import build_cache
from moekd.errors import MoekdError
from moekd.families import moe_families
from moekd.routing.controller import RouterController
from moekd.routing.policies import make_policy
from moekd.routing.routers import find_routers, recognise_routers
from moekd.store.verify import verify_store
from moekd.tiny_models import TOP_K_FIELDS, make_tiny_family_model
from tests.test_cache_build import options
from tests.test_tiny_teachers import assert_rerouted

FAMILIES = moe_families()
SELECTION_QUIRKS = ("selection bias", "group-limited")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    from moekd.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("byte_tokenizer")
    return train_tokenizer(["tiny"], vocab_size=258, out_dir=out)  # the 256 bytes and two specials


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    rows = [
        {"instruction": "Name a colour.", "context": "", "response": "Blue."},
        {"instruction": "Add 2 and 3.", "context": "", "response": "5"},
        {"instruction": "Reverse it.", "context": "a b c", "response": "c b a"},
    ]
    path = tmp_path_factory.mktemp("tiny_data") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, byte_tokenizer):
    """`family_dir(family)` -> directory of its saved tiny model (built once), or a skip with the reason."""
    built: dict = {}

    def build(family):
        if family.model_type not in built:
            out = tmp_path_factory.mktemp(f"family_{family.model_type}")
            try:
                make_tiny_family_model(
                    family.model_type, vocab_size=len(byte_tokenizer), seed=1, out_dir=out, tokenizer=byte_tokenizer
                )
                built[family.model_type] = (out, None)
            except Exception as e:
                built[family.model_type] = (
                    None,
                    f"{family.model_type} does not build small on CPU: {type(e).__name__}: {e}",
                )
        out, reason = built[family.model_type]
        if reason:
            pytest.skip(reason)
        return out

    return build


def load(path, config=None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **({"config": config} if config is not None else {})).eval()


def batch(rows=2, length=10, vocab=258, seed=0):
    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def forward(model, policy=None, ids=None, mask=None, seeds=None, capture=False):
    ids, mask = (ids, mask) if ids is not None else batch()
    ctrl = RouterController(model, policy, capture_gates=capture) if policy is not None else None
    with torch.no_grad():
        if ctrl is None:
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits, None
        with ctrl.active(row_seeds=seeds):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if capture:
        assert_every_layer_captured(ctrl)
    return logits, ctrl


def assert_every_layer_captured(ctrl):
    assert len(ctrl.gate_probs()) == len(ctrl.activated_experts()) == len(ctrl.moe_layers) > 0


def adapters_or_refusal(model, policy_name):
    """The adapters of a supported family; for an unsupported one, check the refusal and skip the rest."""
    infos = recognise_routers(model)
    unsupported = [i for i in infos if i.adapter is None]
    if unsupported:
        name = type(unsupported[0].module).__name__
        with pytest.raises(MoekdError, match=f"router class {name} is not supported"):
            RouterController(model, make_policy(policy_name, samples=1), capture_gates=policy_name == "topk")
        what = "gate capture" if policy_name == "topk" else f"--policy {policy_name}"
        pytest.skip(
            f"{model.config.model_type}: {name} is not supported ({unsupported[0].reason}); {what} is refused naming "
            "the class, as checked"
        )
    return infos


def record_selections(info, store):
    """Hooks storing (logits, weights, index) of each call of a router into `store[info.name]`.

    Registered after a controller's hooks, they see the policy's selection.
    """
    adapter = info.adapter
    if info.target is None:
        return [info.module.register_forward_hook(lambda m, a, out: store.update({info.name: adapter.read(out)}))]
    logits = {}
    return [
        info.module.register_forward_hook(lambda m, a, out: logits.update(last=out)),
        info.target.register_forward_pre_hook(
            lambda m, a, k: store.update({info.name: (logits["last"], *adapter.read_call(a, k))}), with_kwargs=True
        ),
    ]


def routed(model, policy=None, seeds=None):
    """Final logits, every router's selection as dense [T, N] weights and its logits, under `policy` (native if None)."""
    infos = recognise_routers(model)
    ids, mask = batch()
    selections = {}
    ctrl = RouterController(model, policy or make_policy("topk"))
    with torch.no_grad(), ctrl.active(row_seeds=seeds):
        handles = [h for info in infos for h in record_selections(info, selections)]
        try:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
    dense = []
    for info in infos:
        _, weights, index = selections[info.name]
        dense.append(torch.zeros(index.shape[0], info.adapter.num_experts).scatter(1, index, weights.float()))
    return logits, dense, [selections[info.name][0].float() for info in infos]


def published_dense(router_logits, keep: int):
    """The published weighting of the `keep` experts with the largest logits: softmax over them, 0 elsewhere."""
    kept = torch.zeros_like(router_logits, dtype=torch.bool).scatter(1, router_logits.topk(keep, dim=-1).indices, True)
    return router_logits.masked_fill(~kept, float("-inf")).softmax(dim=-1)


def published_reference(model, keep: int):
    """Final logits and dense weights of `model` with every router's output rewritten to the published top-`keep`:
    its own logits, the `keep` largest selected and weighted by their softmax (no moekd routing code)."""
    infos = recognise_routers(model)
    if any(i.adapter.layout != "triple" for i in infos):
        pytest.skip("the published reference is written for routers returning (logits, weights, index, ...)")

    def rewrite(module, args, out):
        index = out[0].float().topk(keep, dim=-1).indices
        weights = out[0].float().gather(1, index).softmax(dim=-1)
        return (out[0], weights.to(out[1].dtype), index, *out[3:])

    handles = [i.module.register_forward_hook(rewrite) for i in infos]
    try:
        return routed(model)
    finally:
        for h in handles:
            h.remove()


def published_or_native(path, model, adapter, policy, keep: int, normalise: bool, seeds=None):
    """(routing under `policy`, the reference it must equal): the family itself with top-k = `keep` where its
    native weighting fits; else the published top-`keep`, whose per-layer weights are checked here first."""
    got = routed(model, policy, seeds=seeds)
    if adapter.weighting != "published":
        return got, routed(native_reference(path, model, keep, normalise))
    for layer, (dense, router_logits) in enumerate(zip(got[1], got[2])):
        torch.testing.assert_close(
            dense, published_dense(router_logits, keep), msg=lambda m, layer=layer: f"MoE layer {layer}: {m}"
        )
    return got, published_reference(model, keep)


def native_reference(path, model, top_k: int, normalise: bool):
    """The saved model with every router's native top-k set to `top_k`, no group limit, renormalising if asked."""
    from transformers import AutoConfig

    family = model.config.model_type
    config = AutoConfig.from_pretrained(str(path))
    text = config.get_text_config()
    parts = [text, *(v for v in vars(text).values() if isinstance(v, PretrainedConfig))]  # e.g. DBRX's ffn_config
    fields = [(part, f) for part in parts for f in TOP_K_FIELDS if isinstance(getattr(part, f, None), int)]
    if not fields:
        pytest.skip(f"{family}: the config has no top-k field to set")
    for part, f in fields:
        setattr(part, f, top_k)
    if getattr(text, "n_group", None) and getattr(text, "topk_group", None):
        text.topk_group = text.n_group
    if normalise and hasattr(text, "norm_topk_prob"):
        text.norm_topk_prob = True
    try:
        native = load(path, config)
    except Exception as e:
        pytest.skip(
            f"{family}: the family does not build with top-k = {top_k}: {type(e).__name__}: {str(e).splitlines()[0]}"
        )
    if normalise and not all(i.adapter.normalise for i in recognise_routers(native)):
        pytest.skip(
            f"{family}: its native weighting does not renormalise, and no config flag makes it, so the "
            "renormalised weights have no native counterpart"
        )
    return native


def assert_same_routing(got, expected):
    (logits, dense, _), (native_logits, native_dense, _) = got, expected
    for layer, (ours, theirs) in enumerate(zip(dense, native_dense)):
        torch.testing.assert_close(
            ours, theirs, atol=1e-5, rtol=1e-4, msg=lambda m, layer=layer: f"MoE layer {layer}: {m}"
        )
    torch.testing.assert_close(logits, native_logits, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_routers_are_found_in_forward_order(family, family_dir):
    model = load(family_dir(family))
    routers = find_routers(model)
    assert routers, "no router module found"
    assert {type(r).__name__ for _, r in routers} <= set(family.router_classes)
    called = []
    handles = [r.register_forward_hook(lambda m, a, o, name=name: called.append(name)) for name, r in routers]
    try:
        forward(model)
    finally:
        for h in handles:
            h.remove()
    order = list(dict.fromkeys(called))
    assert [info.name for info in recognise_routers(model)] == order
    assert RouterController(model).moe_layers == order and sorted(order) == sorted(n for n, _ in routers)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_topk_is_bit_identical(family, family_dir):
    model = load(family_dir(family))
    reference_logits, _ = forward(model)
    logits, ctrl = forward(model, make_policy("topk"))
    assert torch.equal(logits, reference_logits)
    if all(i.adapter is not None for i in recognise_routers(model)):
        logits, ctrl = forward(model, make_policy("topk"), capture=True)
        assert torch.equal(logits, reference_logits)
        assert all(a.sum(dim=-1).eq(ctrl.top_k).all() for a in ctrl.activated_experts())


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_captured_gates_are_the_family_gates(family, family_dir):
    """The adapter reproduces the router's own weights on a fresh batch in every layer; g is its distribution."""
    model = load(family_dir(family))
    infos = adapters_or_refusal(model, "topk")
    ctrl = RouterController(model, make_policy("topk"), capture_gates=True)
    outputs = {}
    handles = [h for info in infos for h in record_selections(info, outputs)]
    ids, mask = batch(seed=3)
    try:
        with torch.no_grad(), ctrl.active():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert_every_layer_captured(ctrl)
    for info, gates, active in zip(infos, ctrl.gate_probs(), ctrl.activated_experts()):
        adapter = info.adapter
        logits, weights, index = outputs[info.name]
        assert gates.dtype == torch.float32 and gates.shape == (20, adapter.num_experts)
        torch.testing.assert_close(gates.sum(dim=-1), torch.ones(20), atol=1e-5, rtol=0)
        torch.testing.assert_close(gates, adapter.gate_probs(info.module, logits))
        if adapter.weighting == "published":  # g reproduces the logits up to a constant per token; no native weights
            log_ratio = gates.log() - logits.float()
            torch.testing.assert_close(log_ratio, log_ratio[:, :1].expand_as(log_ratio), atol=1e-4, rtol=0)
            published = logits.float().gather(1, index).softmax(dim=-1)
            torch.testing.assert_close(adapter.weights(info.module, logits, index), published)
        else:
            own = adapter.weights(info.module, logits, index).to(weights.dtype)
            torch.testing.assert_close(own, weights, atol=1e-5, rtol=1e-4)
        assert torch.equal(active, torch.zeros_like(active).scatter_(1, index, True))
        if not any(q.startswith(SELECTION_QUIRKS) for q in info.quirks):
            top = torch.zeros_like(active).scatter_(1, gates.topk(adapter.top_k, dim=-1).indices, True)
            assert torch.equal(active, top), "native experts are not the top-k of g"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_all_equals_native_top_k_of_n(family, family_dir):
    """`all` weights every expert by its renormalised score: the family itself with top-k = N (renormalising)."""
    path = family_dir(family)
    model = load(path)
    adapter = adapters_or_refusal(model, "all")[0].adapter
    normalise = adapter.score != "softmax"
    got, expected = published_or_native(path, model, adapter, make_policy("all"), adapter.num_experts, normalise)
    assert all((d != 0).all() for d in got[1])
    assert_same_routing(got, expected)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_ka_lambda0_equals_native_top_n_minus_1_renormalised(family, family_dir):
    path = family_dir(family)
    model = load(path)
    adapter = adapters_or_refusal(model, "ka")[0].adapter
    logits, ctrl = forward(model, make_policy("ka", samples=1, ka_lambda=0.0), seeds=[1, 2], capture=True)
    for gates, active in zip(ctrl.gate_probs(), ctrl.activated_experts()):
        assert torch.equal(active, torch.ones_like(active).scatter_(1, gates.argmin(dim=-1, keepdim=True), False))
    policy = make_policy("ka", samples=1, ka_lambda=0.0)
    got, expected = published_or_native(path, model, adapter, policy, adapter.num_experts - 1, True, seeds=[1, 2])
    torch.testing.assert_close(got[0], logits, atol=0, rtol=0)
    assert_same_routing(got, expected)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_native_weighting_coincides_with_published_or_says_how_it_differs(family, family_dir):
    """A family that keeps its native weighting weights a selection as the published definition does exactly
    when `published_difference` says so (None), else differently: on the N − 1 experts `ka` keeps at λ = 0
    (renormalised) and on k experts as `mc` keeps them (renormalised only where the family does). Routers
    returning probabilities in place of logits: their logs are the logits."""
    model = load(family_dir(family))
    infos = adapters_or_refusal(model, "ka")
    outputs = {}
    handles = [h for info in infos for h in record_selections(info, outputs)]
    try:
        forward(model)
    finally:
        for h in handles:
            h.remove()
    for info in infos:
        adapter, router = info.adapter, info.module
        logits = outputs[info.name][0].float()
        published_logits = logits.log() if adapter.score == "probabilities" else logits
        for renormalise, k in ((True, adapter.num_experts - 1), (False, adapter.top_k)):
            keep = logits.topk(k, dim=-1).indices
            published = published_logits.gather(1, keep).softmax(dim=-1)
            difference = adapter.published_difference(renormalise)
            weights = adapter.weights(router, logits, keep, renormalise=renormalise)
            if difference is None:
                torch.testing.assert_close(weights, published, atol=1e-5, rtol=1e-4)
            else:
                assert adapter.weighting == "native" and difference
                assert (weights - published).abs().max() > 1e-3, f"{difference}, yet the weights coincide"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_generate_with_kv_cache_under_ka(family, family_dir, byte_tokenizer):
    model = load(family_dir(family))
    adapters_or_refusal(model, "ka")
    ids, mask = batch(rows=2, length=6, seed=5)
    ctrl = RouterController(model, make_policy("ka", samples=1, ka_lambda=0.5), capture_gates=True)
    with torch.no_grad(), ctrl.active(row_seeds=[5, 6]):
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            use_cache=True,
            pad_token_id=byte_tokenizer.pad_token_id,
        )
    assert out.shape == (2, 9)
    assert_every_layer_captured(ctrl)
    last_step = ctrl.activated_experts()
    assert all(a.shape[0] == 2 and a.sum(dim=-1).eq(ctrl.num_experts - 1).all() for a in last_step)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_cache_build_and_deep_verify(family, family_dir, tiny_data, tmp_path):
    from rich.console import Console

    path = family_dir(family)
    infos = recognise_routers(load(path))
    supported = all(i.adapter is not None for i in infos)
    policy = dict(policy="ka", policy_params={"samples": 1, "ka_lambda": 0.5}, router_probs="full") if supported else {}
    out = tmp_path / "cache.zarr"
    console = Console(record=True, width=1000)
    build_cache(options(path, tiny_data, out, k=8, max_prompt_len=256, max_len=320, **policy), console=console)
    assert verify_store(str(out), deep=True).ok
    meta = CacheReader(out).meta
    assert meta.teacher.moe_layers == [info.name for info in infos]
    if supported:
        weighting = " / ".join(sorted({i.adapter.weighting for i in infos}))
        assert meta.policy.name == "ka" and meta.gates.mode == "full" and meta.policy.weighting == weighting
        said = (
            "the published (softmax over the kept experts' logits"
            if "published" in weighting
            else "the family's native"
        )
        assert f"--policy ka weights the selected experts by {said}" in console.export_text()
    else:
        assert meta.policy.weighting == "native"  # topk: the router's own weighting


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_sar_backward_reaches_exactly_the_gate_parameters(family, family_dir):
    """SAR's teacher side on every family: all experts active, only the gate parameters trainable,
    the output loss reaches each of them, and the recorder sees each router's g and native choice."""
    from moekd.routing.router_file import recognised_routers, router_gate_parameters
    from moekd.sar.objective import RouterRecorder

    model = load(family_dir(family))
    adapters_or_refusal(model, "all")
    infos = recognised_routers(model)
    params = router_gate_parameters(infos)
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    ctrl, recorder = RouterController(model, make_policy("all")), RouterRecorder(infos)
    ids, mask = batch()
    with torch.no_grad():
        native_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    with ctrl.active(), recorder.recording():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits.float().log_softmax(-1).mean().backward()
        gates, native = list(recorder.gates), list(recorder.native_index)
    assert_rerouted(logits.detach(), native_logits)  # every expert, not the native top-k
    assert len(gates) == len(native) == len(infos)
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}: no gradient"
    frozen = {n for n, p in model.named_parameters() if n not in params}
    assert all(model.get_parameter(n).grad is None for n in frozen)
    for info, g, index in zip(infos, gates, native):
        assert g.shape[1] == info.adapter.num_experts and g.requires_grad
        torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[0]), atol=1e-4, rtol=0)
        assert index.shape == (g.shape[0], info.adapter.top_k)


def test_routing_families_command_reports_kind_policies_and_why_not():
    from typer.testing import CliRunner

    from moekd.cli import app

    families = ["mixtral", "phimoe", "deepseek_v3", "doge"]
    result = CliRunner().invoke(app, ["routing", "families", *(a for f in families for a in ("--family", f)), "--json"])
    assert result.exit_code == 0, result.output
    reports = {r["model_type"]: r for r in json.loads(result.stdout)}
    assert reports["mixtral"]["supported"] and reports["mixtral"]["policies"] == ["topk", "all", "ka", "topp", "mc"]
    assert (
        reports["mixtral"]["kind"] == "softmax" and reports["mixtral"]["weighting"] == "selected scores, renormalised"
    )
    assert reports["mixtral"]["policy_weighting"] == "native (= published)"
    assert reports["deepseek_v3"]["policy_weighting"].startswith("native (differs from published: sigmoid(logits)")
    phimoe = reports["phimoe"]
    assert phimoe["supported"] and phimoe["policies"] == ["topk", "all", "ka", "topp", "mc"]
    assert phimoe["policy_weighting"] == "published: softmax over the kept experts' logits"
    assert "no known function of the selected experts' scores" in phimoe["weighting"]
    assert not reports["doge"]["supported"] and reports["doge"]["policies"] == ["topk"]
    assert "no [T, N] logits, one per expert" in reports["doge"]["reason"]
    markdown = CliRunner().invoke(app, ["routing", "families", "--family", "mixtral", "--markdown"])
    assert (
        "| mixtral | MixtralTopKRouter | softmax |" in markdown.stdout
        and "1 / 1 MoE causal-LM families" in markdown.stdout
    )
    bad = CliRunner().invoke(app, ["routing", "families", "--family", "bert"])
    assert bad.exit_code != 0 and "--family: bert is not an MoE causal-LM model type" in str(bad.exception)
