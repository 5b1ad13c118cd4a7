"""Supervisor: one backend server process (llama-server or SGLang) that the gateway or `kimi-gateway launch`
runs. It starts the server and waits for its health URL within a deadline; prefixes and rotates its output;
restarts it after a crash with exponential backoff and gives up at a crash-loop limit; stops it with SIGTERM
(so that it drains) and SIGKILL after a grace period; and reports each state change to `on_state`, so that
traffic can go around a restart. Async throughout: no time.sleep, no blocking waits on the event loop.

`start(files)`, `restart(files)` and `stop()` are what the adapter lifecycle's drained restart calls;
`files` are the adapter files the argv is built with (llama-server's `--lora` list)."""
from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import logging.handlers
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Callable, Mapping, Sequence

import httpx

log = logging.getLogger(__name__)
READY_POLL_S = 0.05
LINE_LIMIT = 1024 * 1024       # longer output lines are logged in pieces
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, even by SIGKILL (Linux), so that a restarted
    gateway never finds its port taken by an orphan."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class LaunchError(RuntimeError):
    """The server did not come up; the message ends with its log's last lines."""


class ServerState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"    # crashed; waiting out the backoff or coming back up
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"            # the crash-loop limit was reached: no more restarts


@dataclass(frozen=True)
class RestartPolicy:
    """After the n-th crash within `window_s`, wait min(backoff_max_s, backoff_initial_s * 2**(n-1)); the
    crash that makes more than `max_crashes` within the window is the last (a crash loop)."""
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    max_crashes: int = 5
    window_s: float = 300.0

    def delay_s(self, crashes: int) -> float:
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, crashes - 1))


@dataclass(frozen=True)
class ServerSpec:
    name: str                                       # the log prefix and the name in messages
    argv: Callable[[Sequence[str]], list[str]]      # adapter files -> the command line
    health_url: str
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 120.0
    stop_grace_s: float = 10.0                      # SIGTERM -> SIGKILL: the server's drain time
    restart: RestartPolicy = RestartPolicy()
    log_max_bytes: int = 50 * 1024 * 1024
    log_backups: int = 3
    echo: bool = False                              # also write the prefixed lines to stderr (`launch`)


def server_logger(spec: ServerSpec) -> logging.Logger:
    """A logger of its own (not in the logging tree, so nothing else's handlers see the server's lines):
    `<time> [<name>] <line>` into a size-rotated file, and to stderr when `echo`."""
    logger = logging.Logger(f"server.{spec.name}")
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(f"%(asctime)s [{spec.name}] %(message)s")
    handlers: list[logging.Handler] = [logging.handlers.RotatingFileHandler(
        spec.log_path, maxBytes=spec.log_max_bytes, backupCount=spec.log_backups)]
    if spec.echo:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


