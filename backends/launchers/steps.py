"""run_steps: the conversion steps of a launch plan, each only when its output is missing. A step writes into
`<output>.partial` and is renamed into place when its command succeeds, so an output that exists is complete;
a run that was interrupted leaves the `.partial`, which the next run removes and redoes (the plan resumes at the
first step whose output is missing)."""
from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from backends.launchers.sglang_plan import Step


class StepError(RuntimeError):
    """A conversion command failed; the message names the step, its exit code and its last output lines."""


async def run_step(step: Step, log_path: Path, *, echo: bool = True) -> None:
    if os.path.lexists(step.partial):
        await asyncio.to_thread(shutil.rmtree, step.partial, True)
    Path(step.output).parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    process = await asyncio.create_subprocess_exec(*step.command, stdin=asyncio.subprocess.DEVNULL,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    with open(log_path, "a", encoding="utf-8") as log:
        while line := await process.stdout.readline():
            text = f"[{step.name}] {line.decode(errors='replace').rstrip()}"
            log.write(text + "\n")
            if echo:
                print(text, file=sys.stderr, flush=True)
            tail = (tail + [text])[-15:]
    code = await process.wait()
    if code != 0:
        raise StepError(f"step {step.name} failed with exit code {code}: {' '.join(step.command)}\n"
                        + "\n".join(tail))
    if not os.path.isdir(step.partial):
        raise StepError(f"step {step.name} exited 0 but wrote nothing to {step.partial}")
    os.replace(step.partial, step.output)


async def run_steps(steps: Sequence[Step], log_path: Path, *, echo: bool = True) -> list[str]:
    """Runs the steps not yet done, in order; the names of those that ran."""
    ran = []
    for step in steps:
        if os.path.isdir(step.output):
            continue
        await run_step(step, log_path, echo=echo)
        ran.append(step.name)
    return ran
