"""The experiment report: per variant requests, error rate, TTFT and latency percentiles, tokens and feedback;
for each candidate against the control, differences with intervals, fixed-horizon p-values and the
always-valid sequential test; and, in words, whether there is a decision yet.

Pure: it takes the store's rows and returns a JSON-ready dict (`GET /admin/experiments/{name}` and the CLI).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Mapping, Sequence

import numpy as np

from gateway.experiments import stats
from gateway.experiments.config import ExperimentConfig
from gateway.experiments.store import ExperimentEvent, FactRow, ShadowCall

# mSPRT mixing scale: the size of difference the test is tuned to find quickest (any size is found in time).
TAU = {"score": 0.1, "label": 0.1, "error_rate": 0.05}
HIGHER_IS_BETTER = {"score": True, "label": True, "error_rate": False}
ALPHA = 0.05


def is_error(status: np.ndarray) -> np.ndarray:
    """Backend trouble, the variant's fault: 5xx. A client's 4xx says nothing about the variant."""
    return status >= 500


class Arm:
    """One variant's rows as arrays."""

    def __init__(self, rows: Sequence[FactRow]) -> None:
        self.n = len(rows)
        self.at = np.array([r.at for r in rows], dtype=float)
        self.status = np.array([r.status for r in rows], dtype=int)
        self.latency = np.array([r.latency_s for r in rows], dtype=float)
        self.ttft = np.array([r.ttft_s for r in rows if r.ttft_s is not None], dtype=float)
        self.prompt = np.array([r.prompt_tokens for r in rows if r.prompt_tokens is not None], dtype=float)
        self.completion = np.array([r.completion_tokens for r in rows if r.completion_tokens is not None], dtype=float)
        self.metric = {
            "error_rate": (is_error(self.status).astype(float), self.at),
            "score": _pairs([(r.score, r.at) for r in rows if r.score is not None]),
            "label": _pairs([(r.label, r.at) for r in rows if r.label is not None]),
        }

    def summary(self, name: str, weight: float) -> dict:
        errors = int(is_error(self.status).sum())
        return {
            "name": name, "weight": weight, "requests": self.n, "errors": errors,
            "error_rate": errors / self.n if self.n else None,
            "ttft_p50_s": stats.percentile(self.ttft, 50), "ttft_p95_s": stats.percentile(self.ttft, 95),
            "latency_p50_s": stats.percentile(self.latency, 50), "latency_p95_s": stats.percentile(self.latency, 95),
            "prompt_tokens_mean": _mean(self.prompt), "completion_tokens_mean": _mean(self.completion),
            "score": _interval(self.metric["score"][0]), "label": _interval(self.metric["label"][0]),
        }


