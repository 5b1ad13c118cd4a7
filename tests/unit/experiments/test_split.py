"""Sticky bucketed splits: the split over many users matches the weights, a user never moves unless the weights
make them, and a weight change moves only the users it must."""
from __future__ import annotations

import pytest

from gateway.experiments.split import BUCKETS, Split, bucket_of

USERS = [f"user-{i}" for i in range(10_000)]


@pytest.mark.parametrize("weights", [{"a": 90, "b": 10}, {"a": 50, "b": 50}, {"a": 1, "b": 1, "c": 2},
                                     {"a": 80, "b": 15, "c": 5}])
def test_the_split_over_10000_users_is_within_2_points_of_the_weights(weights):
    split = Split("legal", weights)
    picks = [split.pick(user) for user in USERS]
    total = sum(weights.values())
    for name, weight in weights.items():
        assert abs(picks.count(name) / len(USERS) - weight / total) <= 0.02, name


def test_the_same_user_always_lands_on_the_same_variant():
    first = {user: Split("legal", {"a": 70, "b": 30}).pick(user) for user in USERS[:2000]}
    again = Split("legal", {"a": 70, "b": 30})
    assert all(again.pick(user) == variant for user, variant in first.items())
    assert len(set(first.values())) == 2


def test_90_10_to_80_20_moves_10_percent_of_users_and_only_towards_the_candidate():
    before, after = Split("legal", {"v1": 90, "v2": 10}), Split("legal", {"v1": 80, "v2": 20})
    moved = [(before.pick(u), after.pick(u)) for u in USERS if before.pick(u) != after.pick(u)]
    assert abs(len(moved) / len(USERS) - 0.10) <= 0.02
    assert set(moved) == {("v1", "v2")}     # nobody already on v2 went back


def test_experiments_split_independently():
    one, two = Split("legal", {"a": 50, "b": 50}), Split("medical", {"a": 50, "b": 50})
    same = sum(one.pick(u) == two.pick(u) for u in USERS)
    assert 0.45 < same / len(USERS) < 0.55     # independent halves agree half the time, not always


def test_a_zero_weight_variant_gets_nobody_and_shares_add_up():
    split = Split("legal", {"a": 0, "b": 3, "c": 1})
    assert {split.pick(u) for u in USERS[:3000]} == {"b", "c"}
    assert split.share("a") == 0 and split.share("b") == 0.75 and split.share("c") == 0.25


def test_without_a_key_the_pick_is_random_by_weight():
    split = Split("legal", {"a": 75, "b": 25})
    picks = [split.pick(None) for _ in range(10_000)]
    assert abs(picks.count("b") / len(picks) - 0.25) <= 0.02


def test_buckets_are_in_range_and_weights_must_sum_above_zero():
    assert all(0 <= bucket_of("x", u) < BUCKETS for u in USERS[:1000])
    with pytest.raises(ValueError):
        Split("x", {"a": 0})
