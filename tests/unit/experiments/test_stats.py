"""The report's statistics against scipy (or a textbook computation written out here) on seeded data, and the
sequential test's promise: an A/A experiment read every day rejects no more often than alpha."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from gateway.experiments import stats as ours

RNG_SEED = 20261201


@pytest.fixture
def rng():
    return np.random.default_rng(RNG_SEED)


def test_mean_interval_is_scipys_t_interval(rng):
    values = rng.uniform(0, 1, 57)
    interval = ours.mean_interval(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert interval.estimate == pytest.approx(values.mean())
    assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-12)


@pytest.mark.parametrize("n1, n2, shift", [(40, 55, 0.0), (300, 120, 0.08), (1000, 1000, -0.02)])
def test_welch_matches_scipy_p_value_and_interval(rng, n1, n2, shift):
    control = rng.beta(2, 3, n1)
    candidate = np.clip(rng.beta(2, 3, n2) + shift, 0, 1)
    result = ours.welch(control, candidate)
    reference = stats.ttest_ind(candidate, control, equal_var=False)
    interval = reference.confidence_interval(0.95)
    assert result.difference == pytest.approx(candidate.mean() - control.mean())
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert (result.low, result.high) == pytest.approx((interval.low, interval.high), rel=1e-9)


@pytest.mark.parametrize("s1, n1, s2, n2", [(30, 1000, 45, 1000), (5, 200, 19, 180), (400, 800, 380, 790)])
def test_two_proportions_matches_the_chi_square_test_and_the_wald_interval(s1, n1, s2, n2):
    result = ours.two_proportions(s1, n1, s2, n2)
    table = [[s1, n1 - s1], [s2, n2 - s2]]
    _, p_value, _, _ = stats.chi2_contingency(table, correction=False)
    assert result.p_value == pytest.approx(p_value, rel=1e-9)
    p1, p2 = s1 / n1, s2 / n2
    half = 1.959963984540054 * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)   # textbook Wald
    assert (result.difference, result.low, result.high) == pytest.approx((p2 - p1, p2 - p1 - half, p2 - p1 + half))


@pytest.mark.parametrize("d, v, tau2", [(0.0, 0.001, 0.01), (0.05, 0.0004, 0.01), (-0.2, 0.01, 0.0025)])
def test_msprt_lambda_is_the_mixture_likelihood_ratio(d, v, tau2):
    """Lambda = integral of N(d; theta, V) N(theta; 0, tau2) dtheta / N(d; 0, V), integrated numerically."""
    mixture, _ = integrate.quad(lambda t: stats.norm.pdf(d, t, math.sqrt(v)) * stats.norm.pdf(t, 0, math.sqrt(tau2)),
                                -1, 1, points=[0, d], limit=200)
    expected = mixture / stats.norm.pdf(d, 0, math.sqrt(v))
    # V = var1/n1 + var2/n2: one arm carries it all here
    assert float(ours.msprt_lambda(1, 0.0, 0.0, 1, d, v, tau2)) == pytest.approx(expected, rel=1e-6)


def test_always_valid_p_value_is_the_running_minimum_over_every_look(rng):
    """Written out with a loop over prefixes (the textbook definition), against the vectorised product."""
    a, b = rng.binomial(1, 0.3, 400).astype(float), rng.binomial(1, 0.4, 400).astype(float)
    at, bt = np.arange(400) * 2.0, np.arange(400) * 2.0 + 1
    result = ours.always_valid(a, b, at, bt, tau=0.1, min_n=50)
    smallest = 1.0
    for k in range(1, 401):
        na, nb = k, k                        # interleaved: after b's k-th observation both arms have k
        for n1, n2 in ((k, k - 1), (na, nb)):
            if n1 < 50 or n2 < 50:
                continue
            x, y = a[:n1], b[:n2]
            lam = ours.msprt_lambda(n1, x.mean(), x.var(ddof=1), n2, y.mean(), y.var(ddof=1), 0.01)
            smallest = min(smallest, 1 / float(lam))
    assert result.p_value == pytest.approx(smallest, rel=1e-9)
    assert result.decided == (smallest <= 0.05)


def daily_counts(rng, runs, days, per_day, p1, p2):
    """Cumulative successes after each day, for `runs` simulated experiments at once: (runs, days)."""
    s1 = np.cumsum(rng.binomial(per_day, p1, (runs, days)), axis=1)
    s2 = np.cumsum(rng.binomial(per_day, p2, (runs, days)), axis=1)
    n = per_day * np.arange(1, days + 1)
    return s1, s2, n


def peeking_rejections(s1, s2, n, tau):
    """(mSPRT rejected on some day, fixed z test p < 0.05 on some day), per run."""
    m1, m2 = s1 / n, s2 / n
    lam = ours.msprt_lambda(n, m1, m1 * (1 - m1), n, m2, m2 * (1 - m2), tau * tau)
    sequential = (np.minimum.accumulate(1 / lam, axis=1) <= 0.05).any(axis=1)
    pooled = (s1 + s2) / (2 * n)
    z = (m2 - m1) / np.sqrt(np.maximum(pooled * (1 - pooled) * 2 / n, 1e-12))
    naive = (2 * stats.norm.sf(np.abs(z)) <= 0.05).any(axis=1)
    return sequential, naive


def test_a_a_experiment_read_every_day_stays_at_the_nominal_false_positive_rate(rng):
    """4,000 A/A experiments, 30 daily looks of 200 requests per arm: reading the fixed-horizon z test every
    day and stopping at p < 0.05 "finds" an effect far more than 5% of the time (which shows that the
    simulation can see inflation); the always-valid test stays at or below 5%."""
    runs = 4000
    s1, s2, n = daily_counts(rng, runs, days=30, per_day=200, p1=0.3, p2=0.3)
    sequential, naive = peeking_rejections(s1, s2, n, tau=0.1)
    bound = 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs)    # nominal, plus three standard errors of the estimate
    assert sequential.mean() <= bound, sequential.mean()
    assert naive.mean() > 0.15, naive.mean()


def test_the_sequential_test_finds_a_real_difference(rng):
    s1, s2, n = daily_counts(rng, 500, days=30, per_day=200, p1=0.3, p2=0.36)
    sequential, _ = peeking_rejections(s1, s2, n, tau=0.1)
    assert sequential.mean() > 0.8
