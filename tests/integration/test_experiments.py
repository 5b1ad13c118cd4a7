"""Experiments end to end, on real processes: a canary served by a backend that fails 30% of requests is rolled
back by the guard within its sample (event in the report, the metric, the log), the rollback, request facts and
feedback survive a kill -9 and restart (SGLang emulators); and shadow traffic to a slow (10 s) or failing
candidate leaves the clients' latency and errors on the real llama-server as they are without a shadow."""
from __future__ import annotations

import os
import random
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.adapter_files import write_peft
from tests.integration.test_sglang import start_sglang

ADMIN_KEY = "admin-key-for-experiment-tests"
TEAM_KEY = "team-key-for-experiment-tests"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
TEAM = {"authorization": f"Bearer {TEAM_KEY}"}
ENV = {"KIMI_GATEWAY_ADMIN_KEYS": ADMIN_KEY, "TEAM_KEY": TEAM_KEY}
PROMPT = [{"role": "user", "content": "Tell me about the blue river"}]
MIN_REQUESTS = 100


def chat(client: httpx.Client, base: str, model: str, user: str) -> httpx.Response:
    body = {"model": model, "messages": PROMPT, "max_tokens": 4, "user": user}
    return client.post(f"{base}/chat/completions", json=body, headers=TEAM)


