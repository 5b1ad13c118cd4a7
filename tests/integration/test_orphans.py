"""An interrupted test run leaves no server behind: the processes tests start (tests/integration/conftest.py's
`start_process`, backends/launchers/llamacpp.py ServerProcess) get PR_SET_PDEATHSIG, so when their parent is
killed with -9 (pytest interrupted hard, a CI job cancelled) the SGLang and Moonshot emulators get SIGTERM and
exit instead of keeping their ports."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.integration.conftest import ROOT

# A pytest-like parent: starts both emulators the way conftest does, says their pids, then waits to be killed.
PARENT = textwrap.dedent("""
    import sys, time
    from backends.launchers.llamacpp import ServerProcess, free_port
    pids = []
    for module, extra in (("tests.emulators.sglang", ["--served-model-name", "kimi"]),
                          ("tests.emulators.moonshot", ["--api-key", "orphan-test-key"])):
        port = free_port()
        health = "/health" if module.endswith("sglang") else "/_emulator/requests"
        argv = [sys.executable, "-m", module, "--port", str(port), *extra]
        server = ServerProcess(argv, f"http://127.0.0.1:{port}{health}", env={"PYTHONPATH": sys.argv[1]})
        pids.append(server.start().wait_ready(60).process.pid)
    print(" ".join(map(str, pids)), flush=True)
    time.sleep(600)
""")


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for a reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_emulators_exit_when_their_parent_is_killed_with_sigkill():
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(ROOT)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    pids: list[int] = []
    try:
        line = parent.stdout.readline()
        pids = [int(pid) for pid in line.split()]
        assert len(pids) == 2, f"the parent did not start both emulators: {line!r}"
        assert all(running(pid) for pid in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30   # a bound, not a timing claim: SIGTERM'd uvicorn exits in well under it
        while any(running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in pids if running(pid)]
        assert not left, f"emulators still running after their parent was killed: {left}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
        for pid in pids:
            if running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
