"""Which Python functions the gateway's requests run, counted in bytecode instructions (issue 22): a
deterministic, Python-level complement to callgrind (which sees only CPython's C functions).

    .venv/bin/python bench/opcount.py [--requests 300] [--kind json|stream] [--top 40]

It starts bench/harness.py's nginx (and SSE) upstream, then `kimi-gateway serve` on the harness's config in this
process with an opcode tracer on every thread, sends warm-up requests, zeroes the counts, sends N requests on one
keep-alive connection from a second process, and prints the functions by bytecode instructions executed per
request (self, not including callees), with their calls per request. Tracing slows Python ~30x: only counts mean
anything here, never time. Not a test; nothing asserts on it.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

OPS: Counter = Counter()
CALLS: Counter = Counter()
LINES: Counter = Counter()
ON = [False]
BY_LINE = set(filter(None, os.environ.get("KIMI_OPCOUNT_LINES", "").split(",")))  # qualnames to count per line


def tracer(frame, event, arg):
    if not ON[0]:
        return tracer if event == "call" else None
    code = frame.f_code
    if event == "opcode":
        OPS[code] += 1
        if code.co_qualname in BY_LINE:
            LINES[code.co_filename, frame.f_lineno] += 1
    elif event == "call":
        CALLS[code] += 1
        frame.f_trace_opcodes = True
    return tracer


def name_of(code) -> str:
    path = code.co_filename
    for root in (str(HERE.parent) + "/", "site-packages/"):
        if root in path:
            path = path.split(root, 1)[1]
    return f"{path}:{code.co_firstlineno} {code.co_qualname}"


def client(port: int, kind: str, warmup: int, requests: int, pid: int) -> None:
    import socket
    import time

    import harness
    from servers import exchange, request_bytes

    harness.AUTH_HEADER = f"Authorization: Bearer {os.environ['KIMI_BENCH_CLIENT_KEY']}"   # the server's key

    body = (harness.CHAT_BODY if kind == "json" else harness.STREAM_BODY.replace("bench-stream", "bench-ttft")).encode()
    request = request_bytes(body)

    def stream_exchange(sock) -> int:
        sock.sendall(request)
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return int(data.split(b" ", 2)[1])

    one = (lambda sock: exchange(sock, request)) if kind == "json" else stream_exchange
    deadline = time.monotonic() + 60
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=120)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    with sock:
        for _ in range(warmup):
            assert one(sock) == 200
        os.kill(pid, signal.SIGTTIN)
        time.sleep(0.5)
        statuses = [one(sock) for _ in range(requests)]
        os.kill(pid, signal.SIGUSR2)
    assert all(s == 200 for s in statuses), statuses[:5]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--kind", choices=("json", "stream"), default="json")
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--client", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(args.client[0], args.kind, args.warmup, args.requests, args.client[1])
        return 0

    import argparse as ap

    import harness

    bench = harness.Bench(ap.Namespace(quick=True, litellm_python=None, skip_litellm=True, litellm_unavailable=None,
                                       litellm_bin=None, envoy_bin=None, envoy_unavailable=None, smg_bin=None,
                                       smg_unavailable=None, skip_peers=True))
    bench.start_nginx()
    bench.start_sse()
    port = harness.free_port()
    config = bench.gateway_config("gateway.yaml", port)
    os.environ.update(harness.gateway_env())
    done = threading.Event()

    def zero(*_):
        OPS.clear(), CALLS.clear()
        ON[0] = True

    def dump(*_):
        ON[0] = False
        report(args.requests, args.top)
        done.set()
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTTIN, zero)
    signal.signal(signal.SIGUSR2, dump)
    client_proc = subprocess.Popen([sys.executable, __file__, "--kind", args.kind, "--requests", str(args.requests),
                                    "--warmup", str(args.warmup), "--client", str(port), str(os.getpid())])
    sys.settrace(tracer)
    threading.settrace(tracer)
    from gateway.cli import main as cli_main
    try:
        cli_main(["serve", "--config", str(config)])
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        sys.settrace(None)
        client_proc.wait(timeout=30)
        bench.stop()
    return 0 if done.is_set() else 1


def report(requests: int, top: int) -> None:
    total = sum(OPS.values())
    print(f"\n{total / requests:,.0f} bytecode instructions per request (self), {sum(CALLS.values()) / requests:,.0f} "
          f"Python calls per request\n")
    print(f"{'ops/req':>9} {'%':>5} {'calls/req':>9}  function")
    for code, ops in OPS.most_common(top):
        print(f"{ops / requests:9,.0f} {100 * ops / total:5.1f} {CALLS[code] / requests:9.2f}  {name_of(code)}")
    for (path, line), ops in sorted(LINES.items()):
        print(f"{ops / requests:9,.1f}  {path.rsplit('/', 1)[-1]}:{line}")
    print("\nmost called (calls per request; a coroutine's resumptions count as calls):")
    for code, calls in CALLS.most_common(top):
        print(f"{calls / requests:9.2f} {OPS[code] / requests:9,.0f}  {name_of(code)}")
    by_file: Counter = Counter()
    for code, ops in OPS.items():
        by_file[name_of(code).split(":")[0]] += ops
    print("\nby file:")
    for path, ops in by_file.most_common(25):
        print(f"{ops / requests:9,.0f} {100 * ops / total:5.1f}  {path}")


if __name__ == "__main__":
    raise SystemExit(main())
