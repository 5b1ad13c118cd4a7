"""The report's statistics, as pure functions over numbers: a mean's confidence interval, Welch's t for the
difference of two means, the two-proportion z test, and mSPRT, the always-valid sequential test.

Fixed-horizon p-values (Welch, z) are right only if the report is read once, at a sample size fixed in
advance; reading them every day and stopping at the first p < 0.05 finds "effects" in an A/A test far more
often than 5%. The mSPRT p-value (Johari, Pekelis, Walsh: "Always Valid Inference", 2017) may be read after
every observation: under no difference the chance that it *ever* drops below alpha is at most alpha.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
MIN_SEQUENTIAL_N = 100   # per arm, before the sequential test is evaluated (the plug-in variance settles)


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """candidate - control: the difference, its 95% interval and the fixed-horizon two-sided p-value."""
    difference: float
    low: float
    high: float
    p_value: float
    test: str


def mean_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> Interval | None:
    """The t interval of a mean (for booleans as 0/1 too, where n is large enough for it to matter little)."""
    n = len(values)
    if n == 0:
        return None
    mean = float(np.mean(values))
    if n < 2:
        return Interval(mean, math.nan, math.nan)
    sem = float(np.std(values, ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sem
    return Interval(mean, mean - half, mean + half)


def welch(control: np.ndarray, candidate: np.ndarray, confidence: float = CONFIDENCE) -> Comparison | None:
    """Welch's t test (unequal variances) and the Welch-Satterthwaite interval of mean(candidate) - mean(control)."""
    n1, n2 = len(control), len(candidate)
    if n1 < 2 or n2 < 2:
        return None
    v1, v2 = float(np.var(control, ddof=1)) / n1, float(np.var(candidate, ddof=1)) / n2
    difference = float(np.mean(candidate) - np.mean(control))
    se = math.sqrt(v1 + v2)
    if se == 0:
        return Comparison(difference, difference, difference, 1.0 if difference == 0 else 0.0, "welch")
    df = (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1))
    t = difference / se
    p_value = float(2 * stats.t.sf(abs(t), df))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return Comparison(difference, difference - half, difference + half, p_value, "welch")


def two_proportions(successes1: int, n1: int, successes2: int, n2: int,
                    confidence: float = CONFIDENCE) -> Comparison | None:
    """The two-proportion z test (pooled standard error, as the chi-square test without continuity correction)
    and the Wald interval of p2 - p1 (unpooled)."""
    if n1 == 0 or n2 == 0:
        return None
    p1, p2 = successes1 / n1, successes2 / n2
    pooled = (successes1 + successes2) / (n1 + n2)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    difference = p2 - p1
    p_value = 1.0 if se_pooled == 0 else float(2 * stats.norm.sf(abs(difference) / se_pooled))
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    half = float(stats.norm.ppf(0.5 + confidence / 2)) * se
    return Comparison(difference, difference - half, difference + half, p_value, "two-proportion z")


def msprt_lambda(n1, mean1, var1, n2, mean2, var2, tau2):
    """The mixture likelihood ratio of H1: difference ~ N(0, tau2) against H0: no difference, for the
    difference of two means with (plug-in) variances; numpy arrays broadcast (a whole simulation at once).

    With V = var1/n1 + var2/n2 the variance of the observed difference d:
        Lambda = sqrt(V / (V + tau2)) * exp(tau2 * d^2 / (2 V (V + tau2)))
    """
    n1, n2 = np.asarray(n1, dtype=float), np.asarray(n2, dtype=float)
    v = np.asarray(var1) / np.maximum(n1, 1) + np.asarray(var2) / np.maximum(n2, 1)
    v = np.maximum(v, 1e-12)    # both arms constant: no information yet, never a division by zero
    d = np.asarray(mean2) - np.asarray(mean1)
    exponent = np.minimum(tau2 * d * d / (2 * v * (v + tau2)), 700.0)
    return np.sqrt(v / (v + tau2)) * np.exp(exponent)


@dataclass(frozen=True)
class Sequential:
    """The always-valid p-value after every observation so far (time order), and whether it crossed alpha."""
    p_value: float
    decided: bool
    looks: int          # observations at which it was evaluated


def always_valid(control: np.ndarray, candidate: np.ndarray, control_t: np.ndarray, candidate_t: np.ndarray,
                 tau: float, alpha: float = 1 - CONFIDENCE, min_n: int = MIN_SEQUENTIAL_N) -> Sequential:
    """mSPRT over the two arms' observations merged in time order: Lambda after each observation (once both
    arms have `min_n`), the always-valid p-value is min(1, min over those of 1/Lambda)."""
    values = np.concatenate([control, candidate]).astype(float)
    arm = np.concatenate([np.zeros(len(control), bool), np.ones(len(candidate), bool)])
    order = np.argsort(np.concatenate([control_t, candidate_t]), kind="stable")
    values, arm = values[order], arm[order]
    stats1 = running_moments(np.where(~arm, values, 0.0), ~arm)
    stats2 = running_moments(np.where(arm, values, 0.0), arm)
    ready = (stats1[0] >= min_n) & (stats2[0] >= min_n)
    if not ready.any():
        return Sequential(1.0, False, 0)
    lam = msprt_lambda(*(s[ready] for s in stats1), *(s[ready] for s in stats2), tau * tau)
    p_value = float(min(1.0, 1.0 / float(np.max(lam))))
    return Sequential(p_value, p_value <= alpha, int(ready.sum()))


def running_moments(values: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """After each position: the count, mean and sample variance of the values where `present`."""
    n = np.cumsum(present).astype(float)
    total = np.cumsum(values)
    squares = np.cumsum(values * values)
    safe = np.maximum(n, 1)
    mean = total / safe
    var = np.maximum(squares - safe * mean * mean, 0.0) / np.maximum(n - 1, 1)
    return n, mean, var


def percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None
