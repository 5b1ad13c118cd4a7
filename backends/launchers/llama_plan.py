"""LlamaPlan: what `kimi-gateway launch llama-server` runs for one llama.cpp backend: one server per configured
URL with the model (a split GGUF by its first shard), every registered GGUF adapter in one `--lora a,b` list
and `--cache-ram 0` (reference/llamacpp.md §4-5); or, with `router: true`, one router per URL serving a
presets file with a model entry per adapter (§6)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

from backends.launchers.llama_build import find_llama_server
from backends.launchers.llamacpp import LlamaServerSupervisor
from backends.launchers.sglang_plan import PlanError
from backends.launchers.supervisor import ServerSpec, Supervisor
from backends.llamacpp import LlamaCppConfig

SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def first_shard(model: str) -> str:
    """llama-server loads a split GGUF from its first shard (`…-00001-of-0000N.gguf`) and finds the rest."""
    match = SHARD.search(model)
    return SHARD.sub(f"-00001-of-{match.group(2)}.gguf", model) if match else model


def presets_ini(model: str, loras: Sequence[str], alias: str) -> str:
    """Router mode: a global section with the adapter-safe settings, then the base and one entry per adapter."""
    lines = ["[*]", "cache-ram = 0", "no-warmup = true", "", f"[{alias}]", f"model = {model}", ""]
    for lora in loras:
        lines += [f"[{alias}:{Path(lora).stem}]", f"model = {model}", f"lora = {lora}", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class LlamaPlan:
    backend: str
    binary: str
    model: str
    loras: list[str]
    servers: list[dict]          # per URL: {"url", "argv", "health_url"}
    presets: tuple[str, str] | None = None   # router mode: (path, contents)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "binary": self.binary, "model": self.model, "loras": self.loras,
                "servers": self.servers, "presets": {"path": self.presets[0], "ini": self.presets[1]}
                if self.presets else None}

    def text(self) -> str:
        import shlex

        lines = [f"llama-server launch plan for backend {self.backend!r}", f"model: {self.model}",
                 f"adapters (--lora): {', '.join(self.loras) or 'none'}", ""]
        if self.presets:
            lines += [f"presets file {self.presets[0]}:", *("  " + line for line in self.presets[1].splitlines()), ""]
        for server in self.servers:
            lines += [f"server {server['url']} (health {server['health_url']}):", f"  $ {shlex.join(server['argv'])}"]
        return "\n".join(lines) + "\n"

    def write_files(self) -> None:
        if self.presets:
            path = Path(self.presets[0])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.presets[1])


def plan_llama(backend: LlamaCppConfig, loras: Sequence[str], *, state_dir: str) -> LlamaPlan:
    launch = backend.launch
    if launch is None:
        raise PlanError([f"backends.{backend.name} has no `launch:` block"])
    binary = launch.binary or (str(find_llama_server()) if find_llama_server() else None)
    problems = [] if binary else [f"backends.{backend.name}.launch: no llama-server binary: set `binary`, put "
                                  "llama-server on PATH, or run `python -m backends.launchers.llama_build`"]
    model = first_shard(launch.model)
    problems += [f"backends.{backend.name}.launch.model: {model} is not a file"] if not Path(model).is_file() else []
    problems += [f"adapter file {lora} does not exist" for lora in loras if not Path(lora).is_file()]
    if problems:
        raise PlanError(problems)
    presets = None
    if launch.router:
        path = str(Path(state_dir).expanduser() / "llama-router" / f"{backend.name}.ini")
        presets = (path, presets_ini(model, loras, launch.alias or backend.name))
    servers = []
    for i, url in enumerate(backend.endpoints):
        supervisor = make_supervisor(backend, binary, model, url, Path(state_dir) / "logs", i)
        argv = supervisor.argv(loras)
        if presets:
            argv = router_argv(binary, url, presets[0], launch.args)
        servers.append({"url": url, "argv": argv, "health_url": supervisor.spec.health_url})
    return LlamaPlan(backend.name, binary, model, list(loras), servers, presets)


def router_argv(binary: str, url: str, presets: str, args: Sequence[str]) -> list[str]:
    address = urlsplit(url)
    return [binary, "--models-preset", presets, "--no-models-autoload", "--host", address.hostname or "127.0.0.1",
            "--port", str(address.port or 80), "--metrics", "--jinja", *args]


def make_supervisor(backend: LlamaCppConfig, binary: str, model: str, url: str, logs: Path, index: int,
                    echo: bool = False) -> LlamaServerSupervisor:
    launch = backend.launch
    assert launch is not None
    return LlamaServerSupervisor(binary=Path(binary), model=Path(model), url=url, ctx_size=launch.ctx_size,
                                 threads=launch.threads, parallel=launch.parallel, args=launch.args,
                                 ready_timeout_s=launch.ready_timeout_s, alias=launch.alias,
                                 restart=launch.restart.policy(), name=f"{backend.name}-{index}",
                                 log_path=logs / f"{backend.name}-{index}.log", echo=echo,
                                 log_max_bytes=launch.log.max_bytes, log_backups=launch.log.backups)


def llama_supervisors(plan: LlamaPlan, backend: LlamaCppConfig, logs: Path) -> list[Supervisor]:
    """One supervisor per URL, each started with the plan's argv (the adapter list is fixed here)."""
    launch = backend.launch
    assert launch is not None
    return [Supervisor(ServerSpec(name=f"{backend.name}-{i}", argv=lambda _files, argv=server["argv"]: argv,
                                  health_url=server["health_url"], log_path=logs / f"{backend.name}-{i}.log",
                                  ready_timeout_s=launch.ready_timeout_s, restart=launch.restart.policy(),
                                  log_max_bytes=launch.log.max_bytes, log_backups=launch.log.backups, echo=True))
            for i, server in enumerate(plan.servers)]
