"""build_drivers(config): the one place that knows every backend kind (STYLE.md convention 5)."""
from __future__ import annotations

from backends.base import BackendDriver
from backends.hosted import MoonshotDriver
from backends.httpx_transport import HttpxTransport
from backends.llamacpp import LlamaCppDriver
from backends.sglang import SglangDriver
from backends.transport import LeanTransport


def base_url(url: str) -> str:
    """Drivers send full OpenAI paths (/v1/...), so a configured URL may end in /v1 or not."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def build_drivers(config, secrets) -> dict[str, BackendDriver]:
    """One driver per configured backend. `config` is a GatewayConfig; `secrets(env_name)` resolves keys."""
    drivers: dict[str, BackendDriver] = {}
    for backend in config.backends:
        planned = [a for a in config.adapters if backend.name in a.backends]
        timeouts = dict(connect_timeout_s=backend.timeouts.connect_s, first_byte_timeout_s=backend.timeouts.first_byte_s,
                        idle_timeout_s=backend.timeouts.idle_s, backend=backend.name,
                        max_connections=backend.max_connections)
        match backend.kind:
            case "llamacpp":
                transports = [LeanTransport(base_url(url), **timeouts) for url in backend.endpoints]
                drivers[backend.name] = LlamaCppDriver(
                    backend.name, transports, adapter_files={a.name: a.gguf for a in planned},
                    vision=backend.has_vision)
            case "sglang":
                transports = [LeanTransport(base_url(url), **timeouts) for url in backend.endpoints]
                drivers[backend.name] = SglangDriver(
                    backend.name, transports, served_model=backend.served_model_name,
                    adapter_sources={a.name: a.source for a in planned}, expert_adapter=backend.expert_adapter,
                    vision=backend.has_vision)
            case "moonshot":
                # TLS over the internet: httpx's milliseconds vanish there (reference/hot-path.md).
                transports = [HttpxTransport(base_url(url), **timeouts) for url in backend.endpoints]
                drivers[backend.name] = MoonshotDriver(
                    backend.name, transports, api_key=secrets(backend.api_key_env), models=backend.models,
                    vision=backend.has_vision)
    return drivers
