"""A TCP proxy a test controls, to take a service (PostgreSQL, Redis) away from a gateway and give it back
without touching the service other users share: `cut()` closes every connection and refuses new ones,
`restore()` listens again on the same port. It runs as its own process (`python -m tests.tcp_proxy`), so
that the test's threads never slow the traffic it carries; SIGUSR1 cuts, SIGUSR2 restores, and it answers
each on stdout."""
from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

from backends.launchers.supervisor import die_with_parent

ROOT = Path(__file__).parents[1]


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.tcp_proxy", "--port", str(self.port), "--target",
             f"{target_host}:{target_port}"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
            preexec_fn=die_with_parent)   # an interrupted test run leaves no proxy behind
        self._expect("listening")

    def _expect(self, word: str) -> None:
        line = self._process.stdout.readline().strip()
        assert line == word, f"tcp proxy said {line!r}, expected {word!r}"

    def cut(self) -> None:
        self._process.send_signal(signal.SIGUSR1)
        self._expect("cut")

    def restore(self) -> None:
        self._process.send_signal(signal.SIGUSR2)
        self._expect("listening")

    def close(self) -> None:
        self._process.terminate()
        self._process.wait(10)
        self._process.stdout.close()


class Proxy:
    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def listen(self) -> None:
        if self.server is None:
            self.server = await asyncio.start_server(self.serve, "127.0.0.1", self.port, reuse_address=True)
        print("listening", flush=True)

    def cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            writer.transport.abort()   # a reset, as when the service's host goes away
        self.writers.clear()
        print("cut", flush=True)

    async def serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self.writers.update((client_writer, upstream_writer))

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.transport.abort()
                self.writers.discard(writer)
        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="host:port")
    args = parser.parse_args()
    host, port = args.target.rsplit(":", 1)
    proxy = Proxy(args.port, (host, int(port)))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, proxy.cut)
    loop.add_signal_handler(signal.SIGUSR2, lambda: loop.create_task(proxy.listen()))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await proxy.listen()
    await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
