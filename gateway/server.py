"""serve(config): the gateway's own HTTP/1.1 server (gateway/http_server.py, `--http lean`, the default) or
uvicorn with httptools (`--http uvicorn`), on uvloop, TCP_NODELAY stated on every client socket.

uvloop and asyncio already set TCP_NODELAY on accepted sockets (measured here); the protocol below
makes that a property of the gateway rather than of a library default, because a response head and
its first chunk written separately would otherwise meet Nagle and delayed ACKs (~40 ms of TTFT).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket

import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.config import GatewayConfig
from gateway.logs import configure_logging


class NoDelayHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


def server_config(app, host: str, port: int, lifespan: str) -> uvicorn.Config:
    # No proxy-headers middleware (the gateway never uses the client address; it cost ~1% of the hot path)
    # and no `server: uvicorn` header (nothing to tell clients about what runs here).
    return uvicorn.Config(app, host=host, port=port, loop="uvloop", http=NoDelayHttpToolsProtocol,
                          lifespan=lifespan, access_log=False, log_level="warning", timeout_graceful_shutdown=10,
                          proxy_headers=False, server_header=False,
                          log_config=None)  # uvicorn's own lines go through gateway/logs.py like every other


DEFAULT_HTTP = "lean"   # `serve --http` (gateway/cli.py) says the same


def make_server(app, host: str, port: int, lifespan: bool, http: str):
    if http == "lean":
        from gateway.http_server import Server

        return Server(app, host, port, lifespan=lifespan)
    return QuietServer(server_config(app, host, port, "on" if lifespan else "off"))


class QuietServer(uvicorn.Server):
    """Signals are handled once for all listeners (below), not re-raised after a clean shutdown."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def serve(config: GatewayConfig, *, host: str, port: int, http: str = DEFAULT_HTTP) -> None:
    """One process, one app; a second listener when the admin API has its own. SIGTERM drains (gateway/shutdown.py),
    SIGINT stops at once."""
    from gateway.app import create_app
    from gateway.shutdown import Drain

    configure_logging(config.logging)
    app = create_app(config)
    servers = [make_server(app, host, port, True, http)]
    if config.admin_listen is not None:
        servers.append(make_server(app, config.admin_listen.host, config.admin_listen.port, False, http))
    uvloop.run(serve_all(servers, drain=Drain(app.state, app.data_plane, config.shutdown)))


def serve_sockets(config: GatewayConfig, sockets: list[socket.socket], http: str = DEFAULT_HTTP) -> None:
    """One worker of `serve --workers N` (gateway/workers.py), on sockets its parent bound: the main
    listener, then the admin listener when there is one."""
    from gateway.app import create_app
    from gateway.shutdown import Drain

    configure_logging(config.logging)
    app = create_app(config)
    servers = [make_server(app, "", 0, index == 0, http) for index in range(len(sockets))]
    uvloop.run(serve_all(servers, [[sock] for sock in sockets], Drain(app.state, app.data_plane, config.shutdown)))


def dump_tasks() -> None:
    """SIGUSR1: every task's stack into the log, to see what a stuck request waits on."""
    for task in asyncio.all_tasks():
        frames, coro = [], task.get_coro()
        while coro is not None:  # follow the await chain down to what it waits on
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                frames.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        logging.getLogger("gateway.tasks").warning("task %s:\n%s", task.get_name(), "\n".join(frames))


async def serve_all(servers: list, sockets: list[list[socket.socket]] | None = None,
                    drain=None) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    loop.add_signal_handler(signal.SIGINT, stop)
    loop.add_signal_handler(signal.SIGTERM, stop if drain is None else lambda: drain.begin(stop))
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    tasks = [asyncio.create_task(server.serve(sockets[index] if sockets else None))
             for index, server in enumerate(servers)]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    stop()  # when one listener stops (or fails to bind), the others follow
    await asyncio.gather(*tasks)
