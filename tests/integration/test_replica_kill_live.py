"""A replica killed with SIGKILL under a bounded load of 300 requests, streams included: no request that had
not started streaming fails (it is retried on the other replica), the dead replica is ejected within a
second, and a half-open probe readmits it once it runs again. On the real llama-server (two replicas), and
on SGLang emulator replicas."""
from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import httpx
import orjson

from backends.launchers.llamacpp import LlamaServerLaunch, free_port
from tests.integration.conftest import ROOT

REQUESTS = 300
WORKERS = 12


@dataclass
class Outcome:
    stream: bool
    status: int
    started: bool      # a stream whose first event reached the client
    broken: bool       # an SSE error event, or no [DONE]


def one(client: httpx.Client, base: str, index: int) -> Outcome:
    stream = index % 3 == 0
    body = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": f"request {index}"}], "max_tokens": 16,
            "stream": stream}
    if not stream:
        response = client.post(f"{base}/chat/completions", json=body)
        return Outcome(False, response.status_code, False, response.status_code != 200)
    with client.stream("POST", f"{base}/chat/completions", json=body) as response:
        raw = response.read()
    started = response.status_code == 200 and b"data: {" in raw
    broken = response.status_code != 200 or b'"error"' in raw or not raw.endswith(b"data: [DONE]\n\n")
    return Outcome(True, response.status_code, started, broken)


def ejected_at(processes, name: str) -> float | None:
    """When the gateway logged the ejection (wall clock): the log says it to the millisecond, where polling
    /metrics from a loaded test process would measure the poll."""
    log = next(p.log_path for p in processes if p.log_path and p.log_path.name == f"{name}.log")
    for line in log.read_text().splitlines():
        if "ejected after" in line:  # one JSON object per line (gateway/logs.py), `ts` in UTC to the millisecond
            return datetime.fromisoformat(orjson.loads(line)["ts"].replace("Z", "+00:00")).timestamp()
    return None


def ejected(base: str) -> float:
    text = httpx.get(f"{base.removesuffix('/v1')}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("kimi_gateway_replicas_ejected{"):
            return float(line.split()[-1])
    return 0.0


def load_with_kill(base: str, kill, processes, name: str) -> tuple[list[Outcome], float | None]:
    """300 requests from 12 workers; `kill()` once 60 answered; how long until the gateway ejected it."""
    outcomes: list[Outcome] = []
    lock, killed_at = threading.Lock(), []

    def worker(indexes: range) -> None:
        with httpx.Client(timeout=120) as client:
            for index in indexes:
                outcome = one(client, base, index)
                with lock:
                    outcomes.append(outcome)
                    if len(outcomes) == 60:
                        killed_at.append(time.time())
                        kill()

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(worker, [range(i, REQUESTS, WORKERS) for i in range(WORKERS)]))
    assert ejected(base) == 1  # /metrics shows it too
    at = ejected_at(processes, name)
    return outcomes, at - killed_at[0] if at is not None else None


def check_outcomes(outcomes: list[Outcome], ejected_after: float | None, what: str) -> None:
    failed_before_stream = [o for o in outcomes if o.broken and not o.started]
    cut_streams = [o for o in outcomes if o.broken and o.started]
    print(f"\n{what}: {len(outcomes)} requests, {len(failed_before_stream)} failed before streaming, "
          f"{len(cut_streams)} streams cut mid-way, ejected {ejected_after:.3f} s after the kill"
          if ejected_after is not None else f"\n{what}: never ejected", file=sys.stderr)
    assert len(outcomes) == REQUESTS
    assert not failed_before_stream, [(o.stream, o.status) for o in failed_before_stream]
    assert ejected_after is not None and ejected_after <= 1.0


def wait_readmitted(base: str, timeout_s: float = 40) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if ejected(base) == 0:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError("the restarted replica was never readmitted")


def test_llama_server_replica_killed_under_load(llama_binary, tiny_models, start_process, start_gateway, processes):
    launches = [LlamaServerLaunch(llama_binary, tiny_models.model, port=free_port(), alias="tiny", threads=1)
                for _ in range(2)]
    servers = [start_process(f"llama-replica-{i}", launch.argv(), f"{launch.url}/health")
               for i, launch in enumerate(launches)]
    base = start_gateway({
        "backends": [{"name": "llama", "kind": "llamacpp", "urls": [launch.url for launch in launches]}],
        "routes": [{"name": "kimi-k2.5", "targets": ["llama"]}],
    }, name="gw-replica-kill-llama")
    outcomes, ejected_after = load_with_kill(base, lambda: servers[1].process.kill(), processes,
                                             "gw-replica-kill-llama")
    check_outcomes(outcomes, ejected_after, "llama-server replica kill -9")

    restarted = start_process("llama-replica-1-restarted", launches[1].argv(), f"{launches[1].url}/health")
    readmitted_in = wait_readmitted(base)
    before = llama_requests(launches[1].url)
    with httpx.Client(timeout=60) as client:
        assert all(not one(client, base, i).broken for i in range(1, 40))
    assert llama_requests(launches[1].url) > before   # the restarted replica takes traffic again
    print(f"readmitted {readmitted_in:.2f} s after it was healthy again", file=sys.stderr)
    restarted.stop()


def llama_requests(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("llamacpp:prompt_tokens_total"):
            return float(line.split()[-1])
    raise AssertionError("llama-server /metrics has no prompt_tokens_total")


def test_sglang_replica_killed_under_load(start_process, start_gateway, processes):
    ports = [free_port() for _ in range(2)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]

    def emulator(index: int, name: str):
        argv = [sys.executable, "-m", "tests.emulators.sglang", "--port", str(ports[index]), "--served-model-name",
                "kimi", "--decode-interval-s", "0.005"]
        return start_process(name, argv, f"{urls[index]}/health", env={"PYTHONPATH": str(ROOT)})

    servers = [emulator(i, f"sglang-kill-{i}") for i in range(2)]
    base = start_gateway({
        "backends": [{"name": "kt", "kind": "sglang", "urls": urls}],
        "routes": [{"name": "kimi-k2.5", "targets": ["kt"]}],
    }, name="gw-replica-kill-sglang")
    outcomes, ejected_after = load_with_kill(base, lambda: servers[1].process.kill(), processes,
                                             "gw-replica-kill-sglang")
    check_outcomes(outcomes, ejected_after, "SGLang emulator replica kill -9")
    emulator(1, "sglang-kill-1-restarted")
    wait_readmitted(base)
    seen = len(httpx.get(f"{urls[1]}/_emulator/requests", timeout=10).json())
    with httpx.Client(timeout=60) as client:
        assert all(not one(client, base, i).broken for i in range(1, 40))
    assert len(httpx.get(f"{urls[1]}/_emulator/requests", timeout=10).json()) > seen
