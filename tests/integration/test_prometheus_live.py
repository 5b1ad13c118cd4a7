"""The dashboard and the alert rules, proven in a real Prometheus: it scrapes (every second) a real gateway that
serves about 40 s of mixed real traffic to a real llama-server (whose own `--metrics` it scrapes too), then every
PromQL expression of grafana/kimi-gateway.json and grafana/alerts/kimi-gateway.rules.yml is evaluated through the
HTTP API and must be valid and return data. promtool checks the rules and runs their unit tests (one per alert).

The same traffic, counted by the client from the answers it got, must equal the gateway's requests_total exactly,
per route, adapter, version, backend and status: failed requests and cut streams included.

Prometheus and promtool come from Debian (`apt-get install prometheus`); without them this test fails and says so.
"""
from __future__ import annotations

import collections
import json
import math
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from backends.launchers.llamacpp import LlamaServerLaunch, free_port
from gateway.demo.tiny_gguf import write_demo_set

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "grafana" / "kimi-gateway.json"
RULES = ROOT / "grafana" / "alerts" / "kimi-gateway.rules.yml"
RULE_TESTS = ROOT / "grafana" / "alerts" / "kimi-gateway.rules.test.yml"
TRAFFIC_S = 40
# Grafana's variables, as they would be for this scrape interval and a short time range.
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$__range": "1m", "$__interval": "2s"}
INSTALL = ("Prometheus and promtool are needed for this test: install Debian's package "
           "(`apt-get install prometheus`, which .ci/run does), or put both on PATH.")
PROMPT = [{"role": "user", "content": "Say hello."}]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found. {INSTALL}")
    return path


def test_promtool_checks_and_unit_tests_the_rules():
    promtool = tool("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                            capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
              if "alert" in rule}
    tested_alerts = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
                     for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert alerts == tested_alerts, f"alerts without a firing unit test: {alerts - tested_alerts}"


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, Grafana's variables substituted."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", ()):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            found.append((panel["title"], expr))
    return found


def rule_expressions() -> list[tuple[str, str]]:
    """(rule name, expr) for every rule; an alert's comparisons with `bool`, so that it returns its signal
    (0 or 1 for every series) whether or not it fires."""
    found = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"].strip()
            if "alert" in rule:
                expr = re.sub(r"\s(==|!=|>=|<=|>|<)\s", r" \1 bool ", expr)
            found.append((rule.get("alert") or rule["record"], expr))
    return found


# --- the real processes -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(llama_binary, tmp_path_factory, start_process) -> str:
    """A llama-server with its own /metrics, the Kimi chat template (structured output goes as a grammar, an
    adjustment the gateway counts) and two LoRAs."""
    models = write_demo_set(tmp_path_factory.mktemp("prom-models"), chat_template="kimi")
    launch = LlamaServerLaunch(llama_binary, models.model, (models.lora_a, models.lora_b), port=free_port(),
                               alias="tiny-kimi", threads=1, extra=("-np", "2", "--metrics"))
    start_process("llama-server-metrics", launch.argv(), f"{launch.url}/health")
    return launch.url, models


@pytest.fixture(scope="module")
def gateway(engine, start_gateway) -> str:
    url, models = engine
    config = {
        "adapter_roots": [str(models.model.parent)],
        "backends": [{"name": "llama", "kind": "llamacpp", "url": url},
                     {"name": "dead", "kind": "llamacpp", "url": f"http://127.0.0.1:{free_port()}"}],
        "adapters": [{"name": "tiny-a", "gguf": str(models.lora_a), "backends": ["llama"]},
                     {"name": "tiny-b", "gguf": str(models.lora_b), "profile": "instant", "backends": ["llama"]}],
        "routes": [{"name": "kimi-k2.5", "targets": ["dead", "llama"]},
                   {"name": "only-dead", "targets": ["dead"]},
                   {"name": "tiny-ab", "experiment": {"sticky_by": "user", "variants": {"tiny-a": 50, "tiny-b": 50}}}],
    }
    return start_gateway(config, name="gateway-prometheus")