class Supervisor:
    def __init__(self, spec: ServerSpec, on_state: Callable[[ServerState], None] | None = None) -> None:
        self.spec = spec
        self.on_state = on_state
        self.state = ServerState.STOPPED
        self.files: tuple[str, ...] = ()
        self.restarts = 0                          # every start after the first: crashes and drained restarts
        self.crashes: collections.deque[float] = collections.deque()
        self._process: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task | None = None
        self._pump: asyncio.Task | None = None
        self._stopping = False
        self._logger: logging.Logger | None = None
        self._done: asyncio.Event | None = None   # set when FAILED or STOPPED

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def argv(self, files: Sequence[str] = ()) -> list[str]:
        return self.spec.argv(tuple(files))

    async def start(self, files: Sequence[str] = ()) -> None:
        """Start and wait for health; LaunchError if it exits or is not healthy within the deadline."""
        self.files = tuple(files)
        self._stopping = False
        self._done = asyncio.Event()
        self._set(ServerState.STARTING)
        try:
            await self._spawn_ready()
        except BaseException:
            self._close_log()
            raise
        self._set(ServerState.READY)
        self._watch = asyncio.create_task(self._watch_exits(), name=f"supervise {self.spec.name}")

    async def restart(self, files: Sequence[str]) -> None:
        """Stop, then start with `files`; the caller has drained the server."""
        await self.stop()
        self.restarts += 1
        await self.start(files)

    async def stop(self) -> None:
        """SIGTERM to the server's process group (it drains), SIGKILL after `stop_grace_s`."""
        self._stopping = True
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        self._watch = None
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            self._set(ServerState.STOPPING)
            await self._terminate(process)
        await self._end_pump()
        self._close_log()
        if self.state != ServerState.FAILED:
            self._set(ServerState.STOPPED)
        if self._done is not None:
            self._done.set()

    async def wait(self) -> ServerState:
        """Until the server is stopped or has failed for good; the final state."""
        if self._done is not None:
            await self._done.wait()
        return self.state

    # --- internals --------------------------------------------------------------------------------------

    def _set(self, state: ServerState) -> None:
        if state == self.state:
            return
        self.state = state
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:  # a listener's bug must not stop supervision
                log.exception("%s: state listener failed", self.spec.name)

    async def _spawn_ready(self) -> None:
        await self._spawn()
        try:
            await self._wait_ready()
        except BaseException:
            process, self._process = self._process, None
            if process is not None and process.returncode is None:
                await self._terminate(process)
            await self._end_pump()
            raise

    async def _spawn(self) -> None:
        if self._logger is None:
            self._logger = server_logger(self.spec)
        argv = self.argv(self.files)
        self._logger.info("supervisor: starting %s", " ".join(argv))
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env={**os.environ, **self.spec.env}, limit=LINE_LIMIT,
                start_new_session=True, preexec_fn=die_with_parent)
        except OSError as exc:
            raise LaunchError(f"{self.spec.name}: cannot run {argv[0]}: {exc}") from exc
        self._process = process
        self._pump = asyncio.create_task(self._copy_output(process, self._logger), name=f"log {self.spec.name}")

    @staticmethod
    async def _copy_output(process: asyncio.subprocess.Process, logger: logging.Logger) -> None:
        assert process.stdout is not None
        while True:   # one short append per line: cheap, and never on the request path
            try:
                line = await process.stdout.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:   # the end, without a last newline
                line = exc.partial
            except asyncio.LimitOverrunError as exc:     # a line longer than the buffer: log it in pieces
                line = await process.stdout.read(max(exc.consumed, 1))
            if not line:
                return
            logger.info("%s", line.decode(errors="replace").rstrip("\n"))

    def _close_log(self) -> None:
        logger, self._logger = self._logger, None
        for handler in logger.handlers if logger is not None else ():
            handler.close()

    async def _end_pump(self) -> None:
        pump, self._pump = self._pump, None
        if pump is not None:
            try:
                await asyncio.wait_for(pump, 2.0)    # the rest of a dead server's output (its last words)
            except (TimeoutError, asyncio.CancelledError):
                pump.cancel()

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            await asyncio.wait_for(process.wait(), self.spec.stop_grace_s)
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        except ProcessLookupError:
            await process.wait()

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.ready_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while loop.time() < deadline:
                process = self._process
                if process is None or process.returncode is not None:
                    code = process.returncode if process is not None else None
                    await self._end_pump()
                    raise LaunchError(f"{self.spec.name} exited with code {code} before it was ready"
                                      f"{self.log_tail()}")
                try:
                    if (await client.get(self.spec.health_url)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(READY_POLL_S)
        raise LaunchError(f"{self.spec.name} was not ready within {self.spec.ready_timeout_s} s "
                          f"({self.spec.health_url}){self.log_tail()}")

    async def _watch_exits(self) -> None:
        """A server that dies on its own is started again with the same files, after a backoff that doubles
        with each crash in the window; past the limit it stays down (FAILED) and wait() returns."""
        while not self._stopping:
            process = self._process
            if process is None:
                return
            code = await process.wait()
            if self._stopping:
                return
            await self._end_pump()
            while not self._stopping:
                delay = self._count_crash()
                if delay is None:
                    log.error("%s: crash loop: %d crashes within %.0f s; not restarting it again",
                              self.spec.name, len(self.crashes), self.spec.restart.window_s)
                    self._process = None
                    self._close_log()
                    self._set(ServerState.FAILED)
                    assert self._done is not None
                    self._done.set()
                    return
                self._set(ServerState.RESTARTING)
                log.error("%s exited with code %s; restarting it in %.1f s (crash %d of at most %d in %.0f s)",
                          self.spec.name, code, delay, len(self.crashes), self.spec.restart.max_crashes,
                          self.spec.restart.window_s)
                await asyncio.sleep(delay)
                try:
                    await self._spawn_ready()
                except LaunchError as exc:
                    log.error("%s", exc)
                    code = "(not ready)"
                    continue
                self.restarts += 1
                self._set(ServerState.READY)
                break

    def _count_crash(self) -> float | None:
        """The backoff before the next start, or None when this crash ends the tries (a crash loop)."""
        policy = self.spec.restart
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > policy.window_s:
            self.crashes.popleft()
        if len(self.crashes) > policy.max_crashes:
            return None
        return policy.delay_s(len(self.crashes))

    def log_tail(self, lines: int = 15) -> str:
        try:
            tail = self.spec.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "; its log ends with:\n" + "\n".join(tail)
