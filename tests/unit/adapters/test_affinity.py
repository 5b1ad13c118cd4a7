"""Where adapter versions live when replicas cannot hold them all (adapters/affinity.py)."""
from adapters.affinity import AffinityPlan

LABELS = [f"a{i}" for i in range(8)]


def settle(plan: AffinityPlan, counts: dict, up=(True,) * 4, rounds: int = 10, start: float = 0.0) -> float:
    now = start
    for _ in range(rounds):
        now += 5.0
        plan.update(LABELS, counts, list(up), now)
    return now


def test_every_version_has_a_home_and_no_replica_holds_more_than_its_capacity():
    plan = AffinityPlan(4, 3)
    settle(plan, {})
    assert all(plan.homes[label] for label in LABELS)
    assert all(len(plan.holds(r)) <= 3 for r in range(4))


def test_a_hot_version_gets_more_replicas_and_the_plan_then_stays_put():
    plan, counts = AffinityPlan(4, 3), {label: 0 for label in LABELS}
    now = settle(plan, counts, rounds=1)
    for _ in range(12):
        counts["a0"] += 500  # Zipf-like: a0 takes most of the traffic
        counts["a1"] += 100
        counts["a2"] += 50
        now = settle(plan, counts, rounds=1, start=now)
    assert len(plan.homes["a0"]) == 4  # 12 slots, 8 versions: the 4 spare ones by share of demand
    assert all(plan.homes[label] for label in LABELS)
    assert all(len(plan.holds(r)) <= 3 for r in range(4))
    before = {label: set(homes) for label, homes in plan.homes.items()}
    for _ in range(5):  # the same mix: nothing moves
        counts["a0"] += 500
        counts["a1"] += 100
        counts["a2"] += 50
        now = settle(plan, counts, rounds=1, start=now)
    assert plan.homes == before


def test_moves_per_update_are_bounded():
    plan, counts = AffinityPlan(4, 3, max_moves=1), {label: 0 for label in LABELS}
    now = settle(plan, counts, rounds=2)
    before = {label: set(homes) for label, homes in plan.homes.items()}
    counts["a7"] += 10000
    plan.update(LABELS, counts, [True] * 4, now + 5)
    added = sum(len(plan.homes[label] - before[label]) for label in LABELS)
    assert added <= 1


def test_a_version_on_a_replica_that_went_down_gets_a_live_home():
    plan = AffinityPlan(4, 3)
    settle(plan, {})
    lonely = next(label for label in LABELS if len(plan.homes[label]) == 1)
    down = next(iter(plan.homes[lonely]))
    up = [r != down for r in range(4)]
    plan.update(LABELS, {}, up, 1000.0)
    assert any(up[r] for r in plan.homes[lonely])


def test_a_swap_inherits_the_homes_of_the_version_it_replaces():
    plan = AffinityPlan(4, 3)
    settle(plan, {})
    assert plan.place_new("a0@new", [True] * 4, inherit="a0") == plan.homes["a0"]
