"""The HTTP server under the app (issue 22): what uvicorn, granian and the gateway's own server (gateway/http_server.py)
cost per request, on a trivial ASGI app and on the gateway itself; and how the gateway scales (issue 22 item 4).

    bench/servers-run cost      [--rounds 3] [--duration 8] [--servers lean,uvicorn,granian] [--no-callgrind]
    bench/servers-run scaling   [--rounds 3] [--duration 8]
    python bench/servers.py serve --server lean --app trivial --port 8000     # one server (what the runs start)

`cost`: for each app (trivial: reads the body, answers a fixed 333-byte JSON; gateway: `kimi-gateway serve` on
bench/harness.py's config, nginx upstream), each server option runs pinned to cpu1 under `wrk -t1 -c32` on cpu0,
interleaved with Envoy (same nginx upstream) round by round: req/s, and CPU µs per request from /proc (utime +
stime of the server's process tree). Then each runs once under callgrind: instructions per request, counted over
exactly N requests on one keep-alive connection (valgrind's gdbserver takes callgrind_control's commands while the
server idles, so the counted window holds only those requests).

`scaling`: `--workers 2` against 1 (nothing pinned: both cores for everything, as a user runs it), with Envoy at
`--concurrency` 1 and 2 beside it; CPU per request pinned as above at 8, 100 and 1,000 connections, against Envoy's;
latency added over direct for a 1 MB request body and for a request with 100 tools (open loop, 20 req/s), against
Envoy's for the same bodies. Results as ratios to Envoy measured in the same run; bench/README.md quotes them.
Needs what bench/run installs (nginx, wrk, Envoy's venv); granian goes into ~/.cache/kimi-gateway/bench-granian.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

REPLY = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
                    "model": "bench-model", "system_fingerprint": "b1-bench",
                    "choices": [{"index": 0, "message": {"role": "assistant",
                                                         "content": "Hello! How can I help you today?"},
                                 "logprobs": None, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}},
                   separators=(",", ":")).encode()
REPLY_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(REPLY)).encode())]


async def trivial_app(scope, receive, send) -> None:
    """The least an ASGI app can do for a POST: read the body, answer a fixed JSON reply."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": REPLY_HEADERS})
    await send({"type": "http.response.body", "body": REPLY})


async def watched_app(scope, receive, send) -> None:
    """trivial_app plus what the gateway's data plane does to notice a hang-up: a second task waiting on
    receive() for `http.disconnect`, which the server answers once the response is complete."""
    if scope["type"] != "http":
        return await trivial_app(scope, receive, send)
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    asyncio.get_running_loop().create_task(receive())
    await send({"type": "http.response.start", "status": 200, "headers": REPLY_HEADERS})
    await send({"type": "http.response.body", "body": REPLY})


