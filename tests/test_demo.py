"""`moekd demo --quick` end to end: a smoke test of the whole pipeline (its numbers are not asserted)."""

import json

from typer.testing import CliRunner

from moekd.cli import app


def test_quick_demo_runs_every_stage_and_reuses_them(tmp_path):
    work = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--workdir", str(work)])
    assert result.exit_code == 0, result.output
    rows = json.loads((work / "results.json").read_text())["rows"]
    assert list(rows) == ["teacher (MoE, SFT)", "student SFT", "student KD topk", "student KD all", "student KD ka",
                          "student KD sar"]
    for row in rows.values():
        assert 0 <= row["rougeL_mean"] <= 100 and len(row["rougeL_per_seed"]) == 2
    assert all(rows[f"student KD {name}"]["cache_bytes"] > 0 for name in ("topk", "all", "ka", "sar"))
    sar = rows["student KD sar"]
    assert sar["sar_train_seconds"] > 0 and len(sar["router_kl"]) == 2 and all(kl > 0 for kl in sar["router_kl"].values())
    assert (work / "sar" / "router.safetensors").exists() and "+" in result.output
    assert (work / "results.png").stat().st_size > 0
    assert "student KD ka" in result.output
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
