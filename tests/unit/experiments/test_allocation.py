"""Thompson sampling: weights are posterior probabilities of being best, above a floor, summing to 1; through the
app, feedback moves the split and a rolled-back variant stays out."""
from __future__ import annotations

import numpy as np
import pytest

from gateway.experiments.allocation import thompson_weights
from tests.unit.experiments.helpers import ADMIN, TEAM, app, chat


def test_the_better_variant_gets_most_weight_and_every_variant_its_floor():
    weights = thompson_weights({"a": (30, 100), "b": (60, 100), "c": (31, 100)}, 0.05, np.random.default_rng(1))
    assert sum(weights.values()) == pytest.approx(1)
    assert weights["b"] > 0.85 and min(weights.values()) >= 0.05


def test_without_data_the_variants_share_equally():
    weights = thompson_weights({"a": (0, 0), "b": (0, 0)}, 0.1, np.random.default_rng(2))
    assert weights["a"] == pytest.approx(0.5, abs=0.02)


async def test_feedback_moves_the_split(config):
    config["routes"][0]["experiment"] = {"variants": {"v1": 50, "v2": 50},
                                         "allocation": {"mode": "thompson", "floor": 0.05}}
    async with app(config) as client:
        for u in range(120):
            answer = await chat(client, f"user{u}")
            good = answer.headers["x-kimi-variant"] == "v2" or u % 5 == 0
            body = {"request_id": answer.headers["x-request-id"], "label": good}
            assert (await client.post("/v1/feedback", json=body, headers=TEAM)).status_code == 201
        state = client._transport.app.state
        assert await state.experiments.reallocate("legal")
        state.rebuild_routes()
        picks = [(await chat(client, f"new{u}")).headers["x-kimi-variant"] for u in range(100)]
        assert picks.count("v2") > 80
        metrics = (await client.get("/metrics")).text
        assert 'kimi_gateway_experiment_weight{experiment="legal",variant="v2"} 0.9' in metrics
        await client.put("/admin/routes/legal", headers=ADMIN, json={"name": "legal", "experiment": {
            "variants": {"v1": 50, "v2": 0}, "allocation": {"mode": "thompson"}}})
        assert not await state.experiments.reallocate("legal")     # one live variant: nothing to allocate
        assert {(await chat(client, f"new{u}")).headers["x-kimi-variant"] for u in range(30)} == {"v1"}
