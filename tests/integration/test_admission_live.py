"""Admission control against a real gateway process and an SGLang emulator that runs 2 requests at once
(`--max-running-requests 2`, read by the gateway from /server_info): fair share between keys, priority,
deadlines in the queue, keep-alives for queued streams, and the backend never given more than its slots."""
from __future__ import annotations

import asyncio
import sys
import time

import httpx
import pytest

from backends.launchers.llamacpp import free_port
from tests.integration.conftest import ROOT

KEYS = {"TEAM_A_KEY": "team-a-secret-key-1", "TEAM_B_KEY": "team-b-secret-key-2", "GOLD_KEY": "gold-secret-key-3"}
SERVICE_S = 0.2   # the emulator's prefill: each request holds its slot this long


def auth(env: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[env]}"}


@pytest.fixture(scope="module")
def gateway(start_process, start_gateway) -> tuple[str, str]:
    port = free_port()
    emulator = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "tests.emulators.sglang", "--port", str(port), "--served-model-name", "kimi",
            "--max-running-requests", "2", "--prefill-delay-s", str(SERVICE_S)]
    start_process("sglang-admission", argv, f"{emulator}/health", env={"PYTHONPATH": str(ROOT)})
    base = start_gateway({
        "auth": {"client_keys": [{"name": "team-a", "key_env": "TEAM_A_KEY"},
                                 {"name": "team-b", "key_env": "TEAM_B_KEY"},
                                 {"name": "gold", "key_env": "GOLD_KEY", "priority": "high"}]},
        "backends": [{"name": "kt", "kind": "sglang", "url": emulator}],
        "routes": [{"name": "kimi-k2.5", "targets": ["kt"]}],
        "admission": {"max_queue": 200, "keepalive_s": 0.3},
    }, name="gw-admission", env=KEYS)
    return base, emulator


def chat(http: httpx.AsyncClient, base: str, key: str, text: str = "hi", headers: dict | None = None):
    body = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    return http.post(f"{base}/chat/completions", json=body, headers={**auth(key), **(headers or {})})


def backend_log(emulator: str) -> list[dict]:
    return httpx.get(f"{emulator}/_emulator/requests", timeout=30).json()


async def wait_for_queue(base: str, length: int) -> None:
    """Until the gateway's queue for `kt` holds `length` requests (its /metrics), so the next one must wait."""
    root = base.removesuffix("/v1")
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(1000):
            for line in (await http.get(f"{root}/metrics")).text.splitlines():
                if line.startswith('kimi_gateway_queue_length{backend="kt"}') and float(line.split()[-1]) >= length:
                    return
            await asyncio.sleep(0.02)
    raise AssertionError(f"the queue never held {length} requests")


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100, max_keepalive_connections=100))


async def test_two_keys_share_two_slots_fairly_whatever_their_client_counts(gateway):
    """50 clients, 40 of team-a and 10 of team-b (both normal priority), each sending one request after
    another; completions are counted once every client has a request queued, for 10 s."""
    base, emulator = gateway
    done = {"TEAM_A_KEY": 0, "TEAM_B_KEY": 0}
    failed: list[int] = []
    loop = asyncio.get_running_loop()
    count_from = loop.time() + 3
    stop_at = count_from + 10
    body = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    async def client(http: httpx.AsyncClient, key: str) -> None:
        while loop.time() < stop_at:
            response = await http.post(f"{base}/chat/completions", json=body, headers=auth(key))
            if response.status_code != 200:
                failed.append(response.status_code)
            elif count_from <= loop.time() < stop_at:  # not the ramp-up, not the drain at the end
                done[key] += 1

    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(http, key) for key in ["TEAM_A_KEY"] * 40 + ["TEAM_B_KEY"] * 10))
    total = sum(done.values())
    peak = httpx.get(f"{emulator}/_emulator/stats", timeout=10).json()["peak_in_flight"]
    print(f"\nfair share: {done} of {total} completions; at most {peak} on the backend at once", file=sys.stderr)
    assert not failed
    assert peak <= 2  # the rest waited in the gateway, not on the backend
    assert min(done.values()) >= 0.4 * total


async def test_a_low_priority_burst_does_not_delay_high_priority(gateway):
    base, emulator = gateway
    async with client() as http:
        burst = [asyncio.ensure_future(chat(http, base, "TEAM_A_KEY", f"burst {i}", {"x-kimi-priority": "low"}))
                 for i in range(30)]
        await wait_for_queue(base, 10)  # the burst fills both slots and the queue
        seen_before = len(backend_log(emulator))
        started = time.monotonic()
        urgent = await chat(http, base, "GOLD_KEY", "urgent")
        waited = time.monotonic() - started
        assert all(response.status_code == 200 for response in await asyncio.gather(*burst))
    assert urgent.status_code == 200
    log = backend_log(emulator)
    position = next(i for i, entry in enumerate(log) if entry["body"]["messages"][0]["content"] == "urgent")
    overtaken = position - seen_before  # burst requests the backend got after the urgent one was sent
    print(f"\nhigh priority behind a burst of 30: answered in {waited:.2f} s (service time {SERVICE_S} s), "
          f"{overtaken} burst request(s) reached the backend before it", file=sys.stderr)
    # Without priority it would wait behind the ~20 queued; with it, only behind slots that freed while it was on
    # its way to the gateway (at most the two running), then it takes the next one.
    assert overtaken <= 2


async def test_a_deadline_that_passes_in_the_queue_is_a_429_that_never_reaches_the_backend(gateway):
    base, emulator = gateway
    async with client() as http:
        busy = [asyncio.ensure_future(chat(http, base, "TEAM_A_KEY", f"busy {i}")) for i in range(12)]
        await wait_for_queue(base, 4)
        # low: behind the twelve (its own key would otherwise be next in the round-robin)
        late = await chat(http, base, "TEAM_B_KEY", "too late", {"x-kimi-deadline-ms": "100", "x-kimi-priority": "low"})
        assert all(response.status_code == 200 for response in await asyncio.gather(*busy))
    assert late.status_code == 429, late.text
    assert late.headers["retry-after"] == "1"
    assert late.json()["error"]["type"] == "rate_limit_error"
    assert not any(entry["body"]["messages"][0]["content"] == "too late" for entry in backend_log(emulator))


async def test_a_queued_stream_gets_keepalive_comments_then_its_whole_stream(gateway):
    base, emulator = gateway
    async with client() as http:
        busy = [asyncio.ensure_future(chat(http, base, "TEAM_A_KEY", f"hold {i}")) for i in range(12)]
        await wait_for_queue(base, 4)
        low = {**auth("TEAM_B_KEY"), "x-kimi-priority": "low"}  # behind all twelve: it waits about a second
        async with http.stream("POST", f"{base}/chat/completions", headers=low, json={
                "model": "kimi-k2.5", "messages": [{"role": "user", "content": "queued stream"}], "max_tokens": 4,
                "stream": True}) as response:
            raw = await response.aread()
        assert all(response.status_code == 200 for response in await asyncio.gather(*busy))
    assert response.status_code == 200
    assert raw.startswith(b": waiting for a backend slot\n\n")
    assert raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw
