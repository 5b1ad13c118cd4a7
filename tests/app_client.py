"""The app in process with its lifespan run (httpx's ASGITransport does not run it): drivers started, the
adapter lifecycle started and every replica reconciled once, then closed again."""
from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from gateway.app import GatewayApp
from gateway.demo import tiny_gguf
from tests.adapter_files import write_peft


@asynccontextmanager
async def running(app: GatewayApp):
    await app.state.start()
    await app.state.lifecycle.reconcile_all()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            yield client
    finally:
        await app.state.aclose()


def write_adapter_set(root: Path) -> dict[str, str]:
    """A valid PEFT dir and GGUF LoRA (with the tiny base model they fit) under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    base = tiny_gguf.write_tiny_model(root / "base.gguf")
    gguf = tiny_gguf.write_tiny_lora(root / "a.gguf", base, seed=1, name="a")
    source = write_peft(root / "a")
    return {"source": str(source), "gguf": str(gguf), "base": str(base)}
