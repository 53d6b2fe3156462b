"""`moekd demo --quick` end to end: a smoke test of the whole pipeline (its numbers are not asserted)."""

import json

from typer.testing import CliRunner

from moekd.cli import app
from moekd.distill.metrics import read_metrics


def test_quick_demo_runs_every_stage_and_reuses_them(tmp_path):
    work = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--workdir", str(work)])
    assert result.exit_code == 0, result.output
    rows = json.loads((work / "results.json").read_text())["rows"]
    assert list(rows) == ["teacher (MoE, SFT)", "student SFT", "student KD topk", "student KD all", "student KD ka",
                          "student MoE KD", "student MoE B-Distill"]
    for row in rows.values():
        assert 0 <= row["rougeL_mean"] <= 100 and len(row["rougeL_per_seed"]) == 2
    assert all(rows[f"student KD {name}"]["cache_bytes"] > 0 for name in ("topk", "all", "ka"))
    for name in ("teacher (MoE, SFT)", "student MoE KD", "student MoE B-Distill"):
        assert rows[name]["load_cv"] >= 0 and rows[name]["gate_entropy"] > 0
    assert rows["student MoE KD"]["heldout_loss"] > 0 and rows["student MoE B-Distill"]["heldout_loss"] > 0
    bd = read_metrics(work / "moe_students" / "bdistill")[-1]
    assert "mc_loss" in bd and "tau/0" in bd and "mc_loss" not in read_metrics(work / "moe_students" / "kd")[-1]
    assert (work / "results.png").stat().st_size > 0
    assert "student KD ka" in result.output and "student MoE B-Distill" in result.output
    # a second run reuses every finished stage: nothing is retrained, the results are the same
    stamp = (work / "teacher" / "final" / "model.safetensors").stat().st_mtime_ns
    again = CliRunner().invoke(app, ["demo", "--quick", "--workdir", str(work)])
    assert again.exit_code == 0, again.output
    assert (work / "teacher" / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((work / "results.json").read_text())["rows"] == rows


def test_demo_refuses_a_workdir_of_another_plan(tmp_path):
    (tmp_path / "plan.json").write_text("{}")
    result = CliRunner().invoke(app, ["demo", "--quick", "--workdir", str(tmp_path)])
    assert result.exit_code != 0 and "holds a run of another plan" in str(result.exception)
