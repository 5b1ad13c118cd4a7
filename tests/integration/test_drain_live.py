"""SIGTERM on a real gateway process with 20 streams open (SGLang emulator, 0.1 s between events): /readyz
turns 503 at once, requests are still served during `shutdown.grace_s`, refused with 503 after it, every
stream completes intact, and then the process exits by itself."""
from __future__ import annotations

import asyncio
import signal
import sys
import time

import httpx
import orjson
import yaml

from backends.launchers.llamacpp import free_port
from tests.integration.conftest import ROOT

STREAMS = 20
TOKENS = 30
GRACE_S = 1.5


def start_gateway_process(start_process, tmp_path, config: dict, name: str):
    port = free_port()
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "listen": {"host": "127.0.0.1", "port": port},
                                    "state_dir": str(tmp_path / f"{name}-state")}))
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)]
    process = start_process(name, argv, f"http://127.0.0.1:{port}/healthz", env={"PYTHONPATH": str(ROOT)})
    return process, f"http://127.0.0.1:{port}"


async def one_stream(http: httpx.AsyncClient, root: str, index: int, first: asyncio.Event, opened: list) -> bytes:
    body = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": f"stream {index}"}],
            "max_tokens": TOKENS, "stream": True}
    raw = b""
    async with http.stream("POST", f"{root}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for piece in response.aiter_bytes():
            raw += piece
            if b"data: {" in raw and index not in opened:
                opened.append(index)
                if len(opened) == STREAMS:
                    first.set()
    return raw


def content_of(raw: bytes) -> str:
    text = ""
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in orjson.loads(line[6:]).get("choices") or ():
                text += (choice.get("delta") or {}).get("content") or ""
    return text


async def test_sigterm_drains_twenty_open_streams(start_process, tmp_path):
    port = free_port()
    emulator = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "tests.emulators.sglang", "--port", str(port), "--served-model-name", "kimi",
            "--decode-interval-s", "0.1"]
    start_process("sglang-drain", argv, f"{emulator}/health", env={"PYTHONPATH": str(ROOT)})
    config = {"backends": [{"name": "kt", "kind": "sglang", "url": emulator}],
              "routes": [{"name": "kimi-k2.5", "targets": ["kt"]}],
              "shutdown": {"grace_s": GRACE_S, "drain_deadline_s": 60}}
    process, root = start_gateway_process(start_process, tmp_path, config, "gw-drain")
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=50)) as http:
        reference = content_of(await one_stream(http, root, 0, asyncio.Event(), [0]))  # stream 0, undisturbed
        first, opened = asyncio.Event(), []
        streams = [asyncio.ensure_future(one_stream(http, root, i, first, opened)) for i in range(STREAMS)]
        await asyncio.wait_for(first.wait(), 60)

        process.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        ready = await http.get(f"{root}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        served = await http.post(f"{root}/v1/chat/completions", json={
            "model": "kimi-k2.5", "messages": [{"role": "user", "content": "still served"}], "max_tokens": 2})
        assert time.monotonic() - signalled < GRACE_S, "too slow to check the grace period"
        assert served.status_code == 200  # the load balancer has not noticed yet: still served
        metrics = (await http.get(f"{root}/metrics")).text
        assert "kimi_gateway_draining 1.0" in metrics

        await asyncio.sleep(max(0.0, signalled + GRACE_S + 0.3 - time.monotonic()))
        refused = await http.post(f"{root}/v1/chat/completions", json={
            "model": "kimi-k2.5", "messages": [{"role": "user", "content": "too late"}], "max_tokens": 2})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "shutting_down"
        assert (await http.get(f"{root}/readyz")).status_code == 503

        answers = await asyncio.gather(*streams)
    for raw in answers:
        assert raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw
        assert content_of(raw)  # every stream carried its whole answer
    assert reference and content_of(answers[0]) == reference   # intact: the same text as without a SIGTERM
    rc = await asyncio.to_thread(process.process.wait, 30)
    assert rc == 0
    log = process.log_path.read_text()
    assert "SIGTERM: draining" in log and "drained in" in log
