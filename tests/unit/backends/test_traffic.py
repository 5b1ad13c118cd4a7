"""Replica choice, outlier ejection and the retry budget: pure bookkeeping, with fake clocks."""
import pytest

from backends.balancer import Balancer
from backends.config import OutlierConfig
from backends.outliers import OutlierDetector
from backends.retry_budget import RetryBudget


def balancer(count: int, serving=None, limits=None) -> Balancer:
    return Balancer([0] * count, [True] * count, [False] * count, [False] * count,
                    serving or [{"a": 1} for _ in range(count)], limits)


def test_picks_only_replicas_that_serve_the_adapter_and_are_usable():
    b = balancer(4, serving=[{"a": 1}, {}, {"a": 1}, {"a": 1}])
    b.held[2] = True
    b.ejected[3] = True
    assert {b.pick("a") for _ in range(50)} == {0}
    b.up[0] = False
    assert b.pick("a") is None


def test_power_of_two_choices_prefers_the_less_loaded():
    b = balancer(2)
    b.busy[:] = [5, 1]
    assert {b.pick("a") for _ in range(20)} == {1}


def test_load_spreads_over_every_replica_that_has_the_adapter():
    b = balancer(4)
    b._random.seed(7)
    for _ in range(400):
        b.busy[b.pick("a")] += 1
    assert max(b.busy) - min(b.busy) <= 4  # round-robin would be 0; random choice is typically ~20


def test_free_only_answers_none_when_every_slot_is_taken():
    b = balancer(2, limits=[1, 1])
    b.busy[:] = [1, 1]
    assert b.pick("a", free_only=True) is None and b.pick("a") is not None
    assert not b.has_room()
    b.busy[1] = 0
    assert b.pick("a", free_only=True) == 1 and b.has_room()


def test_avoid_skips_replicas_that_failed_the_request():
    b = balancer(3)
    assert {b.pick("a", avoid=[0, 2]) for _ in range(10)} == {1}


def detector(count=4, **options) -> tuple[OutlierDetector, list[float]]:
    now = [100.0]
    config = OutlierConfig(**options)
    return OutlierDetector(tuple(f"r{i}" for i in range(count)), config, clock=lambda: now[0]), now


def test_consecutive_failures_eject_then_a_passing_probe_readmits():
    d, now = detector(consecutive_failures=3, ejection_s=1.0)
    assert not d.failure(0) and not d.failure(0)
    assert d.failure(0) and d.ejected[0]
    assert d.due() == []
    now[0] += 1.0
    assert d.due() == [0]
    d.probed(0, False)
    assert d.ejected[0] and d.due() == []
    now[0] += 1.0
    d.probed(0, True)
    assert not d.ejected[0]


def test_a_success_resets_the_run_of_failures():
    d, _ = detector(consecutive_failures=2, min_requests=100)
    d.failure(1)
    d.success(1)
    assert not d.failure(1)


def test_a_failure_ratio_ejects_without_a_run():
    d, _ = detector(consecutive_failures=100, failure_ratio=0.5, min_requests=10)
    for index in range(12):  # the window opens at the first failure: 10 requests counted from there
        if index % 2:
            d.failure(2)
        else:
            d.success(2)
    assert d.ejected[2]


def test_ejection_is_capped_and_never_takes_the_last_replica():
    d, _ = detector(count=4, consecutive_failures=1, max_ejected_percent=50)
    assert [d.failure(r) for r in range(4)] == [True, True, False, False]
    single, _ = detector(count=1, consecutive_failures=1, max_ejected_percent=100)
    assert not single.failure(0)


def test_backoff_doubles_per_ejection_up_to_the_max():
    d, now = detector(count=2, consecutive_failures=1, ejection_s=1.0, max_ejection_s=3.0)
    waits = []
    for _ in range(4):
        d.failure(0)
        waits.append(d.next_probe_in())
        now[0] += waits[-1]
        d.probed(0, True)
    assert waits == [1.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize("requests", [0, 100])
def test_retry_budget_is_a_share_of_requests_plus_a_floor(requests):
    now = [50.0]
    budget = RetryBudget(ratio=0.2, min_per_s=0.5, window_s=10, clock=lambda: now[0])
    for _ in range(requests):
        budget.request()
    allowed = sum(budget.try_retry() for _ in range(100))
    assert allowed == 5 + requests // 5   # floor 0.5/s x 10 s, plus 20% of the requests
    now[0] += 11  # the window moved on: retries are allowed again
    assert budget.try_retry()


def test_quiet_hours_do_not_fund_a_burst_of_retries():
    now = [0.0]
    budget = RetryBudget(ratio=0.2, min_per_s=0.5, window_s=10, clock=lambda: now[0])
    budget.try_retry()   # a first look
    for _ in range(10000):
        budget.request()
    now[0] = 3600.0      # an hour of quiet traffic, then an outage
    allowed = sum(budget.try_retry() for _ in range(100))
    assert allowed <= 5 + 0.2 * 10000 * 10 / 3600 + 1   # about 11; counting every request would allow 100