class ForwardApp:
    """The floor (issue 22): a bare Python forwarder, our server under it and our upstream client in it, and no
    gateway logic: the request body goes to the upstream as it came in, the reply comes back as JSON with a
    content-length. What the gateway costs above this is its own per-request work."""

    JSON = (b"content-type", b"application/json")

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.transport = None

    @classmethod
    def from_env(cls) -> "ForwardApp":   # granian's factory target
        return cls(os.environ["KIMI_BENCH_UPSTREAM"])

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        reply = await self.transport.request(scope["method"], scope["path"], body)
        data = await reply.read()
        await send({"type": "http.response.start", "status": reply.status,   # a JSON reply, as the gateway answers
                    "headers": [self.JSON, (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def lifespan(self, receive, send) -> None:
        from backends.transport import LeanTransport

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.transport = LeanTransport(self.upstream, max_connections=256, backend="floor")
            else:
                await self.transport.aclose()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return


def gateway_factory():
    """granian's factory target: the gateway's app on the config in $KIMI_BENCH_GATEWAY_CONFIG."""
    from gateway.app import create_app
    from gateway.config import load_config
    from gateway.logs import configure_logging

    config = load_config(os.environ["KIMI_BENCH_GATEWAY_CONFIG"])
    configure_logging(config.logging)
    return create_app(config)


def serve(args) -> None:
    if args.server == "granian":
        from granian import Granian

        target, factory = {"gateway": ("servers:gateway_factory", True), "forward": ("servers:ForwardApp.from_env", True)
                           }.get(args.app, (f"servers:{args.app}_app", False))
        Granian(target, address="127.0.0.1", port=args.port, interface="asgi", workers=1, runtime_threads=1,
                loop="uvloop", http="1", factory=factory, log_access=False, websockets=False).serve()
        return
    import uvloop

    from gateway.server import make_server, serve_all
    if args.app == "forward":
        app = ForwardApp(args.upstream or os.environ["KIMI_BENCH_UPSTREAM"])
    else:
        app = watched_app if args.app == "watched" else trivial_app
    uvloop.run(serve_all([make_server(app, "127.0.0.1", args.port, True, args.server)]))


# ---------------------------------------------------------------- outside: the runs

def granian_path() -> str:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kimi-gateway" / "bench-granian"
    if not (cache / "granian").exists():
        print(f"[servers] installing granian into {cache}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(cache), "granian"],
                       check=True)
    return str(cache)


class Runs:
    def __init__(self, args) -> None:
        import harness

        self.h = harness
        self.args = args
        ns = argparse.Namespace(quick=True, litellm_python=None, skip_litellm=True, litellm_unavailable=None,
                                litellm_bin=None, envoy_bin=getattr(args, "envoy_bin", None), envoy_unavailable=None, smg_bin=None,
                                smg_unavailable=None, skip_peers=False)
        self.bench = harness.Bench(ns)
        self.bench.reasons[harness.SMG] = "not in this run"
        self.work = self.bench.work
        self.procs: list = []
        self.config = None

    def start_upstreams(self) -> None:
        self.bench.start_nginx()
        self.bench.start_sse()   # Envoy's start-up check streams through it too
        self.config = self.bench.gateway_config("gateway.yaml", 0)

    def start_envoy(self, concurrency: int = 1, pin: bool = True) -> int:
        bench = self.bench
        bench.start_envoy()
        proc = bench.peers[self.h.ENVOY]
        if concurrency != 1 or not pin:   # the same config, unpinned, `concurrency` worker threads
            proc.stop()
            bench.procs.remove(proc)
            root = self.work / "envoy"
            bench.peers[self.h.ENVOY] = proc = bench.spawn("envoy2", [
                self.args.envoy_bin, "-c", str(root / "envoy.yaml"), "--concurrency", str(concurrency),
                "--log-level", "warn", "--base-id", str(os.getpid() % 60000 + 1), "--disable-hot-restart"])
            self.h.wait_http(bench.ports["envoy_admin"], "/ready", proc, 60)
        return proc.pid

    def stop_envoy(self) -> None:
        proc = self.bench.peers[self.h.ENVOY]
        if proc is not None:
            proc.stop()
            self.bench.procs.remove(proc)
            self.bench.peers[self.h.ENVOY] = None
            shutil.rmtree(self.work / "envoy", ignore_errors=True)

    def start_server(self, server: str, app: str, port: int, *, pin: bool = True, workers: int = 1,
                     valgrind: list[str] | None = None):
        h = self.h
        env = h.gateway_env()
        env["KIMI_BENCH_GATEWAY_CONFIG"] = str(self.config)
        env["KIMI_BENCH_UPSTREAM"] = f"http://127.0.0.1:{self.bench.ports['nginx']}"
        if server == "granian":
            env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + granian_path() + os.pathsep + str(HERE)
        if app == "gateway" and server != "granian":
            config = self.bench.gateway_config(f"gateway-{port}.yaml", port)
            if valgrind:   # request facts written every 100 requests, not every 0.5 s: a count no clock moves
                config.write_text(config.read_text() + "experiments: {batch_size: 100, flush_interval_s: 3600}\n")
            argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--http", server,
                    "--workers", str(workers)]
        else:
            argv = [sys.executable, str(HERE / "servers.py"), "serve", "--server", server, "--app", app,
                    "--port", str(port)]
        argv = (valgrind or []) + argv
        if pin:
            argv = ["taskset", "-c", h.GATEWAY_CPU] + argv
        env["PYTHONHASHSEED"] = "0"
        proc = self.bench.spawn(f"{server}-{app}-{port}", argv, env)
        ready = "/v1/models" if app == "gateway" else "/"
        deadline = time.monotonic() + (600 if valgrind else 90)
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{server}/{app} exited:\n{proc.tail()}")
            try:
                if post(port, b"x") or h.http_get(port, ready)[0] in (200, 401, 405):
                    return proc
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{server}/{app} did not answer:\n{proc.tail()}")

    def stop(self, proc) -> None:
        proc.stop()
        if proc in self.bench.procs:
            self.bench.procs.remove(proc)

    def wrk(self, port: int, connections: int, pids: list[int], duration: int, threads: int = 1,
            pin: bool = True) -> dict:
        h = self.h
        h.wait_quiet(pids)
        if threads == 1 and pin:
            before = h.cpu_seconds(pids)
            result = self.bench.wrk(f"http://127.0.0.1:{port}/v1/chat/completions", connections, duration)
        else:   # harness's wrk is one thread on cpu0; here: unpinned, more threads
            self.bench.wrk(f"http://127.0.0.1:{port}/v1/chat/completions", 1, 1)   # writes its post.lua
            argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
                    "-s", str(self.work / "post.lua"), f"http://127.0.0.1:{port}/v1/chat/completions"]
            before = h.cpu_seconds(pids)
            done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, preexec_fn=h.boost)
            total = re.search(r"(\d+) requests in ([\d.]+)s", done.stdout)
            bad = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
            requests, non2xx = int(total.group(1)), int(bad.group(1)) if bad else 0
            result = {"requests": requests, "ok": requests - non2xx, "non2xx": non2xx,
                      "seconds": float(total.group(2)), "rps": (requests - non2xx) / float(total.group(2)),
                      "socket_errors": None}
        used = h.cpu_seconds(pids) - before
        result["cpu_us_per_request"] = used * 1e6 / result["ok"] if result["ok"] else None
        return result


def post(port: int, body: bytes) -> bool:
    """True when a POST to the chat path gets any HTTP answer (the trivial app answers everything)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request_bytes(body, close=True))
        return sock.recv(16).startswith(b"HTTP/1.1 ")


def request_bytes(body: bytes, close: bool = False) -> bytes:
    import harness

    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"{harness.AUTH_HEADER}\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def exchange(sock: socket.socket, request: bytes) -> int:
    """One request on a keep-alive connection; the status. Responses here carry content-length."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split(b" ", 2)[1])


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, stdout=subprocess.DEVNULL, timeout=120)


