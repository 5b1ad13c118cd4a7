"""`kimi-gateway launch sglang-kt` supervising a stand-in SGLang server (tests/emulators/sglang_launch_server.py,
selected with `server_command`): health-gated start, a kill -9 answered by a restart within the backoff,
SIGTERM forwarded so that the server drains, and a crash loop that stops at the limit."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from backends.launchers.llamacpp import free_port
from tests.integration.conftest import ROOT

STANDIN = [sys.executable, "-m", "tests.emulators.sglang_launch_server"]


def write_config(tmp_path: Path, port: int, **launch) -> Path:
    model = tmp_path / "kimi-k2.5"
    model.mkdir(exist_ok=True)
    config = {
        "state_dir": str(tmp_path / "state"),
        "backends": [{"name": "kt", "kind": "sglang", "url": f"http://127.0.0.1:{port}", "served_model_name": "kimi",
                      "launch": {"python": sys.executable, "server_command": STANDIN, "model_path": str(model),
                                 "kt_method": "RAWINT4", "kt_cpuinfer": 4, "ready_timeout_s": 60,
                                 "stop_grace_s": 10, "restart": {"backoff_initial_s": 0.5, "backoff_max_s": 2,
                                                                 "max_crashes": 3, "window_s": 60}, **launch}}],
        "routes": [{"name": "kimi-k2.5", "targets": ["kt"]}],
    }
    path = tmp_path / "launch.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_launch(config: Path, log: Path) -> subprocess.Popen:
    # --skip-preflight: this CI host has no AVX512 and no sglang; the stand-in needs neither
    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "gateway.cli", "launch", "sglang-kt", "--config",
                                 str(config), "--backend", "kt", "--skip-preflight"], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                start_new_session=True)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_healthy(url: str, launch: subprocess.Popen, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        assert launch.poll() is None, f"launch exited with {launch.returncode}"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{url} was not healthy within {timeout_s} s")


def wait_supervised(out: Path, launch: subprocess.Popen, timeout_s: float = 60) -> None:
    """Until the launcher itself has seen the server healthy (before that, a crash fails the launch)."""
    deadline = time.monotonic() + timeout_s
    while "is ready (" not in out.read_text():
        assert launch.poll() is None, f"launch exited with {launch.returncode}: {out.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "the launcher never reported the server ready"
        time.sleep(0.05)


@pytest.fixture
def stop_later():
    started: list[subprocess.Popen] = []
    yield started.append
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_launch_gates_on_health_restarts_after_kill_9_and_drains_on_sigterm(tmp_path, stop_later):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    launch = start_launch(write_config(tmp_path, port), tmp_path / "launch.out")
    stop_later(launch)
    wait_supervised(tmp_path / "launch.out", launch)
    reply = httpx.post(f"{url}/v1/chat/completions", json={"model": "kimi", "max_tokens": 4,
                                                            "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert reply.status_code == 200 and reply.json()["choices"]
    [server] = children(launch.pid)
    os.kill(server, signal.SIGKILL)
    back_in = wait_healthy(url, launch, 30)
    [again] = children(launch.pid)
    assert again != server
    log = (tmp_path / "state" / "logs" / "kt.log").read_text()
    assert log.count("supervisor: starting") == 2 and "[kt] stand-in sglang.launch_server" in log
    print(f"\nSGLang stand-in back {back_in:.2f} s after kill -9 (backoff 0.5 s)", file=sys.stderr)
    os.kill(launch.pid, signal.SIGTERM)          # forwarded: the server drains, then both exit
    assert launch.wait(timeout=30) == 0
    assert not Path(f"/proc/{again}").exists() or "zombie" in Path(f"/proc/{again}/status").read_text()


def test_a_crash_loop_stops_at_the_limit(tmp_path, stop_later):
    port = free_port()
    config = write_config(tmp_path, port, env={"SGLANG_STANDIN_EXIT": "1"})
    launch = start_launch(config, tmp_path / "launch.out")
    stop_later(launch)
    assert launch.wait(timeout=60) == 1      # the first start must be healthy: it is not, so nothing is up
    out = (tmp_path / "launch.out").read_text()
    assert "kt exited with code 1 before it was ready" in out


def test_a_server_that_starts_then_keeps_crashing_stops_at_the_limit(tmp_path, stop_later):
    """Healthy at first, then every restart crashes: 3 restarts (max_crashes) with growing backoff, then exit 3."""
    port = free_port()
    flag = tmp_path / "crash-from-now-on"
    config = write_config(tmp_path, port, server_command=[
        "/bin/sh", "-c", f'if [ -e {flag} ]; then echo crashing; exit 7; fi; exec "$0" "$@"', *STANDIN])
    launch = start_launch(config, tmp_path / "launch.out")
    stop_later(launch)
    wait_supervised(tmp_path / "launch.out", launch)
    flag.touch()
    [server] = children(launch.pid)
    os.kill(server, signal.SIGKILL)
    assert launch.wait(timeout=60) == 3
    out = (tmp_path / "launch.out").read_text()
    assert "restarting it in 0.5 s (crash 1 of at most 3" in out
    assert "restarting it in 1.0 s (crash 2 of at most 3" in out
    assert "restarting it in 2.0 s (crash 3 of at most 3" in out
    assert "crash loop: 4 crashes within 60 s; not restarting it again" in out
    assert "kt kept crashing; gave up after 3 restarts" in out


def test_sigterm_during_a_long_start_stops_the_server_at_once(tmp_path, stop_later):
    """SGLang loads weights for a long time; a SIGTERM then must not wait for the health deadline."""
    port = free_port()
    slow = [sys.executable, "-c", "import time; print('loading weights', flush=True); time.sleep(600)"]
    launch = start_launch(write_config(tmp_path, port, server_command=slow), tmp_path / "launch.out")
    stop_later(launch)
    log = tmp_path / "state" / "logs" / "kt.log"
    deadline = time.monotonic() + 30
    while not (log.exists() and "[kt] loading weights\n" in log.read_text()):   # its output, not its argv
        assert time.monotonic() < deadline and launch.poll() is None
        time.sleep(0.05)
    [server] = children(launch.pid)
    os.kill(launch.pid, signal.SIGTERM)
    assert launch.wait(timeout=20) == 0
    assert not Path(f"/proc/{server}").exists() or "zombie" in Path(f"/proc/{server}/status").read_text()
