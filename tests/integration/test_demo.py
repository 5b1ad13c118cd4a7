"""README command 1: `kimi-gateway demo` comes up, every demo route answers the openai SDK, Ctrl-C stops all."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from backends.launchers.llamacpp import ServerProcess, free_port
from tests.integration.conftest import ROOT, sdk


def test_demo_serves_every_route_and_stops_on_ctrl_c(llama_binary, tmp_path):
    port = free_port()
    log = tmp_path / "demo.log"
    demo = ServerProcess([sys.executable, "-m", "gateway.cli", "demo", "--port", str(port), "--workdir", str(tmp_path)],
                         f"http://127.0.0.1:{port}/healthz", log_path=log,
                         env={"PYTHONPATH": str(ROOT), "KIMI_GATEWAY_LLAMA_SERVER": str(llama_binary)})
    demo.start()
    try:
        demo.wait_ready(120)
        client = sdk(f"http://127.0.0.1:{port}/v1")
        answers = {}
        for model in ("kimi-k2.5", "demo-a", "demo-b", "demo-ab"):
            response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=6, temperature=0, user="alice")
            assert response.model == model
            answers[model] = response.choices[0].message.content
        assert len({answers["kimi-k2.5"], answers["demo-a"], answers["demo-b"]}) == 3
        assert answers["demo-ab"] in (answers["demo-a"], answers["demo-b"])
        printed = log.read_text()
        assert "curl -s" in printed and "from openai import OpenAI" in printed
    finally:
        os.killpg(demo.process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        code = demo.process.wait(30)
    assert code == 0, log.read_text()[-2000:]
    llama_left = subprocess.run(["pgrep", "-f", str(tmp_path / "models")], capture_output=True).stdout
    assert llama_left == b"", "llama-server survived Ctrl-C"
    assert "Traceback" not in log.read_text()
