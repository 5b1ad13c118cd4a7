"""The report on seeded data: its numbers are the statistics functions' (checked against scipy elsewhere) and
scipy's where it matters here, and its words say whether there is a decision."""
from __future__ import annotations

import argparse

import httpx
import numpy as np
import pytest
from scipy import stats

from gateway.adapters_cli import run_command
from gateway.experiments.config import ExperimentConfig
from gateway.experiments.report import build_report
from gateway.experiments.store import ExperimentEvent, FactRow
from gateway.experiments_cli import add_commands

EXPERIMENT = ExperimentConfig(variants={"v1": 50, "v2": 50})


def seeded_rows(n: int, p1: float, p2: float, seed: int = 7, scores: bool = True) -> list[FactRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        variant = "v1" if i % 2 == 0 else "v2"
        p = p1 if variant == "v1" else p2
        score = float(np.clip(rng.normal(p, 0.2), 0, 1)) if scores else None
        label = float(rng.random() < p)
        status = 503 if rng.random() < 0.02 else 200
        rows.append(FactRow(float(i), variant, status, float(rng.gamma(2, 0.5)), float(rng.gamma(2, 0.1)), 20, 30,
                            score, label))
    return rows


def test_numbers_match_scipy_and_there_is_no_decision_in_an_a_a_experiment():
    rows = seeded_rows(600, 0.6, 0.6)
    report = build_report("legal", EXPERIMENT, {"v1": 50, "v2": 50}, rows, [], [])
    v1 = [r for r in rows if r.variant == "v1"]
    v2 = [r for r in rows if r.variant == "v2"]
    s1, s2 = np.array([r.score for r in v1]), np.array([r.score for r in v2])
    [summary1, summary2] = report["variants"]
    assert summary1["requests"] == 300 and summary1["errors"] == sum(r.status >= 500 for r in v1)
    assert summary1["ttft_p95_s"] == pytest.approx(np.percentile([r.ttft_s for r in v1], 95))
    low, high = stats.t.interval(0.95, len(s2) - 1, loc=s2.mean(), scale=stats.sem(s2))
    assert (summary2["score"]["mean"], summary2["score"]["low"], summary2["score"]["high"]) == pytest.approx(
        (s2.mean(), low, high))
    [comparison] = report["comparisons"]
    assert comparison["primary_metric"] == "score"
    assert comparison["score"]["p_value"] == pytest.approx(stats.ttest_ind(s2, s1, equal_var=False).pvalue)
    l1, l2 = [r.label for r in v1], [r.label for r in v2]
    table = [[sum(l1), len(l1) - sum(l1)], [sum(l2), len(l2) - sum(l2)]]
    assert comparison["label"]["p_value"] == pytest.approx(stats.chi2_contingency(table, correction=False)[1])
    assert report["decision"] == "no decision yet" and report["winner"] is None
    assert comparison["decision"].startswith("no decision yet on score")


def test_a_clearly_better_candidate_is_decided_and_named_the_winner():
    report = build_report("legal", EXPERIMENT, {"v1": 50, "v2": 50}, seeded_rows(2000, 0.5, 0.65), [], [])
    [comparison] = report["comparisons"]
    assert comparison["score"]["candidate_better"] and comparison["score"]["sequential_p_value"] <= 0.05
    assert report["winner"] == "v2" and report["decision"] == "decided: promote v2"
    assert comparison["decision"].startswith("decided: v2 is better than v1")


def test_without_scores_the_labels_decide_and_without_feedback_the_error_rate():
    no_scores = build_report("legal", EXPERIMENT, {"v1": 1, "v2": 1}, seeded_rows(400, 0.5, 0.5, scores=False), [], [])
    assert no_scores["comparisons"][0]["primary_metric"] == "label"
    bare = [FactRow(r.at, r.variant, r.status, r.latency_s, r.ttft_s, None, None, None, None)
            for r in seeded_rows(400, 0.5, 0.5)]
    report = build_report("legal", EXPERIMENT, {"v1": 1, "v2": 1}, bare, [], [])
    assert report["comparisons"][0]["primary_metric"] == "error_rate"
    assert report["variants"][0]["score"] is None


def test_a_rolled_back_candidate_is_said_so():
    event = ExperimentEvent("legal", 5.0, "rollback", "v2", "error rate 0.300 against the control's 0.010")
    report = build_report("legal", EXPERIMENT, {"v1": 100, "v2": 0}, seeded_rows(300, 0.5, 0.5), [], [event])
    assert "rolled back by the canary guard: error rate 0.300" in report["comparisons"][0]["decision"]
    assert report["decision"].startswith("decided: keep v1")
    assert report["events"][0]["kind"] == "rollback"


def test_the_cli_renders_the_report_as_tables(capsys):
    report = build_report("legal", EXPERIMENT, {"v1": 50, "v2": 50}, seeded_rows(2000, 0.5, 0.65), [], [])
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        return httpx.Response(200, json=report)

    root = argparse.ArgumentParser()
    add_commands(root.add_subparsers(dest="command"))
    args = root.parse_args(["experiments", "report", "legal", "--url", "http://gw:1"])
    assert run_command(args, httpx.MockTransport(handler)) == 0
    out = capsys.readouterr().out
    assert seen == [("GET", "/admin/experiments/legal")]
    assert "v1 (control)" in out and "p (always valid)" in out and "decision: decided: promote v2" in out
    assert "v2: decided: v2 is better than v1" in out
