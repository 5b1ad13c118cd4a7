"""LlamaServerLaunch -> argv, and ServerProcess: start, wait until /health answers 200, stop.

Flags follow reference/llamacpp.md: every adapter preloaded with `--lora a,b` (comma form, gotcha 6),
`--cache-ram 0` (the RAM prompt cache mixes adapters, gotcha 5), `--no-warmup` (start-up outliers, gotcha 8).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit

from backends.launchers.supervisor import RestartPolicy, ServerSpec, ServerState, Supervisor, die_with_parent


@dataclass(frozen=True)
class LlamaServerLaunch:
    binary: Path
    model: Path
    loras: Sequence[Path] = ()
    host: str = "127.0.0.1"
    port: int = 8081
    alias: str | None = None
    threads: int | None = None
    extra: Sequence[str] = field(default_factory=tuple)

    def argv(self) -> list[str]:
        argv = [str(self.binary), "-m", str(self.model), "--host", self.host, "--port", str(self.port),
                "--cache-ram", "0", "--no-warmup", "--metrics", "--jinja"]
        if self.loras:
            argv += ["--lora", ",".join(str(path) for path in self.loras)]
        if self.alias:
            argv += ["--alias", self.alias]
        if self.threads:
            argv += ["-t", str(self.threads)]
        return argv + list(self.extra)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class ServerProcess:
    """A child server process with a health URL; stop() is SIGTERM, then SIGKILL after a grace period. Like the
    supervisor's children it gets PR_SET_PDEATHSIG: a parent killed with -9 (an interrupted test run, the demo)
    leaves no server behind holding its port."""

    def __init__(self, argv: Sequence[str], health_url: str, *, log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.health_url = health_url
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        env = {**os.environ, **(self.env or {})}
        if self.log_path is None:
            self.process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True, preexec_fn=die_with_parent)
            return self
        with open(self.log_path, "ab") as output:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(self.argv, stdout=output, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, preexec_fn=die_with_parent)
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{Path(self.argv[0]).name} exited with code {self.process.returncode} "
                                   f"before it was ready{self._log_hint()}")
            try:
                with urllib.request.urlopen(self.health_url, timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{Path(self.argv[0]).name} was not ready within {timeout_s} s{self._log_hint()}")

    def _log_hint(self) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        tail = Path(self.log_path).read_text(errors="replace").splitlines()[-15:]
        return "; its log ends with:\n" + "\n".join(tail)

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass


class LlamaServerSupervisor(Supervisor):
    """One supervised llama-server for one replica URL (its port), started with the adapter list the lifecycle
    asks for and restarted, drained by the caller, to change it (llama-server loads adapters only at start)."""

    def __init__(self, *, binary: Path, model: Path, url: str, log_path: Path, ctx_size: int | None = None,
                 threads: int | None = None, parallel: int | None = None, args: Sequence[str] = (),
                 ready_timeout_s: float = 120.0, restart: RestartPolicy = RestartPolicy(),
                 name: str | None = None, alias: str | None = None, echo: bool = False,
                 log_max_bytes: int = 50 * 1024 * 1024, log_backups: int = 3,
                 on_state: Callable[[ServerState], None] | None = None) -> None:
        address = urlsplit(url)
        extra = list(args)
        if ctx_size:
            extra += ["--ctx-size", str(ctx_size)]
        if parallel:
            extra += ["-np", str(parallel)]
        self.launch = LlamaServerLaunch(binary, model, (), host=address.hostname or "127.0.0.1",
                                        port=address.port or 80, threads=threads, alias=alias, extra=tuple(extra))
        self.url = url
        spec = ServerSpec(name=name or f"llama-server {address.netloc}", argv=self._argv,
                          health_url=f"{self.launch.url}/health", log_path=log_path,
                          ready_timeout_s=ready_timeout_s, restart=restart, echo=echo,
                          log_max_bytes=log_max_bytes, log_backups=log_backups)
        super().__init__(spec, on_state)

    def _argv(self, loras: Sequence[str]) -> list[str]:
        return replace(self.launch, loras=tuple(Path(p) for p in loras)).argv()

    @property
    def loras(self) -> tuple[str, ...]:
        return self.files
