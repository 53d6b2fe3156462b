"""Teacher-forced response NLL and KL(teacher || model) against an explicit per-example computation;
evaluating a model routed by a policy (generation and scoring)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from moekd.cli import app
from moekd.data.prompts import format_prompt, prompt_ids
from moekd.data.synth import write_suite
from moekd.errors import MoekdError
from moekd.eval.evaluate import evaluate, load_eval_examples
from moekd.eval.generate import generate_responses, load_model
from moekd.eval.options import EvalOptions
from moekd.routing.controller import RouterController
from moekd.routing.policies import make_policy


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_suite(out, seed=0, n_train=16, n_valid=16, n_test=12)
    return out


@pytest.fixture(scope="module")
def loud_teacher(make_teacher, tmp_path_factory):
    """The tiny Mixtral with its expert outputs and logits scaled up, so that routing visibly moves its distributions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("loud")
    model = AutoModelForCausalLM.from_pretrained(str(make_teacher("mixtral")))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts.down_proj" in name or name == "lm_head.weight":
                param.mul_(30.0)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(make_teacher("mixtral"))).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def moved_router(loud_teacher, tmp_path_factory):
    """A router file for the loud teacher, written as `moekd sar train` writes one: its gate weights moved by seeded noise."""
    from moekd.models import checkpoint_sha256
    from moekd.routing.router_file import (
        describe_teacher,
        recognised_routers,
        router_gate_parameters,
        write_router_file,
    )
    from moekd.schemas.router import RouterFileMeta, RouterStudent

    model, _ = load_model(loud_teacher, "cpu")
    infos = recognised_routers(model)
    g = torch.Generator().manual_seed(0)
    tensors = {
        name: p.detach() + 0.5 * torch.randn(p.shape, generator=g) for name, p in router_gate_parameters(infos).items()
    }
    meta = RouterFileMeta(
        teacher=describe_teacher(model, infos, str(loud_teacher), checkpoint_sha256(loud_teacher)),
        parameters={name: list(t.shape) for name, t in tensors.items()},
        student=RouterStudent(name_or_path="seeded noise", co_trained=False),
        steps=0,
        settings={},
        loss_start=0.0,
        loss_end=0.0,
        created_at="2025-01-01T00:00:00+00:00",
        versions={},
    )
    out = tmp_path_factory.mktemp("router") / "router.safetensors"
    write_router_file(out, tensors, meta)
    return out


def sar_routers(router_file):
    """The teacher with its gate weights replaced by the router file's tensors, every router's own
    top-k widened to N (for Mixtral the `all` policy): the SAR teacher, built without moekd."""
    from safetensors.torch import load_file

    from moekd.routing.routers import find_routers

    def prepare(model):
        tensors = load_file(str(router_file))
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        assert tensors and not unexpected and len(missing) == len(model.state_dict()) - len(tensors)
        for _, router in find_routers(model):
            router.top_k = router.num_experts
        return model

    return prepare


