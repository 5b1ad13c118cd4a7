"""`kimi-gateway demo`: the embedded default. Finds or builds llama-server, writes a tiny model and two
adapters, and serves the gateway with a base route, both adapters and an A/B experiment. The backend has a
`launch:` block, so the gateway itself starts llama-server under its supervisor (backends/launchers/
supervisor.py: health-gated, restarted after a crash, stopped with the gateway). Ctrl-C stops everything."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import yaml

from backends.launchers.llama_build import BuildError, ensure_llama_server
from backends.launchers.llamacpp import free_port
from gateway.config import GatewayConfig, load_config

BASE_ROUTE = "kimi-k2.5"


def demo_config(llama_url: str, models, state_dir: Path, binary: Path | None = None) -> dict:
    backend = {"name": "llama", "kind": "llamacpp", "url": llama_url}
    if binary is not None:   # the gateway runs llama-server itself, with both adapters in its --lora list
        backend["launch"] = {"binary": str(binary), "model": str(models.model), "alias": "tiny"}
    return {
        "listen": {"host": "127.0.0.1", "port": 8080},
        "state_dir": str(state_dir),
        "logging": {"format": "text"},   # a person reads this terminal, not a log shipper
        "adapter_roots": [str(models.model.parent)],
        "backends": [backend],
        "adapters": [
            {"name": "demo-a", "gguf": str(models.lora_a), "profile": "thinking", "backends": ["llama"]},
            {"name": "demo-b", "gguf": str(models.lora_b), "profile": "instant", "backends": ["llama"]},
        ],
        "routes": [
            {"name": BASE_ROUTE, "targets": ["llama"]},
            {"name": "demo-ab", "experiment": {"sticky_by": "user", "variants": {"demo-a": 50, "demo-b": 50}}},
        ],
    }


def usage_text(port: int) -> str:
    base = f"http://127.0.0.1:{port}/v1"
    return f"""
kimi-gateway demo is ready on {base}   (Ctrl-C stops the gateway and llama-server)

  curl -s {base}/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "{BASE_ROUTE}", "messages": [{{"role": "user", "content": "Tell me about the blue river"}}], "max_tokens": 16}}'

  curl -sN {base}/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "demo-a", "stream": true, "messages": [{{"role": "user", "content": "hello"}}], "max_tokens": 8}}'

  {sys.executable} -c 'from openai import OpenAI; c = OpenAI(base_url="{base}", api_key="none");
for m in ["{BASE_ROUTE}", "demo-a", "demo-b", "demo-ab"]:
    r = c.chat.completions.create(model=m, messages=[{{"role": "user", "content": "the blue river"}}], max_tokens=12, temperature=0, user="alice")
    print(m, "->", r.choices[0].message.content)'

Models: {BASE_ROUTE} (base), demo-a (adapter, thinking profile), demo-b (adapter, instant profile),
demo-ab (A/B experiment over demo-a/demo-b, sticky by `user`). The tiny random model writes word salad:
the point is that each route answers differently and repeatably.
"""


def run_demo(port: int = 8080, workdir: str | None = None) -> int:
    from gateway.demo.tiny_gguf import write_demo_set
    from gateway.server import serve

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    home = Path(workdir) if workdir else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kimi-gateway" / "demo"
    home.mkdir(parents=True, exist_ok=True)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    try:
        binary = ensure_llama_server(say)
    except BuildError as exc:
        say(f"error: {exc}")
        return 2
    say(f"[demo] llama-server: {binary}")
    models = write_demo_set(home / "models")
    llama_url = f"http://127.0.0.1:{free_port()}"
    config_path = home / "demo.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(llama_url, models, home / "state", binary), sort_keys=False))
    config: GatewayConfig = load_config(config_path)
    say(f"[demo] the gateway starts and supervises llama-server on {llama_url} (log {home / 'state' / 'logs'}); "
        f"config {config_path}")
    print(usage_text(port), flush=True)
    try:
        serve(config, host="127.0.0.1", port=port)
    except KeyboardInterrupt:
        pass
    finally:
        say("[demo] stopped the gateway and llama-server")
    return 0