def server_pid(proc) -> int:
    """The process that serves: the deepest valgrind'd one (granian serves from a child process)."""
    import harness

    tree = harness.process_tree(proc.pid)
    mine = [pid for pid in tree if "valgrind" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            or "memcheck" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            or Path(f"/proc/{pid}/exe").resolve().name.startswith("callgrind")]
    return (mine or tree)[-1]


def count_instructions(runs: Runs, server: str, app: str, requests: int) -> dict:
    port = runs.h.free_port()
    out = runs.work / f"callgrind.{server}.{app}.out"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p",
                "--trace-children=yes", "--vgdb=yes"] + (["--separate-threads=yes"] if os.environ.get("KIMI_BENCH_THREADS") else [])
    started = time.monotonic()
    proc = runs.start_server(server, app, port, valgrind=valgrind)
    try:
        time.sleep(1)
        pid = server_pid(proc)
        request = request_bytes(runs.h.CHAT_BODY.encode())
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            for _ in range(200):   # warm-up: caches, lazy imports, the upstream pool
                exchange(sock, request)
            time.sleep(0.5)
            callgrind_control("--instr=on", str(pid))
            # What runs by the clock whatever the load (timers, the log writer's wake-ups, health probes) is
            # counted over an idle window first, and its rate times the measured window's length is taken off:
            # under valgrind a request takes ~50x longer, so clock-driven work would otherwise count as per-request.
            callgrind_control("--zero", str(pid))
            idle_started = time.monotonic()
            time.sleep(IDLE_WINDOW_S)
            callgrind_control("--dump=idle", str(pid))
            idle_s = time.monotonic() - idle_started
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:   # (the idle one timed out)
            exchange(sock, request)
            callgrind_control("--zero", str(pid))
            window_started = time.monotonic()
            statuses = [exchange(sock, request) for _ in range(requests)]
            callgrind_control("--dump=measured", str(pid))
            window_s = time.monotonic() - window_started
        totals = dump_totals(runs.work, f"callgrind.{server}.{app}.out.{pid}*")
        if "measured" not in totals or "idle" not in totals:
            raise RuntimeError(f"no callgrind dumps for {server}/{app}: {totals}")
        background = totals["idle"] / idle_s * window_s
        bad = [s for s in statuses if s != 200]
        return {"requests": requests, "instructions": totals["measured"], "idle_per_s": round(totals["idle"] / idle_s),
                "window_s": round(window_s, 2), "raw_per_request": round(totals["measured"] / requests),
                "per_request": round((totals["measured"] - background) / requests),
                "non200": len(bad), "seconds": round(time.monotonic() - started, 1)}
    finally:
        runs.stop(proc)


