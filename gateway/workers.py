"""`serve --workers N`: N gateway processes on the same listening sockets, with prometheus-client's
multiprocess mode so that /metrics, whichever worker answers it, adds up all of them (docs/observability.md).

The parent binds the sockets, makes a fresh metrics directory (PROMETHEUS_MULTIPROC_DIR, set before any worker
imports prometheus_client), starts worker 0 and waits until it serves (so that the adapter store is seeded
once), then the others; it restarts a worker that dies and, on SIGTERM/SIGINT, stops them all (each drains).
Each worker is a whole gateway (its own health loop and adapter lifecycle over the shared store), so backends
with a `launch:` block (servers the gateway supervises) need one worker: N would start N servers.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
import urllib.request

from gateway.config import ConfigError, GatewayConfig

log = logging.getLogger(__name__)
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def check_workers(config: GatewayConfig, workers: int) -> None:
    supervised = [b.name for b in config.backends if getattr(b, "launch", None) is not None]
    if workers > 1 and supervised:
        raise ConfigError(f"--workers {workers}: backends {supervised} have `launch:` (the gateway starts those "
                          "servers itself, and N workers would start N of each); run them with `kimi-gateway launch` "
                          "and drop `launch:`, or serve with one worker")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def worker_main(config_path: str, sockets: list[socket.socket], http: str) -> None:
    """One worker: the config read again (a spawned process starts clean), then the same server as one worker."""
    from gateway.config import load_config
    from gateway.server import serve_sockets

    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent turns Ctrl-C into one SIGTERM per worker
    serve_sockets(load_config(config_path), sockets, http)


def wait_serving(host: str, port: int, process, timeout_s: float = 120.0) -> None:
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/healthz"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.is_alive():
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise ConfigError(f"worker 0 did not start serving on {host}:{port} within {timeout_s:.0f} s (see its log)")


def serve_workers(config_path: str, config: GatewayConfig, *, host: str, port: int, workers: int,
                  http: str) -> None:
    from gateway.logs import configure_logging

    check_workers(config, workers)
    configure_logging(config.logging)
    given = os.environ.get(METRICS_DIR)
    metrics_dir = given or tempfile.mkdtemp(prefix="kimi-gateway-metrics-")
    for name in os.listdir(metrics_dir):   # a previous run's counters must not add to this one's
        if name.endswith(".db"):
            os.unlink(os.path.join(metrics_dir, name))
    os.environ[METRICS_DIR] = metrics_dir
    sockets = [bind(host, port)]
    if config.admin_listen is not None:
        sockets.append(bind(config.admin_listen.host, config.admin_listen.port))
    context = multiprocessing.get_context("spawn")
    stopping = False

    def start() -> multiprocessing.Process:
        process = context.Process(target=worker_main, args=(config_path, sockets, http), name="kimi-gateway-worker")
        process.start()
        return process

    def stop(*_) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    processes = [start()]
    wait_serving(host, port, processes[0])
    processes += [start() for _ in range(workers - 1)]
    log.info("serving on %s:%d with %d workers (metrics in %s)", host, port, workers, metrics_dir)
    try:
        supervise(processes, start, lambda: stopping)
    finally:
        stop()
        for process in processes:
            process.join(timeout=30)
        if not given:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def supervise(processes: list, start, stopping) -> None:
    from prometheus_client import multiprocess

    while not stopping():
        for index, process in enumerate(processes):
            process.join(timeout=0.5 / len(processes))
            if process.exitcode is not None and not stopping():
                multiprocess.mark_process_dead(process.pid)   # its live gauges (in flight) leave the sum
                log.error("worker %d exited with %s; starting another", process.pid, process.exitcode)
                processes[index] = start()
    for process in processes:
        process.join(timeout=30)
        if process.exitcode is not None:
            multiprocess.mark_process_dead(process.pid)
