"""LlamaServerSupervisor: one llama-server the gateway runs for one replica URL, started with the adapter list
the lifecycle asks for, restarted to change it (drained by the caller), restarted if it dies, stopped with the
gateway. Async throughout: it never blocks the event loop (no time.sleep, no blocking waits)."""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

import httpx

from backends.launchers.llamacpp import LlamaServerLaunch

log = logging.getLogger(__name__)
READY_POLL_S = 0.05
STOP_GRACE_S = 10.0
RESPAWN_DELAY_S = 1.0
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the gateway dies, even by SIGKILL (Linux), so that a restarted
    gateway never finds its port taken by an orphan."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class LaunchError(RuntimeError):
    """The server did not come up; the message ends with its log's last lines."""


class LlamaServerSupervisor:
    def __init__(self, *, binary: Path, model: Path, url: str, log_path: Path, ctx_size: int | None = None,
                 threads: int | None = None, parallel: int | None = None, args: Sequence[str] = (),
                 ready_timeout_s: float = 120.0) -> None:
        address = urlsplit(url)
        extra = list(args)
        if ctx_size:
            extra += ["-c", str(ctx_size)]
        if parallel:
            extra += ["-np", str(parallel)]
        self._launch = LlamaServerLaunch(binary, model, (), host=address.hostname or "127.0.0.1",
                                         port=address.port or 80, threads=threads, extra=tuple(extra))
        self.url = url
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.loras: tuple[str, ...] = ()
        self.restarts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task | None = None
        self._stopping = False

    def argv(self, loras: Sequence[str]) -> list[str]:
        return replace(self._launch, loras=tuple(Path(p) for p in loras)).argv()

    async def start(self, loras: Sequence[str]) -> None:
        self.loras = tuple(loras)
        self._stopping = False
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as output:  # the child keeps its own descriptor
            self._process = await asyncio.create_subprocess_exec(
                *self.argv(self.loras), stdin=asyncio.subprocess.DEVNULL, stdout=output,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        await self._wait_ready()
        self._watch = asyncio.create_task(self._respawn_on_exit(self._process), name=f"supervise {self.url}")

    async def restart(self, loras: Sequence[str]) -> None:
        """Stop, then start with `loras`; the caller has drained the replica."""
        await self.stop()
        self.restarts += 1
        await self.start(loras)

    async def stop(self) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        except ProcessLookupError:
            pass

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while loop.time() < deadline:
                if self._process is None or self._process.returncode is not None:
                    code = self._process.returncode if self._process else None
                    raise LaunchError(f"llama-server for {self.url} exited with code {code} before it was ready"
                                      f"{self._log_tail()}")
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(READY_POLL_S)
        await self.stop()
        raise LaunchError(f"llama-server for {self.url} was not ready within {self.ready_timeout_s} s{self._log_tail()}")

    async def _respawn_on_exit(self, process: asyncio.subprocess.Process) -> None:
        """A server that dies on its own is started again with the same list (the drivers see the restart)."""
        code = await process.wait()
        while not self._stopping:
            log.error("llama-server for %s exited with code %s; restarting it", self.url, code)
            await asyncio.sleep(RESPAWN_DELAY_S)
            try:
                self._watch = None
                await self.start(self.loras)
                return
            except LaunchError as exc:
                log.error("%s", exc)

    def _log_tail(self) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
        except OSError:
            return ""
        return "; its log ends with:\n" + "\n".join(tail)
