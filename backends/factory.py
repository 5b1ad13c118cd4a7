"""The one table of backend kinds (STYLE.md convention 5): each kind's config model and how its driver is
built. A new kind is one driver module (config model + driver) plus one entry here."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Union

from pydantic import Field

from backends.base import BackendDriver
from backends.config import BackendConfigBase
from backends.generations import generation
from backends.hosted import MoonshotConfig, MoonshotDriver
from backends.httpx_transport import HttpxTransport
from backends.launchers.llama_build import find_llama_server
from backends.launchers.llama_plan import first_shard, make_supervisor
from backends.launchers.llamacpp import LlamaServerSupervisor
from backends.launchers.supervisor import LaunchError
from backends.llamacpp import LlamaCppConfig, LlamaCppDriver
from backends.sglang import SglangConfig, SglangDriver
from backends.transport import LeanTransport

Secrets = Callable[[str], "str | None"]


def base_url(url: str) -> str:
    """Drivers send full OpenAI paths (/v1/...), so a configured URL may end in /v1 or not."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def api_key(backend: BackendConfigBase, secrets: Secrets) -> str | None:
    return secrets(backend.api_key_env) if backend.api_key_env else None


def transport_options(backend: BackendConfigBase) -> dict:
    return dict(connect_timeout_s=backend.timeouts.connect_s, first_byte_timeout_s=backend.timeouts.first_byte_s,
                idle_timeout_s=backend.timeouts.idle_s, health_timeout_s=backend.timeouts.health_s,
                backend=backend.name, max_connections=backend.max_connections)


def build_llamacpp(backend: LlamaCppConfig, secrets: Secrets) -> LlamaCppDriver:
    transports = [LeanTransport(base_url(url), **transport_options(backend)) for url in backend.endpoints]
    return LlamaCppDriver(backend.name, transports, vision=backend.has_vision, api_key=api_key(backend, secrets),
                          gen=generation(backend.generation) if backend.generation else None)


def build_sglang(backend: SglangConfig, secrets: Secrets) -> SglangDriver:
    transports = [LeanTransport(base_url(url), **transport_options(backend)) for url in backend.endpoints]
    flags = backend.parser_args()
    return SglangDriver(backend.name, transports, served_model=backend.served_model_name,
                        expert_adapter=backend.expert_adapter, vision=backend.has_vision,
                        api_key=api_key(backend, secrets), gen=generation(backend.generation),
                        parsers={"reasoning_parser": flags[1], "tool_call_parser": flags[3]})


def build_moonshot(backend: MoonshotConfig, secrets: Secrets) -> MoonshotDriver:
    # TLS over the internet: httpx's milliseconds vanish there (reference/hot-path.md).
    transports = [HttpxTransport(base_url(url), **transport_options(backend)) for url in backend.endpoints]
    return MoonshotDriver(backend.name, transports, api_key=api_key(backend, secrets), models=backend.models,
                          vision=backend.has_vision, catalog=backend.catalog(), refresh_s=backend.models_refresh_s)


def llamacpp_launchers(backend: LlamaCppConfig, logs: Path) -> list[LlamaServerSupervisor] | None:
    """With `launch`: one supervised llama-server per configured URL (its port)."""
    launch = backend.launch
    if launch is None:
        return None
    binary = Path(launch.binary) if launch.binary else find_llama_server()
    if binary is None:
        raise LaunchError(f"backends.{backend.name}.launch: no llama-server binary: set `binary`, put "
                          "llama-server on PATH, or run `python -m backends.launchers.llama_build`")
    return [make_supervisor(backend, str(binary), first_shard(launch.model), url, logs, i)
            for i, url in enumerate(backend.endpoints)]


@dataclass(frozen=True)
class Kind:
    config: type[BackendConfigBase]
    build: Callable[..., BackendDriver]
    launchers: Callable[..., list | None] | None = None   # processes the gateway runs for the backend, if any


KINDS: dict[str, Kind] = {
    "sglang": Kind(SglangConfig, build_sglang),
    "llamacpp": Kind(LlamaCppConfig, build_llamacpp, llamacpp_launchers),
    "moonshot": Kind(MoonshotConfig, build_moonshot),
}

# The config's `backends:` entries: one model per kind, chosen by `kind`.
BackendConfig = Annotated[Union[tuple(kind.config for kind in KINDS.values())], Field(discriminator="kind")]


def build_launchers(config, logs: Path) -> dict[str, list]:
    """The backends whose processes the gateway runs itself (a `launch` block), by backend name."""
    launchers = {}
    for backend in config.backends:
        make = KINDS[backend.kind].launchers
        started = make(backend, logs) if make is not None else None
        if started:
            launchers[backend.name] = started
    return launchers


def build_drivers(config, secrets: Secrets) -> dict[str, BackendDriver]:
    """One driver per configured backend; `secrets(env_name)` resolves keys."""
    drivers = {}
    for backend in config.backends:
        driver = drivers[backend.name] = KINDS[backend.kind].build(backend, secrets)
        driver.configure_traffic(backend.max_concurrency, backend.outliers, backend.retry.budget)
    return drivers
