"""The real llama-server under the supervisor: `kimi-gateway launch llama-server` gates on health, a kill -9 is
answered by a restart within the backoff, SIGTERM stops it; and under `serve` (a `launch:` block), requests
through the gateway during the restart fail over to the next target or get a 503 with retry-after, never hang."""
import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from backends.launchers.llamacpp import free_port
from tests.integration.conftest import ROOT
from tests.integration.test_launch_sglang import children, wait_healthy, wait_supervised

RESTART = {"backoff_initial_s": 0.5, "backoff_max_s": 2, "max_crashes": 5, "window_s": 60}


def llama_children(pid: int, model: Path) -> list[int]:
    found = []
    for child in children(pid):
        try:
            if str(model) in Path(f"/proc/{child}/cmdline").read_text():
                found.append(child)
        except OSError:
            pass
    return found


def test_launch_llama_server_restarts_after_kill_9(llama_binary, tiny_models, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = {"state_dir": str(tmp_path / "state"), "adapter_roots": [str(tiny_models.model.parent)],
              "backends": [{"name": "gguf", "kind": "llamacpp", "url": url,
                            "launch": {"binary": str(llama_binary), "model": str(tiny_models.model), "threads": 1,
                                       "restart": RESTART}}],
              "adapters": [{"name": "tiny-a", "gguf": str(tiny_models.lora_a), "backends": ["gguf"]}],
              "routes": [{"name": "kimi-k2.5", "targets": ["gguf"]}]}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    with (tmp_path / "launch.out").open("wb") as out:
        launch = subprocess.Popen([sys.executable, "-m", "gateway.cli", "launch", "llama-server", "--config", str(path),
                                   "--backend", "gguf"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        wait_supervised(tmp_path / "launch.out", launch)
        adapters = httpx.get(f"{url}/lora-adapters", timeout=5).json()
        assert [a["path"] for a in adapters] == [str(tiny_models.lora_a)]   # the registered adapter, preloaded
        [server] = llama_children(launch.pid, tiny_models.model)
        os.kill(server, signal.SIGKILL)
        back_in = wait_healthy(url, launch, 30)
        assert llama_children(launch.pid, tiny_models.model) != [server]
        print(f"\nllama-server back {back_in:.2f} s after kill -9 (backoff 0.5 s)", file=sys.stderr)
        os.kill(launch.pid, signal.SIGTERM)
        assert launch.wait(timeout=30) == 0
        assert llama_children(launch.pid, tiny_models.model) == []
        log = (tmp_path / "state" / "logs" / "gguf-0.log").read_text()
        assert log.count("supervisor: starting") == 2 and "--cache-ram 0" in log
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()


def ask(base: str, model: str) -> tuple[int, str | None, str | None]:
    """(status, x-kimi-backend, retry-after) of one short chat through the gateway; a hang fails the test."""
    try:
        reply = httpx.post(f"{base}/chat/completions", timeout=15, json={
            "model": model, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]})
    except httpx.TimeoutException:
        return 0, None, None
    return reply.status_code, reply.headers.get("x-kimi-backend"), reply.headers.get("retry-after")


def test_requests_during_a_crash_restart_fail_over_or_get_503_with_retry_after(
        llama_binary, tiny_models, llama_server, start_gateway, processes):
    port = free_port()
    config = {"adapter_roots": [str(tiny_models.model.parent)],
              "backends": [{"name": "managed", "kind": "llamacpp", "url": f"http://127.0.0.1:{port}",
                            "launch": {"binary": str(llama_binary), "model": str(tiny_models.model), "threads": 1,
                                       "restart": {**RESTART, "backoff_initial_s": 2.0}}},   # a window to see
                           {"name": "spare", "kind": "llamacpp", "url": llama_server}],
              "routes": [{"name": "with-fallback", "targets": ["managed", "spare"]},
                         {"name": "managed-only", "targets": ["managed"]}]}
    base = start_gateway(config, name="gw-supervised")
    assert ask(base, "with-fallback")[:2] == (200, "managed")
    gateway = next(p for p in reversed(processes) if p.argv[-1].endswith("gw-supervised.yaml"))
    [server] = llama_children(gateway.process.pid, tiny_models.model)
    os.kill(server, signal.SIGKILL)
    results: list[tuple[str, tuple]] = []
    deadline = time.monotonic() + 30
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        while time.monotonic() < deadline:
            batch = [(m, pool.submit(ask, base, m)) for m in ("with-fallback", "managed-only") * 2]
            results += [(m, f.result()) for m, f in batch]
            managed_only = [r for m, r in results if m == "managed-only"]
            if len(results) > 8 and all(r[:2] == (200, "managed") for r in managed_only[-2:]):
                break
            time.sleep(0.1)
    counts = {}
    for model, (status, backend, _) in results:
        counts[(model, status, backend)] = counts.get((model, status, backend), 0) + 1
    print(f"\nduring the restart: {counts}", file=sys.stderr)
    assert all(status != 0 for _, (status, _, _) in results), "a request hung"
    for model, (status, backend, retry_after) in results:
        assert status in (200, 503), (model, status)
        if status == 503:
            assert retry_after is not None and int(retry_after) >= 1
        if model == "with-fallback":
            assert status == 200, "the fallback target was there"
    assert any(backend == "spare" for _, (_, backend, _) in results), "nothing failed over while it was down"
    assert managed_only[-1][:2] == (200, "managed"), "the managed server did not come back"
    assert llama_children(gateway.process.pid, tiny_models.model) != [server]
