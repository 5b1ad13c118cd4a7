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
    lock, rolled_back, local, clients = threading.Lock(), threading.Event(), threading.local(), []

    def one(index: int) -> None:
        if rolled_back.is_set():
            return
        if not hasattr(local, "client"):       # one keep-alive connection per worker thread
            local.client = httpx.Client(timeout=30)
            with lock:
                clients.append(local.client)
        response = chat(local.client, base, "legal", f"user-{index}")
        with lock:
            statuses[response.headers.get("x-kimi-variant", "?")].append(response.status_code)
            request_ids.append((response.headers["x-request-id"], response.headers.get("x-kimi-variant", "?")))
        if index % 20 == 0:
            variants = admin(base, "GET", "/admin/routes/legal").json()["experiment"]["variants"]
            if variants["legal-v2"] == 0:
                rolled_back.set()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(1000)))
    for client in clients:
        client.close()
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
    time.sleep(1.0)                          # ten flush intervals: the last requests' facts are written too
    # Counted after the flush, not from the report above: that one can miss the facts of the candidate's last
    # requests, still in the write queue when it was read (CI saw 113 there and 115 after the restart).
    counted = {v["name"]: v["requests"] for v in admin(base, "GET", "/admin/experiments/legal").json()["variants"]}
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


SHADOW_FAULTS = {"failing": {"status": 500}, "slow": {"delay_first_byte_s": 10}}


@pytest.fixture(scope="module")
def shadow_gateway(llama_server, tiny_models, start_process, start_gateway, tmp_path_factory):
    """Clients on the real llama-server; each shadowed route mirrors every request to its own candidate on its
    own SGLang emulator, one failing at once, one answering after 10 s."""
    root = tmp_path_factory.mktemp("peft-shadow")
    emulators = {kind: start_sglang(start_process, f"sglang-shadow-{kind}") for kind in SHADOW_FAULTS}
    config = {
        "adapter_roots": [str(tiny_models.model.parent), str(root)],
        "auth": {"client_keys": [{"name": "team", "key_env": "TEAM_KEY"}]},
        "backends": [{"name": "llama", "kind": "llamacpp", "url": llama_server}]
                    + [{"name": f"kt-{kind}", "kind": "sglang", "url": url} for kind, url in emulators.items()],
        "adapters": [{"name": "tiny-a", "gguf": str(tiny_models.lora_a), "backends": ["llama"]}]
                    + [{"name": f"candidate-{kind}", "source": str(write_peft(root / kind)), "backends": [f"kt-{kind}"]}
                       for kind in SHADOW_FAULTS],
        "routes": [{"name": "plain", "experiment": {"variants": {"tiny-a": 1}}}]
                  + [{"name": f"shadowed-{kind}", "experiment": {
                      "variants": {"tiny-a": 1}, "shadow": {f"candidate-{kind}": 1.0},
                      "shadow_limits": {"max_concurrency": 4, "timeout_s": 30}}} for kind in SHADOW_FAULTS],
        "experiments": {"flush_interval_s": 0.1},
    }
    base = start_gateway(config, name="gw-shadow", env=ENV)
    for kind, fault in SHADOW_FAULTS.items():    # chat only: the adapter lifecycle's probes are completions
        httpx.post(f"{emulators[kind]}/_emulator/faults", json={**fault, "count": 10_000, "path": "/v1/chat/completions"},
                   timeout=10).raise_for_status()
    return base


def latencies(base: str, shadowed: str, rounds: int) -> dict[str, tuple[list[float], int]]:
    """Requests to `plain` and the shadowed route, interleaved so that both see the same machine; (seconds, errors)."""
    out = {"plain": ([], 0), shadowed: ([], 0)}
    with httpx.Client(timeout=60) as client:
        for i in range(rounds):
            for model in ("plain", shadowed) if i % 2 else (shadowed, "plain"):
                started = time.perf_counter()
                response = chat(client, base, model, f"user-{i}")
                seconds, errors = out[model]
                seconds.append(time.perf_counter() - started)
                out[model] = (seconds, errors + (response.status_code != 200))
    return out


def p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@pytest.mark.parametrize("kind", list(SHADOW_FAULTS))
def test_a_slow_or_failing_shadow_leaves_client_latency_and_errors_unchanged(shadow_gateway, kind):
    base, route, rounds = shadow_gateway, f"shadowed-{kind}", 100
    started = time.monotonic()
    measured = latencies(base, route, rounds)
    elapsed = time.monotonic() - started
    (plain, plain_errors), (shadowed, shadowed_errors) = measured["plain"], measured[route]
    assert plain_errors == shadowed_errors == 0
    # Within noise: the medians within a quarter (or 25 ms), the tails within half (or 100 ms).
    assert p(shadowed, 50) <= max(1.25 * p(plain, 50), p(plain, 50) + 0.025), (p(shadowed, 50), p(plain, 50))
    assert p(shadowed, 99) <= max(1.5 * p(plain, 99), p(plain, 99) + 0.1), (p(shadowed, 99), p(plain, 99))
    count = {result: metric(base, "kimi_gateway_shadow_calls_total", experiment=route, result=result)
             for result in ("ok", "error", "timeout", "dropped")}
    if kind == "failing":      # failing at once: the mirrors were sent and recorded as errors
        assert count["error"] + count["dropped"] == rounds and count["error"] >= rounds * 0.9, count
        time.sleep(0.5)        # the last batch of shadow results reaches the store
        [shadow] = admin(base, "GET", f"/admin/experiments/{route}").json()["shadow"]
        assert shadow["variant"] == "candidate-failing" and shadow["errors"] == shadow["calls"] >= count["error"] - 4
    else:                      # 10 s each: four in flight at most, the rest dropped, none waited for
        launched = rounds - count["dropped"]
        assert launched <= 4 * (elapsed // 10 + 1), (launched, elapsed, count)
