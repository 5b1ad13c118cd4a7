"""build_drivers(config): the one place that knows every backend kind (STYLE.md convention 5)."""
from __future__ import annotations

from backends.base import AdapterFiles, BackendDriver
from backends.hosted import MoonshotDriver
from backends.httpx_transport import HttpxTransport
from backends.llamacpp import LlamaCppDriver
from backends.sglang import SglangDriver
from backends.transport import LeanTransport


def base_url(url: str) -> str:
    """Drivers send full OpenAI paths (/v1/...), so a configured URL may end in /v1 or not."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def adapter_plan(backend: str, adapters) -> dict[str, AdapterFiles]:
    """The adapters (specs with name/source/gguf/backends) that `backend` should serve."""
    return {a.name: AdapterFiles(a.source, a.gguf) for a in adapters if backend in a.backends}


def build_drivers(config, secrets, adapters) -> dict[str, BackendDriver]:
    """One driver per configured backend. `config` is a GatewayConfig, `adapters` the registered adapter
    specs, and `secrets(env_name)` resolves keys."""
    drivers: dict[str, BackendDriver] = {}
    for backend in config.backends:
        planned = adapter_plan(backend.name, adapters)
        api_key = secrets(backend.api_key_env) if backend.api_key_env else None
        timeouts = dict(connect_timeout_s=backend.timeouts.connect_s, first_byte_timeout_s=backend.timeouts.first_byte_s,
                        idle_timeout_s=backend.timeouts.idle_s, backend=backend.name,
                        max_connections=backend.max_connections)
        match backend.kind:
            case "llamacpp":
                transports = [LeanTransport(base_url(url), **timeouts) for url in backend.endpoints]
                drivers[backend.name] = LlamaCppDriver(
                    backend.name, transports, adapters=planned,
                    vision=backend.has_vision, api_key=api_key)
            case "sglang":
                transports = [LeanTransport(base_url(url), **timeouts) for url in backend.endpoints]
                drivers[backend.name] = SglangDriver(
                    backend.name, transports, served_model=backend.served_model_name,
                    adapters=planned, expert_adapter=backend.expert_adapter,
                    vision=backend.has_vision, api_key=api_key)
            case "moonshot":
                # TLS over the internet: httpx's milliseconds vanish there (reference/hot-path.md).
                transports = [HttpxTransport(base_url(url), **timeouts) for url in backend.endpoints]
                drivers[backend.name] = MoonshotDriver(
                    backend.name, transports, api_key=secrets(backend.api_key_env), models=backend.models,
                    vision=backend.has_vision)
    return drivers
