"""`kimi-gateway serve --workers 2`: two processes on one port, and /metrics (answered by either) counts the
requests of both exactly; access lines come from both pids; SIGTERM stops them all."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from backends.launchers.llamacpp import free_port
from gateway.config import ConfigError, GatewayConfig
from gateway.workers import check_workers
from tests.adapter_files import write_peft
from tests.integration.test_sglang import start_sglang

ROOT = Path(__file__).parents[2]
PROMPT = [{"role": "user", "content": "hi"}]


def counted(base: str) -> dict[tuple[str, str], float]:
    found: dict[tuple[str, str], float] = {}
    for line in httpx.get(f"{base}/metrics", headers={"connection": "close"}, timeout=10).text.splitlines():
        if line.startswith("kimi_gateway_requests_total{"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1:line.index("}")].split(","))
            value = float(line.rsplit(" ", 1)[1])
            if value:
                key = (labels["route"].strip('"'), labels["code"].strip('"'))
                found[key] = found.get(key, 0) + value
    return found


def test_two_workers_share_the_port_and_their_metrics(start_process, tmp_path):
    sglang = start_sglang(start_process, "sglang-workers")
    write_peft(tmp_path / "adapters" / "legal")
    port = free_port()
    config = {"listen": {"host": "127.0.0.1", "port": port}, "state_dir": str(tmp_path / "state"),
              "adapter_roots": [str(tmp_path / "adapters")],
              "backends": [{"name": "kt", "kind": "sglang", "url": sglang}],
              "adapters": [{"name": "legal", "source": str(tmp_path / "adapters" / "legal"), "backends": ["kt"]}],
              "routes": [{"name": "kimi-k2.5", "targets": ["kt"]}]}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--workers", "2"]
    gateway = start_process("gateway-workers", argv, f"http://127.0.0.1:{port}/healthz", env={"PYTHONPATH": str(ROOT)})
    base = f"http://127.0.0.1:{port}"
    sent = {("kimi-k2.5", "200"): 0, ("legal", "200"): 0, ("", "404"): 0}
    deadline = time.monotonic() + 60
    pids: set[int] = set()
    while time.monotonic() < deadline and (len(pids) < 2 or sum(sent.values()) < 60):
        for model, stream in (("kimi-k2.5", False), ("legal", True), ("nope", False)):
            answer = httpx.post(f"{base}/v1/chat/completions", headers={"connection": "close"}, timeout=30,
                                json={"model": model, "messages": PROMPT, "max_tokens": 4, "stream": stream})
            sent[(model if model != "nope" else "", str(answer.status_code))] += 1
        pids = access_pids(Path(gateway.log_path))
    assert len(pids) == 2, f"access lines came from {pids}"
    for _ in range(6):   # whichever worker answers /metrics, it counts both
        assert counted(base) == sent
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    in_flight = [line for line in metrics.splitlines() if line.startswith("kimi_gateway_in_flight_requests{")]
    assert in_flight and all(line.endswith(" 0.0") for line in in_flight)
    assert 'kimi_gateway_backend_up{backend="kt"} 1.0' in metrics
    gateway.stop()
    assert gateway.process.returncode == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def access_pids(log: Path) -> set[int]:
    pids = set()
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"kimi_gateway.access"' in line:
            pids.add(orjson.loads(line)["pid"])
    return pids


def test_workers_refuse_backends_the_gateway_would_launch_n_times(tmp_path):
    config = GatewayConfig.model_validate({
        "state_dir": str(tmp_path), "backends": [{"name": "gguf", "kind": "llamacpp", "url": "http://127.0.0.1:9",
                                                  "launch": {"binary": "/bin/true", "model": "/m.gguf"}}]})
    with pytest.raises(ConfigError, match="`launch:`"):
        check_workers(config, 2)
    check_workers(config, 1)
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None   # only `serve --workers` sets it
