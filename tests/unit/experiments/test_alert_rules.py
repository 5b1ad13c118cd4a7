"""The experiment alert rules parse and name only metrics the gateway declares."""
from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from gateway.metrics import Metrics

RULES = Path(__file__).parents[3] / "grafana" / "alerts-experiments.yaml"


def test_every_rule_names_a_declared_metric():
    metrics = Metrics()
    metrics.guard_events.labels("legal", "v2", "error_rate").inc()
    exposed = generate_latest(metrics.registry).decode()
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} >= {"KimiGatewayCanaryRolledBack"}
    for rule in rules:
        for name in re.findall(r"kimi_gateway_\w+", rule["expr"]):
            assert f"\n{name}" in exposed, name