def metric(base: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{base.removesuffix('/v1')}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def admin(base: str, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{base.removesuffix('/v1')}{path}", headers=ADMIN, timeout=60, **kwargs)


def gateway_process(processes, name: str):
    return next(p for p in reversed(processes) if p.argv[-1].endswith(f"{name}.yaml"))


# --- canary rollback and durability (SGLang emulators) ------------------------------------------------------


@pytest.fixture(scope="module")
def canary_setup(start_process, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-experiments")
    v1, v2 = write_peft(root / "legal-v1", r=8), write_peft(root / "legal-v2", r=16)
    control = start_sglang(start_process, "sglang-control")
    candidate = start_sglang(start_process, "sglang-candidate")
    config = {
        "adapter_roots": [str(root)],
        "auth": {"client_keys": [{"name": "team", "key_env": "TEAM_KEY"}]},
        "backends": [{"name": "kt-a", "kind": "sglang", "url": control},
                     {"name": "kt-b", "kind": "sglang", "url": candidate, "retry": {"attempts": 1}}],
        "adapters": [{"name": "legal-v1", "source": str(v1), "backends": ["kt-a"]},
                     {"name": "legal-v2", "source": str(v2), "backends": ["kt-b"]}],
        "routes": [{"name": "legal", "experiment": {
            "sticky_by": "user", "variants": {"legal-v1": 50, "legal-v2": 50},
            "guard": {"min_requests": MIN_REQUESTS, "max_error_rate_delta": 0.05, "max_ttft_p95_ratio": 1.5}}}],
        "experiments": {"flush_interval_s": 0.1, "guard_interval_s": 0.1},
    }
    return config, candidate


def fail_30_percent(emulator: str, count: int) -> int:
    """Queue one fault per coming chat request on the candidate: 30% answer 500, the rest pass (a zero delay)."""
    rng = random.Random(18)
    failures = 0
    with httpx.Client(timeout=10) as client:
        for _ in range(count):
            fails = rng.random() < 0.3
            failures += fails
            spec = {"status": 500} if fails else {"delay_first_byte_s": 0}
            client.post(f"{emulator}/_emulator/faults", json={**spec, "path": "/v1/chat/completions"}).raise_for_status()
    return failures


def test_a_canary_failing_30_percent_is_rolled_back_within_its_sample_and_that_survives_a_restart(
        canary_setup, start_gateway, processes):
    config, candidate = canary_setup
    fail_30_percent(candidate, 300)
    base = start_gateway(config, name="gw-canary", env=ENV)
    statuses: dict[str, list[int]] = {"legal-v1": [], "legal-v2": []}
    request_ids: list[tuple[str, str]] = []
    lock, rolled_back = threading.Lock(), threading.Event()

    def one(index: int) -> None:
        if rolled_back.is_set():
            return
        with httpx.Client(timeout=30) as client:
            response = chat(client, base, "legal", f"user-{index}")
        with lock:
            statuses[response.headers.get("x-kimi-variant", "?")].append(response.status_code)
            request_ids.append((response.headers["x-request-id"], response.headers.get("x-kimi-variant", "?")))
        if index % 20 == 0:
            variants = admin(base, "GET", "/admin/routes/legal").json()["experiment"]["variants"]
            if variants["legal-v2"] == 0:
                rolled_back.set()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(1000)))
    deadline = time.monotonic() + 10
    while not rolled_back.is_set() and time.monotonic() < deadline:
        if admin(base, "GET", "/admin/routes/legal").json()["experiment"]["variants"]["legal-v2"] == 0:
            rolled_back.set()
        time.sleep(0.2)
    assert rolled_back.is_set(), f"no rollback after {len(statuses['legal-v2'])} candidate requests"

    served = statuses["legal-v2"]
    error_rate = sum(code >= 500 for code in served) / len(served)
    assert 0.2 < error_rate < 0.4, error_rate                      # the fault really was about 30%
    assert all(code == 200 for code in statuses["legal-v1"])
    assert MIN_REQUESTS <= len(served) <= MIN_REQUESTS * 1.5, len(served)   # within the sample, not long after

    # Every user now lands on the control.
    with httpx.Client(timeout=30) as client:
        after = [chat(client, base, "legal", f"late-{i}") for i in range(20)]
    assert {r.headers["x-kimi-variant"] for r in after} == {"legal-v1"} and all(r.status_code == 200 for r in after)

    report = admin(base, "GET", "/admin/experiments/legal").json()
    [event] = [e for e in report["events"] if e["kind"] == "rollback"]
    assert event["variant"] == "legal-v2" and "error rate" in event["detail"]
    assert "rolled back by the canary guard" in report["comparisons"][0]["decision"]
    assert metric(base, "kimi_gateway_experiment_guard_events_total", variant="legal-v2", reason="error_rate") == 1
    log = Path(gateway_process(processes, "gw-canary").log_path).read_text()
    assert "canary guard: legal-v2 of experiment legal rolled back to weight 0" in log

    # Feedback on a served request, then kill -9 and a restart: facts, feedback and the rollback stay.
    request_id, variant = next((rid, v) for rid, v in request_ids if v == "legal-v1")
    given = httpx.post(f"{base}/feedback", json={"request_id": request_id, "label": True}, headers=TEAM, timeout=10)
    assert given.status_code == 201 and given.json()["variant"] == "legal-v1"
    counted = {v["name"]: v["requests"] for v in report["variants"]}
    time.sleep(1.0)                          # ten flush intervals: the late requests' facts are written too
    os.killpg(gateway_process(processes, "gw-canary").process.pid, signal.SIGKILL)
    base = start_gateway(config, name="gw-canary", env=ENV)
    again = admin(base, "GET", "/admin/experiments/legal").json()
    assert {v["name"]: v["requests"] for v in again["variants"]}["legal-v2"] == counted["legal-v2"]
    assert {v["name"]: v["requests"] for v in again["variants"]}["legal-v1"] >= counted["legal-v1"]
    assert next(v for v in again["variants"] if v["name"] == "legal-v1")["label"]["n"] == 1
    assert [e["kind"] for e in again["events"]].count("rollback") == 1
    assert admin(base, "GET", "/admin/routes/legal").json()["experiment"]["variants"]["legal-v2"] == 0
    repeat = httpx.post(f"{base}/feedback", json={"request_id": request_id, "label": False}, headers=TEAM, timeout=10)
    assert repeat.status_code == 409


# --- shadow isolation (real llama-server) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def shadow_gateway(llama_server, tiny_models, start_process, start_gateway, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-shadow")
    shadow_source = write_peft(root / "shadow")
    emulator = start_sglang(start_process, "sglang-shadow")
    adapter_roots = [str(tiny_models.model.parent), str(root)]
    config = {
        "adapter_roots": adapter_roots,
        "auth": {"client_keys": [{"name": "team", "key_env": "TEAM_KEY"}]},
        "backends": [{"name": "llama", "kind": "llamacpp", "url": llama_server},
                     {"name": "kt-shadow", "kind": "sglang", "url": emulator, "max_connections": 8}],
        "adapters": [{"name": "tiny-a", "gguf": str(tiny_models.lora_a), "backends": ["llama"]},
                     {"name": "candidate", "source": str(shadow_source), "backends": ["kt-shadow"]}],
        "routes": [
            {"name": "plain", "experiment": {"variants": {"tiny-a": 1}}},
            {"name": "shadowed", "experiment": {"variants": {"tiny-a": 1}, "shadow": {"candidate": 1.0},
                                                "shadow_limits": {"max_concurrency": 4, "timeout_s": 30}}}],
        "experiments": {"flush_interval_s": 0.1},
    }
    return start_gateway(config, name="gw-shadow", env=ENV), emulator


def latencies(base: str, rounds: int) -> dict[str, tuple[list[float], int]]:
    """Requests to `plain` and `shadowed`, interleaved so that both see the same machine; (seconds, errors)."""
    out = {"plain": ([], 0), "shadowed": ([], 0)}
    with httpx.Client(timeout=60) as client:
        for i in range(rounds):
            for model in ("plain", "shadowed") if i % 2 else ("shadowed", "plain"):
                started = time.perf_counter()
                response = chat(client, base, model, f"user-{i}")
                seconds, errors = out[model]
                seconds.append(time.perf_counter() - started)
                out[model] = (seconds, errors + (response.status_code != 200))
    return out


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@pytest.mark.parametrize("fault", [{"status": 500}, {"delay_first_byte_s": 10}], ids=["failing", "slow-10s"])
def test_a_slow_or_failing_shadow_leaves_client_latency_and_errors_unchanged(shadow_gateway, fault):
    base, emulator = shadow_gateway
    rounds = 100
    httpx.post(f"{emulator}/_emulator/reset", timeout=10).raise_for_status()
    httpx.post(f"{emulator}/_emulator/faults", json={**fault, "count": 10_000, "path": "/v1/chat/completions"},
               timeout=10).raise_for_status()
    before = {r: metric(base, "kimi_gateway_shadow_calls_total", result=r) for r in ("ok", "error", "dropped")}
    started = time.monotonic()
    measured = latencies(base, rounds)
    elapsed = time.monotonic() - started
    (plain, plain_errors), (shadowed, shadowed_errors) = measured["plain"], measured["shadowed"]
    assert plain_errors == shadowed_errors == 0
    # Within noise: the medians within a quarter (or 25 ms), the tails within half (or 100 ms).
    assert p(shadowed, 50) <= max(1.25 * p(plain, 50), p(plain, 50) + 0.025), (p(shadowed, 50), p(plain, 50))
    assert p(shadowed, 99) <= max(1.5 * p(plain, 99), p(plain, 99) + 0.1), (p(shadowed, 99), p(plain, 99))
    dropped = metric(base, "kimi_gateway_shadow_calls_total", result="dropped") - before["dropped"]
    if "status" in fault:      # failing at once: the mirrors were sent and recorded as errors
        errors = metric(base, "kimi_gateway_shadow_calls_total", result="error") - before["error"]
        assert errors + dropped == rounds and errors >= rounds * 0.9, (errors, dropped)
        report = admin(base, "GET", "/admin/experiments/shadowed").json()
        [shadow] = report["shadow"]
        assert shadow["variant"] == "candidate" and shadow["errors"] >= errors
    else:                      # 10 s each: four in flight at most, the rest dropped, none waited for
        launched = rounds - dropped
        assert launched <= 4 * (elapsed // 10 + 1), (launched, elapsed)