def explicit_scores(model_dir, teacher_dir, data, policy=None, prepare=None):
    """Mean NLL and KL(teacher || model) over response tokens, one unpadded example at a time, from the definitions;
    `prepare` changes the loaded model first."""
    model, tokenizer = load_model(model_dir, "cpu")
    model = prepare(model) if prepare else model
    teacher, _ = load_model(teacher_dir, "cpu")
    nll, kl, count = 0.0, 0.0, 0
    for ex in load_eval_examples(data):
        prompt = prompt_ids(tokenizer, format_prompt(ex.record), False)
        response = tokenizer(ex.record.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            if policy is None:
                q = model(input_ids=ids).logits[0]
            else:
                with RouterController(model, policy).active():
                    q = model(input_ids=ids).logits[0]
            p = teacher(input_ids=ids).logits[0]
        for j, token in enumerate(response):  # logits at position len(prompt)-1+j predict response[j]
            log_q = torch.log_softmax(q[len(prompt) - 1 + j].double(), -1)
            log_p = torch.log_softmax(p[len(prompt) - 1 + j].double(), -1)
            nll -= float(log_q[token])
            kl += float((log_p.exp() * (log_p - log_q)).sum())
            count += 1
    return nll / count, kl / count, count


def test_nll_and_kl_equal_the_explicit_computation(make_teacher, synth_dir):
    student, teacher, data = make_teacher("llama"), make_teacher("mixtral"), synth_dir / "test.jsonl"
    report = evaluate(
        EvalOptions(str(student), [str(data)], rouge=False, teacher=str(teacher), batch_size=5, device="cpu")
    )
    (scores,) = report.datasets
    nll, kl, count = explicit_scores(student, teacher, data)
    assert scores.response_positions == count
    assert scores.nll == pytest.approx(nll, rel=1e-5) and scores.kl_from_teacher == pytest.approx(kl, rel=1e-5)
    assert scores.mean is None and scores.per_seed == {} and report.generations == []
    assert kl > 1e-3  # two random models differ: the match above can see a wrong sign or a missing term


def test_kl_of_a_model_from_itself_is_zero_and_a_policy_moves_it(loud_teacher, synth_dir):
    teacher, data = loud_teacher, synth_dir / "test.jsonl"
    native = evaluate(EvalOptions(str(teacher), [str(data)], rouge=False, teacher=str(teacher), device="cpu")).datasets[
        0
    ]
    assert native.kl_from_teacher == 0.0
    policy = make_policy("topk", experts=8)
    routed = evaluate(
        EvalOptions(
            str(teacher),
            [str(data)],
            rouge=False,
            teacher=str(teacher),
            policy="topk",
            policy_params={"experts": 8},
            device="cpu",
        )
    )
    nll, kl, _ = explicit_scores(teacher, teacher, data, policy)
    assert routed.datasets[0].kl_from_teacher == pytest.approx(kl, rel=1e-5) and kl > 1e-2
    assert routed.datasets[0].nll == pytest.approx(nll, rel=1e-5)
    assert routed.settings["policy"] == {"name": "topk", "params": {"experts": 8}, "seed": 0}
    same = evaluate(
        EvalOptions(
            str(teacher), [str(data)], rouge=False, nll=True, policy="topk", policy_params={"experts": 2}, device="cpu"
        )
    )
    assert same.datasets[0].nll == native.nll  # K = native k: no hook, the same numbers


def test_sar_policy_routes_by_the_router_file(loud_teacher, moved_router, synth_dir, tmp_path):
    from moekd.fsio import sha256_file

    teacher, data = loud_teacher, synth_dir / "test.jsonl"
    sar = evaluate(
        EvalOptions(
            str(teacher),
            [str(data)],
            rouge=False,
            teacher=str(teacher),
            policy="sar",
            router=str(moved_router),
            device="cpu",
        )
    )
    nll, kl, _ = explicit_scores(teacher, teacher, data, prepare=sar_routers(moved_router))
    assert sar.datasets[0].nll == pytest.approx(nll, rel=1e-5) and sar.datasets[0].kl_from_teacher == pytest.approx(
        kl, rel=1e-5
    )
    plain = evaluate(
        EvalOptions(str(teacher), [str(data)], rouge=False, nll=True, policy="all", device="cpu")
    ).datasets[0]
    assert abs(sar.datasets[0].nll - plain.nll) > 1e-2  # the router file moved the scores off the original routers'
    assert sar.settings["router"] == {"path": str(moved_router), "sha256": sha256_file(moved_router)}
    assert sar.settings["policy"]["name"] == "sar"
    out = tmp_path / "sar.json"
    args = ["eval", "--model", str(teacher), "--data", str(data), "--no-rouge", "--nll", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--policy", "sar", "--router", str(moved_router), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["datasets"][0]["nll"] == pytest.approx(nll, rel=1e-5)


def test_generation_under_a_policy_routes_every_decoding_step(loud_teacher, synth_dir):
    """`all` through the controller's hooks generates what a checkpoint whose native k is N generates."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(loud_teacher, "cpu")
    prompts = [
        prompt_ids(tokenizer, format_prompt(ex.record), False) for ex in load_eval_examples(synth_dir / "test.jsonl", 6)
    ]
    routed = generate_responses(
        model, tokenizer, prompts, 0, 12, batch_size=3, greedy=True, routing=RouterController(model, make_policy("all"))
    )
    k_equal_n = AutoModelForCausalLM.from_pretrained(str(loud_teacher), num_experts_per_tok=8).eval()
    assert routed == generate_responses(k_equal_n, tokenizer, prompts, 0, 12, batch_size=3, greedy=True)
    assert routed != generate_responses(model, tokenizer, prompts, 0, 12, batch_size=3, greedy=True)


def run(model, data, **options):
    """`evaluate` of `model` on the one file `data`, with EvalOptions `options`."""
    return evaluate(EvalOptions(str(model), [str(data)], **options))


def test_stochastic_policy_draws_per_data_row(loud_teacher, synth_dir):
    teacher, data = loud_teacher, synth_dir / "test.jsonl"
    ka = dict(policy="ka", policy_params={"ka_lambda": 1.0})
    first = run(teacher, data, rouge=False, nll=True, **ka, device="cpu", batch_size=4).datasets[0].nll
    regrouped = run(teacher, data, rouge=False, nll=True, **ka, device="cpu", batch_size=5).datasets[0].nll
    other_seed = run(teacher, data, rouge=False, nll=True, **ka, routing_seed=1, device="cpu").datasets[0].nll
    assert first == pytest.approx(regrouped, rel=1e-6) and first != pytest.approx(other_seed, rel=1e-6)


def test_errors_name_the_flag(make_teacher, synth_dir, tmp_path, tokenizer):
    data = synth_dir / "test.jsonl"
    with pytest.raises(MoekdError, match="--no-rouge leaves nothing"):
        run(make_teacher("mixtral"), data, rouge=False)
    with pytest.raises(MoekdError, match="--experts 2 needs an MoE teacher"):
        run(make_teacher("llama"), data, rouge=False, nll=True, policy="topk", policy_params={"experts": 2})
    from moekd.data.tokenizer import train_tokenizer
    from moekd.tiny_models import make_tiny_model

    other = train_tokenizer(["a completely different corpus of words"] * 20, 300)
    make_tiny_model("llama", other, tmp_path / "other")
    with pytest.raises(MoekdError, match="--teacher: .* another tokenizer"):
        run(make_teacher("llama"), data, rouge=False, teacher=str(tmp_path / "other"))
    result = CliRunner().invoke(
        app, ["eval", "--model", str(make_teacher("mixtral")), "--data", str(data), "--experts", "4"]
    )
    assert isinstance(result.exception, MoekdError) and "need --policy" in str(result.exception)


def test_router_flag_goes_with_policy_sar(make_teacher, moved_router, synth_dir):
    data, teacher = synth_dir / "test.jsonl", make_teacher("mixtral")
    with pytest.raises(MoekdError, match="--policy sar needs --router FILE"):
        run(teacher, data, rouge=False, nll=True, policy="sar")
    with pytest.raises(MoekdError, match="--router applies only to --policy sar, not --policy all"):
        run(teacher, data, rouge=False, nll=True, policy="all", router=str(moved_router))
    with pytest.raises(MoekdError, match=r"--router applies only to --policy sar, not native routing \(no --policy\)"):
        run(teacher, data, rouge=False, nll=True, router=str(moved_router))
    with pytest.raises(MoekdError, match="was trained for another teacher"):  # it is the loud teacher's
        run(teacher, data, rouge=False, nll=True, policy="sar", router=str(moved_router))


def test_cli_teacher_forced_scores(make_teacher, synth_dir, tmp_path):
    out = tmp_path / "forced.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(make_teacher("llama")),
            "--data",
            str(synth_dir / "test.jsonl"),
            "--no-rouge",
            "--teacher",
            str(make_teacher("mixtral")),
            "--json",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "KL from teacher" in result.output
    (scores,) = json.loads(out.read_text())["datasets"]
    assert scores["nll"] > 0 and scores["kl_from_teacher"] > 0 and scores["response_positions"] > 0
    routed = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(make_teacher("mixtral")),
            "--data",
            str(synth_dir / "test.jsonl"),
            "--seeds",
            "10",
            "--max-new-tokens",
            "4",
            "--policy",
            "topk",
            "--experts",
            "4",
            "--nll",
            "--device",
            "cpu",
        ],
    )
    assert routed.exit_code == 0, routed.output
    assert "ROUGE-L" in routed.output and "NLL" in routed.output