def _pairs(pairs: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    if not pairs:
        return np.zeros(0), np.zeros(0)
    values, times = zip(*pairs)
    return np.array(values, dtype=float), np.array(times, dtype=float)


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def _interval(values: np.ndarray) -> dict | None:
    interval = stats.mean_interval(values)
    if interval is None:
        return None
    return {"n": len(values), "mean": interval.estimate, "low": interval.low, "high": interval.high}


def compare(metric: str, control: Arm, candidate: Arm) -> dict | None:
    (a, at), (b, bt) = control.metric[metric], candidate.metric[metric]
    if len(a) < 2 or len(b) < 2:
        return None
    if metric == "score":
        fixed = stats.welch(a, b)
    else:
        fixed = stats.two_proportions(int(a.sum()), len(a), int(b.sum()), len(b))
    sequential = stats.always_valid(a, b, at, bt, TAU[metric], ALPHA)
    better = (fixed.difference > 0) == HIGHER_IS_BETTER[metric]
    return {**asdict(fixed), "n": [len(a), len(b)], "sequential_p_value": sequential.p_value,
            "decided": sequential.decided, "candidate_better": sequential.decided and better and fixed.difference != 0,
            "candidate_worse": sequential.decided and not better and fixed.difference != 0}


def primary_metric(comparisons: Mapping[str, dict | None]) -> str:
    """What decides: scores if there are any, else boolean feedback, else the error rate."""
    for metric in ("score", "label", "error_rate"):
        if comparisons.get(metric) is not None:
            return metric
    return "error_rate"


def words(candidate: str, control: str, metric: str, result: dict | None, rolled_back: ExperimentEvent | None) -> str:
    if rolled_back is not None:
        return f"{candidate} was rolled back by the canary guard: {rolled_back.detail}"
    if result is None:
        return f"no decision yet: too little data on {candidate} and {control}"
    what = f"{metric.replace('_', ' ')} {result['difference']:+.4f} (95% CI {result['low']:+.4f} to {result['high']:+.4f})"
    if result["candidate_better"]:
        return f"decided: {candidate} is better than {control}: {what}, always-valid p={result['sequential_p_value']:.4f}"
    if result["candidate_worse"]:
        return f"decided: {candidate} is worse than {control}: {what}, always-valid p={result['sequential_p_value']:.4f}"
    return (f"no decision yet on {metric.replace('_', ' ')}: {what}, always-valid p={result['sequential_p_value']:.4f} "
            f"(decides at {ALPHA}); keep collecting")


def build_report(name: str, experiment: ExperimentConfig, weights: Mapping[str, float], rows: Sequence[FactRow],
                 shadows: Sequence[ShadowCall], events: Sequence[ExperimentEvent]) -> dict:
    """`weights`: those in force now (after run-time changes and the guard)."""
    control = experiment.control
    names = list(dict.fromkeys([*experiment.variants, *(r.variant for r in rows)]))
    arms = {variant: Arm([r for r in rows if r.variant == variant]) for variant in names}
    rollbacks = {e.variant: e for e in events if e.kind == "rollback"}
    comparisons, winners, losers = [], [], []
    for candidate in names:
        if candidate == control:
            continue
        metrics = {metric: compare(metric, arms[control], arms[candidate]) for metric in TAU}
        metric = primary_metric(metrics)
        rolled_back = rollbacks.get(candidate) if not weights.get(candidate) else None
        result = metrics[metric]
        if rolled_back is None and result is not None and result["candidate_better"]:
            winners.append((candidate, result["difference"] * (1 if HIGHER_IS_BETTER[metric] else -1)))
        elif rolled_back is not None or (result is not None and result["candidate_worse"]):
            losers.append(candidate)
        comparisons.append({"candidate": candidate, "control": control, "primary_metric": metric, **metrics,
                            "decision": words(candidate, control, metric, result, rolled_back)})
    winner = max(winners, key=lambda w: w[1])[0] if winners else None
    candidates = [n for n in names if n != control]
    if winner is not None:
        decision = f"decided: promote {winner}"
    elif candidates and len(losers) == len(candidates):
        decision = f"decided: keep {control}; no candidate beats it"
    else:
        decision = "no decision yet"
    return {
        "experiment": name, "control": control, "sticky_by": experiment.sticky_by,
        "allocation": experiment.allocation.mode, "guard": experiment.guard.model_dump(),
        "variants": [arms[n].summary(n, weights.get(n, 0)) for n in names],
        "comparisons": comparisons, "shadow": shadow_summary(shadows),
        "events": [asdict(e) for e in events], "winner": winner, "decision": decision,
    }


def shadow_summary(calls: Sequence[ShadowCall]) -> list[dict]:
    out = []
    for variant in dict.fromkeys(c.variant for c in calls):
        mine = [c for c in calls if c.variant == variant]
        ok = [c for c in mine if c.error is None]
        latency = np.array([c.latency_s for c in ok], dtype=float)
        out.append({"variant": variant, "calls": len(mine), "errors": len(mine) - len(ok),
                    "latency_p50_s": stats.percentile(latency, 50), "latency_p95_s": stats.percentile(latency, 95),
                    "completion_tokens_mean": _mean(np.array([c.completion_tokens for c in ok
                                                              if c.completion_tokens is not None], dtype=float)),
                    "output_chars_mean": _mean(np.array([c.output_chars for c in ok if c.output_chars is not None],
                                                        dtype=float)),
                    "distinct_outputs": len({c.output_sha256 for c in ok})})
    return out
