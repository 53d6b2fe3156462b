"""`moekd demo --quick` end to end: a smoke test of the whole pipeline (its numbers are not asserted)."""

import json

from typer.testing import CliRunner

from moekd.cli import app
from moekd.training.metrics import read_metrics


def test_quick_demo_runs_every_stage_and_reuses_them(tmp_path):
    work = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--workdir", str(work)])
    assert result.exit_code == 0, result.output
    results = json.loads((work / "results.json").read_text())
    rows = results["rows"]
    assert list(rows) == ["SFT", "KD topk", "KD all", "KD ka", "KD sar", "MoE KD", "MoE B-Distill"]
    for name, row in rows.items():
        assert set(row["replicates"]) == {"0", "1"}  # two training seeds
        for replicate in row["replicates"].values():
            assert 0 <= replicate["rougeL"] <= 100 and len(replicate["rougeL_per_seed"]) == 2
            assert replicate["nll"] > 0 and replicate["kl"] > 0
        assert row["rougeL"]["n"] == 2 and row["rougeL"]["std"] is not None
        assert ("vs_reference" in row["nll"]) == (name != "KD topk")
        assert ("heldout_kd" in row) == (name != "SFT") and ("load_cv" in row) == name.startswith("MoE")
    assert all(rows[name]["cache_bytes"] > 0 for name in ("KD topk", "KD all", "KD ka", "KD sar", "MoE KD"))
    sar = results["sar"]  # the routers behind the sar cache, trained with the SFT seed-0 student's feedback
    assert sar["train_seconds"] > 0 and len(sar["kl_original_trained"]) == 2
    assert all(kl > 0 for kl in sar["kl_original_trained"].values())
    assert (work / "sar" / "router.safetensors").exists() and "SAR" in result.output
    # MoE to MoE: B-Distill's differences are taken against logit KD of the same MoE student initialisations
    assert (
        rows["MoE B-Distill"]["load_cv"]["vs_reference"]["n"] == 2 and "vs_reference" not in rows["MoE KD"]["load_cv"]
    )
    for replicate in (*rows["MoE KD"]["replicates"].values(), *rows["MoE B-Distill"]["replicates"].values()):
        assert replicate["load_cv"] >= 0 and replicate["gate_entropy"] > 0 and replicate["heldout_kd"] > 0
    bd = read_metrics(work / "students" / "MoE-B-Distill" / "seed-0")[-1]
    assert (
        "mc_loss" in bd and "tau/0" in bd and "mc_loss" not in read_metrics(work / "students" / "MoE-KD" / "seed-0")[-1]
    )
    assert set(results["teacher"]) == {"native", "all"} and results["teacher"]["all"]["kl"] > 0
    # different training seeds give different students (initialisation and batch order)
    sft = rows["SFT"]["replicates"]
    assert sft["0"]["nll"] != sft["1"]["nll"]
    assert (work / "results.png").stat().st_size > 0
    assert "student KD ka" in result.output and "MoE students: held-out KD loss and routing" in result.output
    # a second run reuses every finished stage: nothing is retrained, the results are the same
    stamp = (work / "teacher" / "final" / "model.safetensors").stat().st_mtime_ns
    again = CliRunner().invoke(app, ["demo", "--quick", "--workdir", str(work), "--jobs", "1"])
    assert again.exit_code == 0, again.output
    assert (work / "teacher" / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((work / "results.json").read_text())["rows"] == rows


def test_demo_refuses_a_workdir_of_another_plan(tmp_path):
    (tmp_path / "plan.json").write_text("{}")
    result = CliRunner().invoke(app, ["demo", "--quick", "--workdir", str(tmp_path)])
    assert result.exit_code != 0 and "holds a run of another plan" in str(result.exception)


def test_the_built_in_plans_are_files_a_config_of_ones_own_starts_from(tmp_path):
    """moekd/demo/plans/*.yaml are the plans `moekd demo` and `--quick` run; a copy with changes is a plan too,
    a misspelt field is refused naming it, and --config with --quick is refused."""
    import pytest

    from moekd.demo import DEFAULT_PLAN, QUICK_PLAN
    from moekd.demo.plan import PLANS, CacheSpec, load_plan
    from moekd.errors import MoekdError

    assert load_plan(PLANS / "quick.yaml") == QUICK_PLAN and DEFAULT_PLAN.reference == "KD topk"
    assert CacheSpec("ka", "ka", {"samples": 2, "ka_lambda": 0.05}) in DEFAULT_PLAN.caches
    mine = tmp_path / "mine.yaml"
    mine.write_text((PLANS / "quick.yaml").read_text().replace("train_seeds: [0, 1]", "train_seeds: [0, 1, 2, 3]"))
    assert load_plan(mine).train_seeds == (0, 1, 2, 3)
    mine.write_text((PLANS / "quick.yaml").read_text().replace("n_test:", "n_tests:"))
    with pytest.raises(MoekdError, match=r"--config .*mine.yaml: not a demo plan \(n_test: Field required; n_tests"):
        load_plan(mine)
    result = CliRunner().invoke(app, ["demo", "--quick", "--config", str(mine), "--workdir", str(tmp_path / "w")])
    assert isinstance(result.exception, MoekdError) and "pass one of them" in str(result.exception)
    assert not (tmp_path / "w").exists()
