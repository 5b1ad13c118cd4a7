"""run_tool(): one converter run as a subprocess of the gateway (never inside its process): a timeout that
kills the whole process group, the full output in a log file, the last lines kept for the error message,
and each line passed to a progress callback."""
from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

TAIL_LINES = 20


@dataclass(frozen=True)
class ToolResult:
    returncode: int | None        # None: killed at the timeout
    tail: tuple[str, ...]         # the last output lines (stdout and stderr together)
    seconds: float
    log_path: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def last_lines(self) -> str:
        return "\n".join(self.tail)


async def run_tool(argv: Sequence[str], *, timeout_s: float, log_path: Path, env: Mapping[str, str] | None = None,
                   on_line: Callable[[str], None] | None = None) -> ToolResult:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})}, start_new_session=True)  # its own group: a timeout kills its children too

    async def pump() -> None:
        assert process.stdout is not None
        with log_path.open("w", encoding="utf-8") as log:
            async for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip()
                log.write(line + "\n")
                tail.append(line)
                if on_line is not None:
                    on_line(line)

    returncode: int | None
    try:
        async with asyncio.timeout(timeout_s):
            await pump()
            returncode = await process.wait()
    except TimeoutError:
        returncode = None
        _kill(process)
        await process.wait()
        tail.append(f"(killed after {timeout_s:g} s)")
    except BaseException:  # cancelled: the tool must not outlive the operation
        _kill(process)
        await process.wait()
        raise
    return ToolResult(returncode, tuple(tail), time.monotonic() - started, log_path)


def _kill(process: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
