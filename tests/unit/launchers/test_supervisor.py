"""The one supervisor, with a small real child process (a Python HTTP server with /health): health-gated start,
prefixed and rotated logs, restart after a crash with doubling backoff, the crash-loop limit, state reports,
and a stop that is never stuck behind a restart."""
import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from backends.launchers.llamacpp import free_port
from backends.launchers.supervisor import LaunchError, RestartPolicy, ServerSpec, ServerState, Supervisor

CHILD = r"""
import http.server, os, sys, time
port, crash_file = int(sys.argv[1]), sys.argv[2]
print("child up", os.getpid(), flush=True)
if os.path.exists(crash_file):
    print("crashing on start", flush=True); sys.exit(5)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *args): pass
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def spec(tmp_path: Path, *, crash_file: Path | None = None, argv=None, **overrides) -> ServerSpec:
    port = free_port()
    crash_file = crash_file or tmp_path / "crash"
    command = argv or [sys.executable, "-c", CHILD, str(port), str(crash_file)]
    options = dict(name="child", argv=lambda files: [*command, *files], health_url=f"http://127.0.0.1:{port}/health",
                   log_path=tmp_path / "logs" / "child.log", ready_timeout_s=20, stop_grace_s=5,
                   restart=RestartPolicy(backoff_initial_s=0.2, backoff_max_s=0.8, max_crashes=3, window_s=60))
    return ServerSpec(**{**options, **overrides})


async def wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_start_is_health_gated_and_the_log_is_prefixed(tmp_path):
    states = []
    supervisor = Supervisor(spec(tmp_path), on_state=states.append)
    await supervisor.start()
    try:
        assert supervisor.state == ServerState.READY and states == [ServerState.STARTING, ServerState.READY]
        log = tmp_path / "logs" / "child.log"
        await wait_for(lambda: re.search(r"^\S+ \S+ \[child\] child up \d+$", log.read_text(), re.M))
    finally:
        await supervisor.stop()
    assert states[-2:] == [ServerState.STOPPING, ServerState.STOPPED]


async def test_a_server_that_never_gets_healthy_fails_at_the_deadline(tmp_path):
    silent = [sys.executable, "-c", "import time; print('no port', flush=True); time.sleep(60)"]
    supervisor = Supervisor(spec(tmp_path, argv=silent, ready_timeout_s=0.5))
    with pytest.raises(LaunchError, match=r"child was not ready within 0.5 s .*its log ends with:\n.*no port"):
        await supervisor.start()
    assert supervisor.pid is None


async def test_a_crash_is_restarted_after_a_doubling_backoff_then_the_loop_stops(tmp_path):
    states = []
    supervisor = Supervisor(spec(tmp_path), on_state=states.append)
    await supervisor.start()
    first = supervisor.pid
    (tmp_path / "crash").touch()               # from now on every start crashes
    started = time.monotonic()
    os.kill(first, signal.SIGKILL)
    assert await asyncio.wait_for(supervisor.wait(), 30) == ServerState.FAILED
    took = time.monotonic() - started
    assert took >= 0.2 + 0.4 + 0.8              # the three backoffs before the fourth crash ends it
    assert len(supervisor.crashes) == 4 and supervisor.restarts == 0
    assert states.count(ServerState.RESTARTING) == 1 and states[-1] == ServerState.FAILED
    log = (tmp_path / "logs" / "child.log").read_text()
    assert len(re.findall(r"\[child\] crashing on start$", log, re.M)) == 3
    await supervisor.stop()                    # a stop after the failure is harmless
    assert supervisor.state == ServerState.FAILED


async def test_a_crash_then_a_healthy_restart(tmp_path):
    states = []
    supervisor = Supervisor(spec(tmp_path), on_state=states.append)
    await supervisor.start()
    first = supervisor.pid
    os.kill(first, signal.SIGKILL)
    await wait_for(lambda: supervisor.state == ServerState.READY and supervisor.pid != first)
    assert supervisor.restarts == 1 and states[-2:] == [ServerState.RESTARTING, ServerState.READY]
    await supervisor.stop()


async def test_stop_during_the_backoff_does_not_wait_for_it(tmp_path):
    slow = RestartPolicy(backoff_initial_s=30, backoff_max_s=30, max_crashes=3, window_s=60)
    supervisor = Supervisor(spec(tmp_path, restart=slow))
    await supervisor.start()
    os.kill(supervisor.pid, signal.SIGKILL)
    await wait_for(lambda: supervisor.state == ServerState.RESTARTING)
    started = time.monotonic()
    await supervisor.stop()
    assert time.monotonic() - started < 5 and supervisor.state == ServerState.STOPPED


async def test_restart_with_new_files_changes_the_argv(tmp_path):
    seen = []
    base = spec(tmp_path)
    supervisor = Supervisor(ServerSpec(**{**base.__dict__, "argv": lambda files: seen.append(files) or base.argv(())}))
    await supervisor.start(["a.gguf"])
    await supervisor.restart(["a.gguf", "b.gguf"])
    await supervisor.stop()
    assert seen == [("a.gguf",), ("a.gguf", "b.gguf")] and supervisor.restarts == 1


async def test_the_log_rotates(tmp_path):
    chatty = [sys.executable, "-c", "import sys\nfor i in range(3000): print('x' * 100, flush=False)\n"
              "import time; time.sleep(60)"]
    supervisor = Supervisor(spec(tmp_path, argv=chatty, ready_timeout_s=1.5, log_max_bytes=50_000, log_backups=2))
    with pytest.raises(LaunchError):
        await supervisor.start()
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == ["child.log", "child.log.1", "child.log.2"]
    assert all(p.stat().st_size <= 50_000 + 200 for p in (tmp_path / "logs").iterdir())


def test_backoff_doubles_up_to_the_maximum():
    policy = RestartPolicy(backoff_initial_s=1, backoff_max_s=10, max_crashes=9, window_s=60)
    assert [policy.delay_s(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


async def test_a_line_longer_than_the_buffer_is_logged_in_pieces(tmp_path):
    long_line = [sys.executable, "-c", "import sys, time; sys.stdout.write('y' * 3_000_000 + '\\nafter\\n'); "
                 "sys.stdout.flush(); time.sleep(60)"]
    supervisor = Supervisor(spec(tmp_path, argv=long_line, ready_timeout_s=2))
    with pytest.raises(LaunchError, match="after"):
        await supervisor.start()
    assert (tmp_path / "logs" / "child.log").read_text().count("y") >= 3_000_000
