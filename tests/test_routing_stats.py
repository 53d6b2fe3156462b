"""Routing statistics against a direct numpy computation on a tiny teacher."""

import json

import numpy as np
import pytest
import torch
from rich.console import Console

from moekd.data.prompts import tokenize_records
from moekd.data.records import load_records
from moekd.errors import MoekdError
from moekd.routing.controller import RouterController
from moekd.routing.policies import make_policy
from moekd.routing.stats import (
    StatsOptions,
    compute_routing_stats,
    plot_stats,
    render_table,
    routing_stats_for_files,
)


@pytest.fixture(scope="module")
def teacher(make_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(make_teacher("qwen2_moe"))).eval()


@pytest.fixture(scope="module")
def examples(data_file, tokenizer):
    loaded = load_records(data_file)
    return tokenize_records(loaded.records[:5], loaded.source_index[:5], tokenizer, 128, 192).examples


def direct_stats(model, examples):
    """Per layer: gate probs and activated masks of the response positions, one example at a time."""
    ctrl = RouterController(model, None, capture_gates=True)
    gates, active = None, None
    for ex in examples:
        with torch.no_grad(), ctrl.active():
            model(input_ids=torch.tensor(ex.input_ids[None], dtype=torch.long))
        g = [x.numpy()[ex.target_positions] for x in ctrl.gate_probs()]
        a = [x.numpy()[ex.target_positions] for x in ctrl.activated_experts()]
        gates = g if gates is None else [np.concatenate(p) for p in zip(gates, g)]
        active = a if active is None else [np.concatenate(p) for p in zip(active, a)]
    return gates, active


def test_stats_match_direct_numpy_computation(teacher, examples, tokenizer):
    stats = compute_routing_stats(teacher, examples, pad_token_id=tokenizer.pad_token_id, batch_size=2)
    gates, active = direct_stats(teacher, examples)
    assert stats.tokens == sum(len(ex.target_positions) for ex in examples) == len(gates[0])
    assert (stats.num_experts, stats.top_k, stats.router_class) == (8, 2, "Qwen2MoeTopKRouter")
    for layer, g, a in zip(stats.layers, gates, active):
        g = g.astype(np.float64)
        activated = (g * a).sum(axis=1).mean()
        counts = a.sum(axis=0)
        load = counts / counts.sum()
        entropy = -(g * np.log(g)).sum(axis=1).mean()
        assert layer.activated_mass == pytest.approx(activated, abs=1e-5)
        assert layer.activated_mass + layer.dormant_mass == pytest.approx(1.0, abs=1e-9)
        assert layer.dormant_mass == pytest.approx(((g * ~a).sum(axis=1)).mean(), abs=1e-5)
        assert sum(layer.load) == pytest.approx(1.0, abs=1e-9)
        np.testing.assert_allclose(layer.load, load, atol=1e-9)
        assert layer.load_cv == pytest.approx(load.std() / load.mean(), abs=1e-9)
        assert layer.gate_entropy == pytest.approx(entropy, abs=1e-4)
        assert layer.mean_activated == pytest.approx(2.0)
        assert 0 < layer.activated_mass < 1


def test_all_policy_activates_the_whole_gate_mass(teacher, examples, tokenizer):
    stats = compute_routing_stats(teacher, examples, make_policy("all"), tokenizer.pad_token_id, scope="all")
    assert stats.tokens == sum(len(ex.input_ids) for ex in examples)
    for layer in stats.layers:
        assert layer.activated_mass == pytest.approx(1.0, abs=1e-5)
        assert layer.mean_activated == 8 and layer.load_cv == pytest.approx(0.0, abs=1e-9)


def test_table_plot_json_and_file_entry_point(make_teacher, data_file, tmp_path):
    stats = routing_stats_for_files(StatsOptions(str(make_teacher("mixtral")), str(data_file), "ka", max_examples=3))
    console = Console(record=True, width=160)
    console.print(render_table(stats))
    text = console.export_text()
    assert "activated" in text and stats.layers[0].layer in text
    plot_stats(stats, tmp_path / "routing.png")
    assert (tmp_path / "routing.png").stat().st_size > 0
    assert json.loads(json.dumps(stats.to_dict()))["layers"][0]["mean_activated"] == pytest.approx(7.0)


def test_dense_teacher_is_reported(make_teacher, data_file):
    with pytest.raises(MoekdError, match="no MoE routers"):
        routing_stats_for_files(StatsOptions(str(make_teacher("llama")), str(data_file), max_examples=2))


def test_routing_stats_command(make_teacher, data_file, tmp_path):
    import json

    from typer.testing import CliRunner

    from moekd.cli import app

    args = [
        "routing",
        "stats",
        "--teacher",
        str(make_teacher("olmoe")),
        "--data",
        str(data_file),
        "--max-examples",
        "8",
    ]
    table = CliRunner().invoke(app, args + ["--plot", str(tmp_path / "r.png")])
    assert table.exit_code == 0, table.output
    assert "model.layers.1.mlp.gate" in table.output and (tmp_path / "r.png").stat().st_size > 0
    as_json = CliRunner().invoke(app, args + ["--policy", "ka", "--json"])
    stats = json.loads(as_json.stdout)
    assert stats["policy"] == "ka" and len(stats["layers"]) == 2
    for layer in stats["layers"]:
        assert abs(layer["activated_mass"] + layer["dormant_mass"] - 1) < 1e-5
        assert layer["mean_activated"] == 7 and layer["activated_mass"] > 0.9  # N - 1 experts, not the native 2
    dense = CliRunner().invoke(
        app, ["routing", "stats", "--teacher", str(make_teacher("llama")), "--data", str(data_file)]
    )
    assert "has no MoE routers" in str(dense.exception)