@pytest.fixture(scope="module")
def prometheus(gateway, engine, start_process, tmp_path_factory) -> str:
    binary = tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    rules = work / "rules.yml"   # the same rules, evaluated every second instead of every 30 s
    rules.write_text(RULES.read_text().replace("interval: 30s", "interval: 1s"))
    port = free_port()
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(rules)],
              "scrape_configs": [
                  {"job_name": "kimi-gateway", "static_configs": [{"targets": [hostport(gateway)]}]},
                  {"job_name": "llama-server", "static_configs": [{"targets": [hostport(engine[0])]}]}]}
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    argv = [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    start_process("prometheus", argv, f"http://127.0.0.1:{port}/-/ready", timeout_s=60)
    return f"http://127.0.0.1:{port}"


def hostport(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


# --- the traffic --------------------------------------------------------------------------------------------


class Traffic:
    """Real requests of every kind the dashboard shows, each counted as the client saw its answer."""

    def __init__(self, gateway: str) -> None:
        self.url = gateway
        self.counted: collections.Counter = collections.Counter()
        self.cut: collections.Counter = collections.Counter()   # streams the client hung up on
        self.lock = threading.Lock()

    def count(self, route: str, response: httpx.Response, status: int | None = None, backend: str = "") -> None:
        """An error answer carries no x-kimi-backend: `backend` says which one the request was routed to."""
        version = response.headers.get("x-kimi-adapter", "")
        key = (route, version.split("@")[0], version, response.headers.get("x-kimi-backend", backend),
               str(status or response.status_code))
        with self.lock:
            self.counted[key] += 1

    def request(self, client: httpx.Client, route: str, body: dict, *, counted_route: str | None = None,
                backend: str = "") -> None:
        response = client.post(f"{self.url}/chat/completions", json={"model": route, "messages": PROMPT, **body})
        self.count(route if counted_route is None else counted_route, response, backend=backend)

    def stream(self, client: httpx.Client, route: str, body: dict, *, cut: bool = False) -> None:
        payload = {"model": route, "messages": PROMPT, "stream": True, **body}
        with client.stream("POST", f"{self.url}/chat/completions", json=payload) as response:
            if cut:
                next(response.iter_raw())
                with self.lock:   # 499 if the gateway was still streaming when the client hung up, else 200
                    self.cut[(route, "", "", response.headers["x-kimi-backend"])] += 1
                return
            text = response.read().decode()
        assert text.endswith("data: [DONE]\n\n")
        self.count(route, response, 200 if '"error"' not in text else None)

    def mix(self, client: httpx.Client, turn: int) -> None:
        self.request(client, "kimi-k2.5", {"max_tokens": 4})
        self.stream(client, "tiny-a", {"max_tokens": 6})
        self.stream(client, "tiny-ab", {"max_tokens": 4, "user": f"user-{turn % 5}"})
        self.request(client, "tiny-b", {"max_tokens": 3})
        self.request(client, "only-dead", {"max_tokens": 2}, backend="dead")        # 503: its only backend is down
        self.request(client, f"no-such-model-{turn}", {}, counted_route="")          # 404 before routing
        self.request(client, "kimi-k2.5", {"max_tokens": 2, "temperature": "hot"}, counted_route="")  # 400 unrouted
        if turn % 3 == 0:
            schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}}
            self.request(client, "kimi-k2.5", {"max_tokens": 8, "response_format": schema})  # adjusted: thinking off
            self.stream(client, "kimi-k2.5", {"max_tokens": 1900, "temperature": 0}, cut=True)
            history = [{"role": "user", "content": "weather?"},
                       {"role": "assistant", "content": "", "tool_calls": [
                           {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
                       {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
            tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
            response = client.post(f"{self.url}/chat/completions", json={
                "model": "kimi-k2.5", "messages": history, "tools": tools, "max_tokens": 2, "user": f"agent-{turn}"})
            self.count("kimi-k2.5", response)                                        # a reasoning-memory miss

    def run(self, seconds: float, clients: int = 2) -> None:
        deadline = time.monotonic() + seconds

        def loop(offset: int) -> None:
            with httpx.Client(timeout=60) as client:
                turn = offset
                while time.monotonic() < deadline:
                    self.mix(client, turn)
                    turn += clients
        threads = [threading.Thread(target=loop, args=(index,)) for index in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def gateway_requests(gateway: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{gateway.removesuffix('/v1')}/metrics", timeout=10).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kimi_gateway_requests_total" and sample.value:
                labels = sample.labels
                found[(labels["route"], labels["adapter"], labels["version"], labels["backend"], labels["code"])] = \
                    sample.value
    return found


def in_flight(gateway: str) -> float:
    text = httpx.get(f"{gateway.removesuffix('/v1')}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kimi_gateway_in_flight_requests{"))


def query(prometheus: str, expr: str, at: float) -> list[dict]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr, "time": at}, timeout=30).json()
    assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
    return answer["data"]["result"]


def test_dashboard_and_alert_queries_return_data_from_real_traffic(gateway, prometheus):
    traffic = Traffic(gateway)
    traffic.run(TRAFFIC_S)
    deadline = time.monotonic() + 10
    while in_flight(gateway) and time.monotonic() < deadline:   # cut streams end on the gateway's side too
        time.sleep(0.1)
    at = time.time() + 2   # every query as of just after the traffic, whatever time the queries take
    time.sleep(3)   # a few more scrapes and rule evaluations after the last request

    # What the client saw, exactly what the gateway counted; a stream the client cut counts as 499 when the
    # gateway was still relaying it, as 200 when its last byte was already out.
    counted = gateway_requests(gateway)
    expected = dict(traffic.counted)
    for key, cuts in traffic.cut.items():
        aborted = counted.get((*key, "499"), 0)
        assert 1 <= aborted <= cuts, (key, aborted, cuts)
        expected[(*key, "499")] = aborted
        expected[(*key, "200")] = expected.get((*key, "200"), 0) + cuts - aborted
    assert counted == expected
    assert {key[4] for key in expected} >= {"200", "400", "404", "499", "503"}

    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert {t["labels"]["job"]: t["health"] for t in targets} == {"kimi-gateway": "up", "llama-server": "up"}
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert all(rule["health"] == "ok" for group in groups for rule in group["rules"]), groups

    empty = []
    for name, expr in dashboard_expressions() + rule_expressions():
        result = query(prometheus, expr, at)
        values = [float(series["value"][1]) for series in result]
        if not any(math.isfinite(value) for value in values):
            empty.append(f"{name}: {expr} -> {result}")
    assert not empty, "queries that show nothing:\n" + "\n".join(empty)