IDLE_WINDOW_S = 5.0


def dump_totals(folder: Path, pattern: str) -> dict[str, int]:
    """{trigger: instructions} of the callgrind dumps matching pattern (`--dump=NAME` writes trigger NAME)."""
    totals = {}
    for dump in folder.glob(pattern):
        text = dump.read_text(errors="replace")
        trigger = re.search(r"^desc: Trigger: dump (\S+)", text, re.M)
        total = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
        if trigger and total:
            name = trigger.group(1)
            totals[name] = totals.get(name, 0) + int(total.group(1))
    return totals


def run_cost(args) -> dict:
    import harness
    runs = Runs(args)
    results: dict = {"wrk": {}, "callgrind": {}, "rounds": args.rounds, "duration_s": args.duration}
    servers = args.servers.split(",")
    try:
        runs.start_upstreams()
        envoy_pid = runs.start_envoy()
        envoy_port = runs.bench.ports["envoy"]
        for app in args.apps.split(","):
            procs = {}
            for server in servers:
                port = harness.free_port()
                procs[server] = (runs.start_server(server, app, port), port)
            table = results["wrk"][app] = {name: [] for name in [*servers, "Envoy"]}
            for number in range(args.rounds):
                for name in [*servers, "Envoy"]:
                    if name == "Envoy":
                        pids, port = [envoy_pid], envoy_port
                    else:
                        proc, port = procs[name]
                        pids = harness.process_tree(proc.pid)
                    result = runs.wrk(port, 32, pids, args.duration)
                    table[name].append(result)
                    print(f"[servers] {app} round {number + 1} {name}: {result['rps']:.0f} req/s, "
                          f"{result['cpu_us_per_request'] or 0:.0f} µs/request, non-2xx {result['non2xx']}",
                          flush=True)
            for proc, _ in procs.values():
                runs.stop(proc)
        runs.stop_envoy()
        if not args.no_callgrind:
            for app in args.apps.split(","):
                for server in servers:
                    result = count_instructions(runs, server, app, args.callgrind_requests)
                    results["callgrind"].setdefault(app, {})[server] = result
                    print(f"[servers] callgrind {app} {server}: {result['per_request']:,} instructions/request "
                          f"({result['non200']} non-200, {result['seconds']} s)", flush=True)
    finally:
        runs.bench.stop()
    return results


def run_instr(args) -> dict:
    """Instructions (callgrind) and system calls (strace) per request of each app on each server, nginx upstream:
    no wrk and no clock in the figures, so it can run on a busy machine."""
    runs = Runs(args)
    results: dict = {"callgrind": {}, "syscalls": {}}
    try:
        runs.start_upstreams()
        for app in args.apps.split(","):
            for server in args.servers.split(","):
                if not args.no_callgrind:
                    result = count_instructions(runs, server, app, args.callgrind_requests)
                    results["callgrind"].setdefault(app, {})[server] = result
                    print(f"[servers] callgrind {app} {server}: {result['per_request']:,} instructions/request "
                          f"({result['non200']} non-200, {result['seconds']} s)", flush=True)
                if not args.no_strace:
                    result = count_syscalls(runs, server, app, args.strace_requests, args.strace_connections)
                    results["syscalls"].setdefault(app, {})[server] = result
                    print(f"[servers] strace {app} {server}: {result['per_request']} system calls/request "
                          f"{result['calls']}", flush=True)
    finally:
        runs.bench.stop()
    return results


