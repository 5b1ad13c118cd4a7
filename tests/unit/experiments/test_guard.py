"""The canary guard's rule, table-tested."""
from __future__ import annotations

import pytest

from gateway.experiments.config import GuardConfig
from gateway.experiments.guard import Sample, judge
from gateway.experiments.store import FactRow

GUARD = GuardConfig(min_requests=100, max_error_rate_delta=0.05, max_ttft_p95_ratio=1.5)


def rows(n: int, errors: int = 0, ttft: float = 0.2) -> list[FactRow]:
    return [FactRow(float(i), "v", 503 if i < errors else 200, ttft * 2, ttft, 5, 5, None, None) for i in range(n)]


@pytest.mark.parametrize("control, candidate, reason", [
    (rows(900, 9), rows(100, 30), "error_rate"),        # 30% against 1%
    (rows(900, 9), rows(99, 30), None),                 # below the minimum sample: not yet
    (rows(50, 0), rows(100, 30), None),                 # the control below it too
    (rows(900, 9), rows(100, 6), None),                 # +5 points exactly: within the margin
    (rows(900, ttft=0.2), rows(100, ttft=0.35), "ttft_p95"),
    (rows(900, ttft=0.2), rows(100, ttft=0.29), None),
])
def test_judge(control, candidate, reason):
    verdict = judge(GUARD, Sample.of(control), Sample.of(candidate))
    assert (verdict.reason if verdict else None) == reason


def test_a_disabled_guard_never_acts():
    assert judge(GuardConfig(enabled=False, min_requests=1), Sample.of(rows(10)), Sample.of(rows(10, 10))) is None


def test_failures_do_not_count_towards_ttft():
    sample = Sample.of(rows(100, 50, ttft=0.1) + [FactRow(0, "v", 504, 30.0, 30.0, None, None, None, None)])
    assert sample.ttft_p95 == pytest.approx(0.1) and sample.n == 101
