"""Replicate statistics (experiments.py) against explicit computations."""

import math

import numpy as np
import pytest

from moekd.experiments import Stopwatch, expert_specialisation, mean_std, paired_difference, summarise_rows


def test_mean_std_is_the_sample_std():
    stats = mean_std([1.0, 2.0, 4.0])
    assert stats["mean"] == pytest.approx(7 / 3) and stats["n"] == 3
    assert stats["std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert mean_std([5.0])["std"] is None


def test_paired_difference_t_interval_by_hand():
    row, reference = {0: 31.0, 1: 33.0, 2: 32.5}, {0: 30.0, 1: 31.5, 2: 32.0}
    diffs = [1.0, 1.5, 0.5]
    sd = math.sqrt(sum((d - 1.0) ** 2 for d in diffs) / 2)
    half = 4.302652729749462 * sd / math.sqrt(3)  # t_{0.975, 2}
    got = paired_difference(row, reference)
    assert got["mean"] == pytest.approx(1.0) and got["n"] == 3
    assert got["low"] == pytest.approx(1.0 - half) and got["high"] == pytest.approx(1.0 + half)
    # only shared seeds are paired; one pair has no interval
    assert paired_difference({0: 2.0, 5: 9.0}, {0: 1.0})["mean"] == 1.0
    assert paired_difference({0: 2.0, 5: 9.0}, {0: 1.0})["low"] is None


def test_pairing_removes_what_a_seed_does_to_both_rows():
    seed_effect = {0: -3.0, 1: 0.0, 2: 3.0}
    row = {s: 10.0 + 0.5 + e for s, e in seed_effect.items()}
    reference = {s: 10.0 + e for s, e in seed_effect.items()}
    got = paired_difference(row, reference)
    assert got["mean"] == pytest.approx(0.5) and got["high"] - got["low"] == pytest.approx(0.0, abs=1e-12)


def test_summarise_rows():
    replicates = {
        "KD topk": {0: {"rougeL": 30.0, "nll": 1.0, "kl": None}, 1: {"rougeL": 32.0, "nll": 1.2, "kl": None}},
        "KD all": {0: {"rougeL": 31.0, "nll": 0.9, "kl": 0.1}, 1: {"rougeL": 34.0, "nll": 1.0, "kl": 0.2}},
    }
    summary = summarise_rows(replicates, "KD topk")
    assert "vs_reference" not in summary["KD topk"]["rougeL"] and "kl" not in summary["KD topk"]
    assert summary["KD all"]["rougeL"]["mean"] == pytest.approx(32.5)
    assert summary["KD all"]["rougeL"]["vs_reference"]["mean"] == pytest.approx(1.5)
    assert summary["KD all"]["nll"]["vs_reference"]["mean"] == pytest.approx(-0.15)
    assert "vs_reference" not in summary["KD all"]["kl"]  # the reference has no KL to pair with


def test_expert_specialisation_by_hand():
    # two families, one layer, two experts: family a always expert 0, family b always expert 1
    loads = {"a": np.array([[1.0, 0.0]]), "b": np.array([[0.0, 1.0]])}
    (layer,) = expert_specialisation(loads, {"a": 30, "b": 10})
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert layer["expert_entropy"] == pytest.approx(h) and layer["mutual_information"] == pytest.approx(h)
    assert layer["top_expert_share"] == {"a": 1.0, "b": 1.0}
    same = expert_specialisation({"a": np.array([[0.5, 0.5]]), "b": np.array([[0.5, 0.5]])}, {"a": 1, "b": 3})
    assert same[0]["mutual_information"] == pytest.approx(0.0, abs=1e-12)


def test_stopwatch_accumulates_parts():
    clock = Stopwatch()
    for _ in range(2):
        with clock.part("work"):
            sum(i * i for i in range(20000))
    assert set(clock.parts) == {"work"} and clock.parts["work"]["wall_seconds"] > 0
    assert clock.parts["work"]["cpu_seconds"] >= 0
