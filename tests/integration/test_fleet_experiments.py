"""Experiments across three gateway replicas sharing the machine's real PostgreSQL: a route weight change made
through one replica is in force on the others within a second (LISTEN/NOTIFY, not the 5 s poll), and request
facts are shared, so feedback may be given through any replica."""
from __future__ import annotations

import time

import httpx
import pytest

from backends.launchers.llamacpp import free_port
from tests.adapter_files import write_peft
from tests.integration.test_adapter_lifecycle import ADMIN_KEY, MESSAGES, admin, start_sglang_on
from tests.services import fresh_database

TEAM_KEY = "sk-fleet-experiments-team-0001"
CONVERGE_S = 1.0
BEFORE, AFTER = {"v1": 100, "v2": 0}, {"v1": 0, "v2": 100}


@pytest.fixture(scope="module")
def replicas(start_process, start_gateway, processes, tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet-experiments-peft")
    dirs = {name: write_peft(root / name, r=8) for name in ("v1", "v2")}
    port = free_port()
    start_sglang_on(start_process, "sglang-fleet-experiments", port)
    with fresh_database() as dsn:
        config = {
            "adapter_roots": [str(root)],
            "store": {"kind": "postgres", "dsn_env": "KIMI_GATEWAY_DSN"},
            "auth": {"client_keys": [{"name": "team", "key_env": "TEAM_KEY"}]},
            "backends": [{"name": "kt", "kind": "sglang", "url": f"http://127.0.0.1:{port}"}],
            "adapters": [{"name": name, "source": str(path), "backends": ["kt"]} for name, path in dirs.items()],
            "routes": [{"name": "legal", "experiment": {"variants": BEFORE}}],
            # the poll is slowed to once a minute: only the NOTIFY can bring the change within a second
            "experiments": {"flush_interval_s": 0.05, "sync_interval_s": 60},
        }
        env = {"KIMI_GATEWAY_ADMIN_KEYS": ADMIN_KEY, "KIMI_GATEWAY_DSN": dsn, "TEAM_KEY": TEAM_KEY}
        started = len(processes)
        try:
            yield [start_gateway(config, name=f"gw-fleet-exp-{i}", env=env) for i in range(3)]
        finally:
            for process in processes[started:]:
                process.stop()   # before their database goes


def chat(base: str) -> httpx.Response:
    body = {"model": "legal", "user": "alice", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    return httpx.post(f"{base}/chat/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {TEAM_KEY}"})


def wait_for_variant(base: str, variant: str, within_s: float) -> httpx.Response:
    deadline = time.monotonic() + within_s
    while True:
        answer = chat(base)
        if answer.status_code == 200 and answer.headers.get("x-kimi-variant") == variant:
            return answer
        assert time.monotonic() < deadline, f"{base} never answered with {variant}: {answer.status_code} " \
                                            f"{answer.headers.get('x-kimi-variant')} {answer.text[:200]}"
        time.sleep(0.05)


def test_a_weight_change_is_live_everywhere_within_a_second_and_feedback_is_shared(replicas):
    for base in replicas:   # the adapters load at start; every replica serves the control
        wait_for_variant(base, "v1", within_s=60.0)

    urls = [base.removesuffix("/v1") + "/admin/routes/legal" for base in replicas[1:]]
    with httpx.Client(timeout=10, headers={"authorization": f"Bearer {ADMIN_KEY}"}) as http:
        for url in urls:   # connections open before the change: the time below is the replicas', not the client's
            assert http.get(url).json()["experiment"]["variants"] == BEFORE
        route = {"name": "legal", "experiment": {"variants": AFTER}}
        changed = http.put(replicas[0].removesuffix("/v1") + "/admin/routes/legal", json=route)
        assert changed.status_code == 200, changed.text
        started, waits = time.monotonic(), []
        for url in urls:   # each measured from the PUT's answer until an answer that has the change
            while http.get(url).json()["experiment"]["variants"] != AFTER:
                assert time.monotonic() - started < 5.0, f"{url} never took the change"
                time.sleep(0.01)
            waits.append(time.monotonic() - started)
    print(f"\nweight change live on replicas 2 and 3 after {[round(w * 1000) for w in waits]} ms")
    assert max(waits) < CONVERGE_S, waits
    for base in replicas:
        answer = chat(base)
        assert answer.status_code == 200 and answer.headers["x-kimi-variant"] == "v2", answer.headers

    served = chat(replicas[0])
    request_id = served.headers["x-request-id"]
    body = {"request_id": request_id, "score": 0.9}
    team = {"authorization": f"Bearer {TEAM_KEY}"}
    deadline = time.monotonic() + 5.0   # replica 1 writes its facts in batches, off the hot path (every 50 ms)
    while (given := httpx.post(f"{replicas[2]}/feedback", json=body, headers=team)).status_code == 404:
        assert time.monotonic() < deadline, given.text
        time.sleep(0.05)
    assert given.status_code == 201, given.text
    assert given.json()["variant"] == "v2"
    again = httpx.post(f"{replicas[1]}/feedback", json=body, headers=team)
    assert again.status_code == 409, again.text   # one score per request, across the fleet
    report = admin(replicas[1], "GET", "/experiments/legal").json()
    v2 = next(v for v in report["variants"] if v["name"] == "v2")
    assert v2["score"]["mean"] == 0.9, report
