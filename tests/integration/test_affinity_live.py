"""Adapter affinity on four SGLang emulator replicas that hold four adapters each, with eight adapters under
a skewed (Zipf) mix: requests go to replicas that have their adapter loaded, the hot adapter is spread over
several replicas, and adapter loads per minute stay bounded."""
from __future__ import annotations

import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from backends.launchers.llamacpp import free_port
from tests.adapter_files import write_peft
from tests.integration.conftest import ROOT

ADAPTERS = [f"zipf-{i}" for i in range(8)]
REPLICAS = 4
CAPACITY = 4   # --max-loaded-loras per replica: 16 slots for 8 adapters, so not every adapter fits everywhere


def zipf_weights(count: int, s: float = 1.2) -> list[float]:
    return [1 / (rank + 1) ** s for rank in range(count)]


def stats(urls: list[str]) -> list[dict]:
    return [httpx.get(f"{url}/_emulator/stats", timeout=10).json() for url in urls]


def requests_seen(urls: list[str]) -> list[list[dict]]:
    return [httpx.get(f"{url}/_emulator/requests", timeout=30).json() for url in urls]


def run_mix(base: str, seconds: float, seed: int, workers: int = 6) -> list[int]:
    """Zipf-distributed non-stream requests for `seconds`; the status codes."""
    codes: list[int] = []
    lock, stop_at = threading.Lock(), time.monotonic() + seconds
    weights = zipf_weights(len(ADAPTERS))

    def worker(index: int) -> None:
        pick = random.Random(seed * 100 + index)
        with httpx.Client(timeout=60) as client:
            while time.monotonic() < stop_at:
                model = pick.choices(ADAPTERS, weights)[0]
                response = client.post(f"{base}/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
                with lock:
                    codes.append(response.status_code)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(worker, range(workers)))
    return codes


def test_requests_follow_their_adapter_and_a_hot_adapter_spreads(start_process, start_gateway, tmp_path_factory):
    root = tmp_path_factory.mktemp("affinity-peft")
    dirs = {name: write_peft(root / name) for name in ADAPTERS}
    ports = [free_port() for _ in range(REPLICAS)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    for index, port in enumerate(ports):
        argv = [sys.executable, "-m", "tests.emulators.sglang", "--port", str(port), "--served-model-name", "kimi",
                "--enable-lora", "--max-loaded-loras", str(CAPACITY), "--max-loras-per-batch", str(CAPACITY),
                "--prefill-delay-s", "0.01"]
        start_process(f"sglang-affinity-{index}", argv, f"{urls[index]}/health", env={"PYTHONPATH": str(ROOT)})
    base = start_gateway({
        "adapter_roots": [str(root)],
        "backends": [{"name": "kt", "kind": "sglang", "urls": urls, "max_loaded_adapters": CAPACITY}],
        "adapters": [{"name": name, "source": str(path), "backends": ["kt"]} for name, path in dirs.items()],
        "routes": [{"name": "kimi-k2.5", "targets": ["kt"]}],
    }, name="gw-affinity")

    warm = run_mix(base, 20, seed=1)       # the plan learns the mix
    assert set(warm) == {200}, f"warm-up failures: {sorted(set(warm))}"
    before, seen_before = stats(urls), [len(log) for log in requests_seen(urls)]
    started = time.monotonic()
    measured = run_mix(base, 30, seed=2)
    minutes = (time.monotonic() - started) / 60
    after, logs = stats(urls), requests_seen(urls)

    assert set(measured) == {200}, f"failures: {sorted(set(measured))}"
    requests = [log[count:] for log, count in zip(logs, seen_before)]
    served = sum(len(r) for r in requests)
    misses = sum(a["implicit_reloads"] - b["implicit_reloads"] for a, b in zip(after, before))
    loads = sum(a["loads"] - b["loads"] for a, b in zip(after, before))
    hit_ratio = 1 - misses / served
    hot = ADAPTERS[0]
    hot_replicas = {index for index, log in enumerate(requests)
                    if any(hot in ((entry.get("body") or {}).get("model") or "") for entry in log)}
    print(f"\naffinity: {served} requests, hit ratio {hit_ratio:.4f}, {loads} loads in {minutes:.2f} min "
          f"({loads / minutes:.1f}/min), hot adapter on {len(hot_replicas)} replicas", file=sys.stderr)
    assert hit_ratio >= 0.95
    assert len(hot_replicas) >= 2           # spread, not piled onto one replica
    assert loads / minutes <= 30            # bounded: at most two moves per plan update
    assert all(len(a["loaded"]) <= CAPACITY for a in after)
