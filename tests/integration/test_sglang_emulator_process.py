"""The SGLang emulator as a process (sglang-kt.md §2.1, §2.4): SIGTERM drains while /health says 503,
and a restart forgets every adapter loaded at runtime."""
from __future__ import annotations

import signal
import sys
import threading
import time

import httpx

from backends.launchers.llamacpp import free_port
from tests.adapter_files import write_peft
from tests.integration.conftest import ROOT

PROMPT = [{"role": "user", "content": "Tell me about the blue river"}]


def launch(start_process, name: str, port: int, *extra: str):
    argv = [sys.executable, "-m", "tests.emulators.sglang", "--port", str(port), "--served-model-name", "kimi",
            "--enable-lora", "--max-lora-rank", "64", *extra]
    return start_process(name, argv, f"http://127.0.0.1:{port}/health", env={"PYTHONPATH": str(ROOT)})


def test_sigterm_drains_in_flight_streams_with_health_503_then_exits(start_process):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = launch(start_process, "sglang-sigterm", port, "--prefill-delay-s", "1.5")
    body = {"model": "kimi", "messages": PROMPT, "max_tokens": 4, "stream": True}
    head, result = threading.Event(), {}

    def stream() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
            head.set()
            result["text"] = response.read().decode()
    reader = threading.Thread(target=stream)
    reader.start()
    assert head.wait(10)  # the head came before the 1.5 s prefill
    process.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert httpx.get(f"{url}/health", timeout=5).status_code == 503
    assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 200  # still serving while draining
    reader.join(30)
    assert result["text"].endswith("data: [DONE]\n\n")
    assert process.process.wait(15) == 0


def test_a_restarted_emulator_has_forgotten_runtime_adapters(start_process, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = launch(start_process, "sglang-before-restart", port)
    loaded = httpx.post(f"{url}/load_lora_adapter", timeout=10,
                        json={"lora_name": "legal", "lora_path": str(write_peft(tmp_path / "legal"))})
    assert loaded.status_code == 200 and "legal" in loaded.json()["loaded_adapters"]
    first.stop()
    launch(start_process, "sglang-after-restart", port)
    assert [card["id"] for card in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]] == ["kimi"]
    refused = httpx.post(f"{url}/v1/chat/completions", timeout=10,
                         json={"model": "kimi:legal", "messages": PROMPT, "max_tokens": 2})
    assert refused.status_code == 400 and "never been loaded: legal" in refused.json()["message"]