def count_syscalls(runs: Runs, server: str, app: str, requests: int, connections: int = 1) -> dict:
    """System calls per request of the server's process tree (its upstream side included), strace attached only
    for the window: `requests` requests one after another on one keep-alive connection, or with `connections` > 1,
    wrk at that many connections for 3 s (where one epoll wake-up can serve several requests)."""
    port = runs.h.free_port()
    proc = runs.start_server(server, app, port, pin=False)
    out = runs.work / f"strace.{server}.{app}.txt"
    try:
        request = request_bytes(runs.h.CHAT_BODY.encode())
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            for _ in range(200):   # warm-up: the upstream pool, lazy imports
                exchange(sock, request)
            pids = runs.h.process_tree(proc.pid)
            argv = ["strace", "-f", "-c", "-o", str(out)] + [arg for pid in pids for arg in ("-p", str(pid))]
            tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)   # strace attaches (it says so on stderr, but only after the first call)
            if connections > 1:
                result = runs.bench.wrk(f"http://127.0.0.1:{port}/v1/chat/completions", connections, 3, timeout_s=30)
                requests, statuses = result["requests"], [200] * result["ok"] + [0] * result["non2xx"]
            else:
                statuses = [exchange(sock, request) for _ in range(requests)]
            tracer.send_signal(2)   # SIGINT: strace detaches and writes its table
            tracer.wait(30)
        calls = {}
        for line in out.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[-1] not in ("total", "syscall") and fields[3].isdigit():
                calls[fields[-1]] = int(fields[3])
        per = {name: round(count / requests, 2) for name, count in sorted(calls.items(), key=lambda kv: -kv[1])
               if count / requests >= 0.01}
        return {"requests": requests, "non200": sum(s != 200 for s in statuses),
                "per_request": round(sum(calls.values()) / requests, 2), "calls": per}
    finally:
        runs.stop(proc)


def big_bodies(work: Path) -> dict[str, Path]:
    """The two request bodies of the size figures: a 1 MB user message, and a request with 100 tools."""
    content = ("lorem ipsum dolor sit amet " * 40000)[:1_000_000]
    one_mb = {"model": "bench-model", "messages": [{"role": "user", "content": content}], "max_tokens": 16}
    tools = [{"type": "function", "function": {
        "name": f"tool_{index}", "description": f"Tool number {index}: looks something up and returns it as JSON.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "description": "what to look up"},
            "limit": {"type": "integer", "minimum": 1, "maximum": 100},
            "mode": {"type": "string", "enum": ["fast", "exact", "fuzzy"]}}, "required": ["query"]}}}
        for index in range(100)]
    hundred = {"model": "bench-model", "messages": [{"role": "user", "content": "Which tool?"}], "tools": tools,
               "max_tokens": 16}
    paths = {}
    for name, doc in (("1 MB body", one_mb), ("100 tools", hundred)):
        path = paths[name] = work / (name.replace(" ", "-") + ".json")
        path.write_text(json.dumps(doc, separators=(",", ":")))
    return paths


def run_scaling(args) -> dict:
    import harness
    runs = Runs(args)
    bench = runs.bench
    results: dict = {"rounds": args.rounds, "duration_s": args.duration, "workers": {}, "connections": {},
                     "bodies": {}}
    try:
        runs.start_upstreams()
        # 1. --workers 2 against 1, nothing pinned; Envoy --concurrency 2 against 1 beside it (wrk -t2 -c64).
        for number in range(args.rounds):
            for name, workers in (("gateway, 1 worker", 1), ("gateway, 2 workers", 2), ("Envoy, concurrency 1", 1),
                                  ("Envoy, concurrency 2", 2)):
                if name.startswith("Envoy"):
                    pid, port = runs.start_envoy(workers, pin=False), bench.ports["envoy"]
                    proc = None
                else:
                    port = harness.free_port()
                    proc = runs.start_server("lean", "gateway", port, pin=False, workers=workers)
                    pid = proc.pid
                time.sleep(8 if proc is not None and workers > 1 else 1)   # worker 1 starts after worker 0 serves
                result = runs.wrk(port, 64, harness.process_tree(pid), args.duration, threads=2, pin=False)
                results["workers"].setdefault(name, []).append(result)
                print(f"[servers] workers round {number + 1} {name}: {result['rps']:.0f} req/s, "
                      f"{result['cpu_us_per_request'] or 0:.0f} µs/request", flush=True)
                runs.stop_envoy() if proc is None else runs.stop(proc)
        # 2. CPU per request at 8, 100, 1,000 connections; the gateway and Envoy pinned to cpu1, wrk on cpu0.
        port = harness.free_port()
        gateway = runs.start_server("lean", "gateway", port)
        envoy_pid = runs.start_envoy(1)
        targets = {"kimi-gateway": (port, gateway.pid), "Envoy": (bench.ports["envoy"], envoy_pid)}
        for number in range(args.rounds):
            for connections in (8, 100, 1000):
                for name, (target_port, pid) in targets.items():
                    result = runs.wrk(target_port, connections, harness.process_tree(pid), args.duration)
                    results["connections"].setdefault(f"{name} @{connections}", []).append(result)
                    print(f"[servers] connections round {number + 1} {name} @{connections}: {result['rps']:.0f} "
                          f"req/s, {result['cpu_us_per_request'] or 0:.0f} µs/request, non-2xx {result['non2xx']}, "
                          f"socket errors {result['socket_errors']}", flush=True)
        # 3. Latency added by a 1 MB body and by 100 tools: open loop at 20 req/s, against direct (nginx).
        bodies = big_bodies(runs.work)
        urls = {"direct": bench.ports["nginx"], "kimi-gateway": port, "Envoy": bench.ports["envoy"]}
        for number in range(args.rounds):
            for body_name, path in bodies.items():
                for name, target_port in urls.items():
                    harness.wait_quiet(harness.process_tree(targets[name][1]) if name in targets else [])
                    result = bench.loadgen("rate", f"http://127.0.0.1:{target_port}/v1/chat/completions",
                                           f"@{path}", "--rate", "20", "--duration", str(args.duration),
                                           "--warmup", "1", "--max-connections", "16", "--drain-seconds", "5",
                                           timeout=args.duration + 60)
                    results["bodies"].setdefault(f"{body_name}|{name}", []).append(result)
                    print(f"[servers] bodies round {number + 1} {body_name} {name}: p50 {result['p50_ms']} ms, "
                          f"p99 {result['p99_ms']} ms, ok {result['ok']}/{result['sent']}", flush=True)
    finally:
        bench.stop()
    return results


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summary(results: dict) -> str:
    """Markdown tables: medians of the rounds, ratios to Envoy of the same run."""
    lines = []
    for app, table in results.get("wrk", {}).items():
        envoy_rps = med([r["rps"] for r in table["Envoy"]])
        envoy_cpu = med([r["cpu_us_per_request"] for r in table["Envoy"]])
        counts = results.get("callgrind", {}).get(app, {})
        lines += [f"\n{app} app: wrk -t1 -c32, {results['duration_s']:g} s, {results['rounds']} rounds, medians\n",
                  "| server | req/s | × Envoy | CPU µs/request | × Envoy | instructions/request (callgrind) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, rounds in table.items():
            rps, cpu = med([r["rps"] for r in rounds]), med([r["cpu_us_per_request"] for r in rounds])
            count = counts.get(name, {}).get("per_request")
            lines.append(f"| {name} | {rps:,.0f} | {rps / envoy_rps:.2f} | {cpu:.0f} | {cpu / envoy_cpu:.2f} | "
                         f"{f'{count:,}' if count else '—'} |")
        lines.append("\nrounds (req/s, µs/request): " + "; ".join(
            f"{name} " + ", ".join(f"{r['rps']:.0f}/{r['cpu_us_per_request']:.0f}" for r in rounds)
            for name, rounds in table.items()))
    if results.get("workers"):
        lines += scaling_summary(results)
    return "\n".join(lines)


def scaling_summary(results: dict) -> list[str]:
    def rps(name):
        return med([r["rps"] for r in results["workers"][name]])

    g1, g2 = rps("gateway, 1 worker"), rps("gateway, 2 workers")
    e1, e2 = rps("Envoy, concurrency 1"), rps("Envoy, concurrency 2")
    lines = [f"\nScaling, {results['rounds']} rounds, medians ({results['duration_s']} s per run)\n",
             "| figure | kimi-gateway (lean) | Envoy | gateway ÷ Envoy |", "|---|---:|---:|---:|",
             f"| req/s, 1 worker / thread (wrk -t2 -c64, nothing pinned) | {g1:,.0f} | {e1:,.0f} | {g1 / e1:.2f} |",
             f"| req/s, 2 workers / threads | {g2:,.0f} | {e2:,.0f} | {g2 / e2:.2f} |",
             f"| 2 ÷ 1 | {g2 / g1:.2f}× | {e2 / e1:.2f}× | |"]
    conn = results["connections"]
    for count in (8, 100, 1000):
        g = med([r["cpu_us_per_request"] for r in conn[f"kimi-gateway @{count}"]])
        e = med([r["cpu_us_per_request"] for r in conn[f"Envoy @{count}"]])
        grps = med([r["rps"] for r in conn[f"kimi-gateway @{count}"]])
        erps = med([r["rps"] for r in conn[f"Envoy @{count}"]])
        lines.append(f"| CPU µs/request at {count:,} connections (req/s) | {g:.0f} ({grps:,.0f}) | {e:.0f} "
                     f"({erps:,.0f}) | {g / e:.2f} |")
    bodies = results["bodies"]
    for body in ("1 MB body", "100 tools"):
        direct = bodies[f"{body}|direct"]
        for pct in ("p50", "p99"):
            base = med([r[f"{pct}_ms"] for r in direct])
            g = med([r[f"{pct}_ms"] for r in bodies[f"{body}|kimi-gateway"]]) - base
            e = med([r[f"{pct}_ms"] for r in bodies[f"{body}|Envoy"]]) - base
            lines.append(f"| {body}: latency {pct} added over direct ({base:.3f} ms), 20 req/s (ms) | {g:+.3f} | "
                         f"{e:+.3f} | {g / e:.2f} |" if e else f"| {body} {pct} | {g:+.3f} | {e:+.3f} | — |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("serve")
    one.add_argument("--server", choices=("lean", "uvicorn", "granian"), required=True)
    one.add_argument("--app", choices=("trivial", "watched", "forward", "gateway"), required=True)
    one.add_argument("--port", type=int, required=True)
    one.add_argument("--upstream", help="forward: the upstream's base URL (else $KIMI_BENCH_UPSTREAM)")
    cost = sub.add_parser("cost")
    scaling = sub.add_parser("scaling")
    instr = sub.add_parser("instr")
    for each in (cost, scaling, instr):
        each.add_argument("--rounds", type=int, default=3)
        each.add_argument("--duration", type=int, default=8)
        each.add_argument("--envoy-bin", required=each is not instr)
        each.add_argument("--out", help="write the results as JSON here")
    cost.add_argument("--servers", default="lean,uvicorn,granian")
    cost.add_argument("--apps", default="trivial,gateway")
    instr.add_argument("--servers", default="lean")
    instr.add_argument("--apps", default="forward,gateway")
    instr.add_argument("--no-strace", action="store_true")
    instr.add_argument("--strace-requests", type=int, default=2000)
    instr.add_argument("--strace-connections", type=int, default=1, help="> 1: wrk at this many connections")
    for each in (cost, instr):
        each.add_argument("--no-callgrind", action="store_true")
        each.add_argument("--callgrind-requests", type=int, default=300)
    args = parser.parse_args()
    if args.command == "serve":
        serve(args)
        return 0
    results = {"cost": run_cost, "scaling": run_scaling, "instr": run_instr}[args.command](args)
    text = json.dumps(results, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    if args.command != "instr":
        print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
