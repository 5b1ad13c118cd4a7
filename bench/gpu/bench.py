"""The gateway in front of a real llama-server: direct vs through kimi-gateway, interleaved, per concurrency.

    python bench/gpu/bench.py --llama-server BIN --model M.gguf --lora A.gguf --lora B.gguf --out R.json \
        [--concurrency 1,8,32,64,128,256] [--max-tokens 128] [--prompt-mix 512:7,4096:1] [--rounds 2] \
        [--deadline-s 540] [--profile-cell c256/base]

It starts llama-server (the project's own launcher flags, plus the GPU ones) and the gateway (one worker,
pinned to one core, auth with a client key, metrics and the default sampling policy on, both adapters
registered), checks that the same greedy request gives the same text both ways, then for each concurrency and
each of {base model, adapter} runs the same workload direct and through the gateway, in rounds ordered A B B A
(a drift of llama-server's speed within a cell falls on both paths alike); each path's figures pool its rounds.
The results file is rewritten after every cell, and a rerun with the same --out skips the cells already in it,
so a sweep can span several device calls; --deadline-s stops before a cell that would not fit.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]

from streams import run_streams, summarise  # noqa: E402

from backends.launchers.llamacpp import LlamaServerLaunch, ServerProcess, free_port  # noqa: E402
from gateway.demo.tiny_gguf import WORDS  # noqa: E402

CLIENT_KEY = "bench-gpu-client-key"
BASE_ROUTE, ADAPTER_ROUTE = "bench-base", "bench-lora"
SAMPLING = {"temperature": 0.0, "top_p": 0.95, "min_p": 0.01}  # the same on both paths: the gateway fills nothing


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def http_json(url: str, body: dict | None = None, key: str | None = None, timeout: float = 600) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"content-type": "application/json",
                                              **({"authorization": f"Bearer {key}"} if key else {})})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads


def rss_mib(pid: int) -> dict:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024, "rss_peak_mib": int(status["VmHWM"].split()[0]) / 1024}


def parse_mix(text: str) -> list[int]:
    """'512:7,4096:1' -> a cycle of prompt lengths in that proportion."""
    cycle = []
    for part in text.split(","):
        length, weight = part.split(":")
        cycle += [int(length)] * int(weight)
    return cycle


def make_bodies(n: int, mix: list[int], max_tokens: int, seed: int, order_seed: int = 0) -> list[dict]:
    """n chat requests whose prompts are `length` random words (one token each), unique per request and seed,
    so no run is served from another's prompt cache. The order of the lengths depends on order_seed only: both
    paths of a cell queue the same prompt lengths in the same order (where a 4,096-token prompt lands in the
    queue moves the TTFT median by seconds at high concurrency; the 2026-12-01 run still had one order per path)."""
    lengths = [mix[i % len(mix)] for i in range(n)]
    random.Random(order_seed).shuffle(lengths)
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=length))}],
             "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}, **SAMPLING}
            for length in lengths]


def kv_tokens(args) -> int:
    """Every slot gets its own KV of --ctx-per-slot tokens (llama.cpp's default without --kv-unified). One unified
    buffer for 256 slots makes every decode step attend over every live sequence's cells (the 2026-12-01 run:
    ~620 ms per step and 204 tokens/s at 256 streams, an H200 doing a fraction of what it can)."""
    return args.ctx if args.kv_unified else args.slots * args.ctx_per_slot


def requests_for(concurrency: int, per_stream: int, floor: int, cap: int) -> int:
    return max(floor, min(cap, per_stream * concurrency), concurrency)


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "slots").mkdir(exist_ok=True)
        self.llama: ServerProcess | None = None
        self.gateway: subprocess.Popen | None = None
        self.lora_ids: dict[str, int] = {}

    # --- processes -------------------------------------------------------------------------------------
    def record_pid(self, name: str, pid: int) -> None:
        if self.args.pid_dir:
            Path(self.args.pid_dir, name).write_text(f"{pid}\n")

    def start_llama(self) -> None:
        a = self.args
        # --slot-save-path only enables POST /slots (the erase between runs); nothing is saved.
        extra = ["-ngl", str(a.ngl), "-np", str(a.slots), "-c", str(kv_tokens(a)), "--cont-batching",
                 "-fa", a.flash_attn, "-ctk", a.kv_type, "-ctv", a.kv_type,
                 *(["--kv-unified"] if a.kv_unified else []),
                 "--slot-save-path", str(self.work / "slots"), *a.llama_arg]
        launch = LlamaServerLaunch(Path(a.llama_server), Path(a.model), tuple(Path(p) for p in a.lora),
                                   port=free_port(), alias="bench", threads=a.llama_threads, extra=tuple(extra))
        argv = ["taskset", "-c", a.llama_cpus, *launch.argv()] if a.llama_cpus else launch.argv()
        self.llama_argv = argv
        log("llama-server: " + " ".join(argv))
        self.llama = ServerProcess(argv, f"{launch.url}/health", log_path=self.work / "llama-server.log").start()
        self.llama_url = launch.url
        started = time.monotonic()
        self.llama.wait_ready(timeout_s=a.ready_timeout_s)
        self.llama_ready_s = time.monotonic() - started
        self.record_pid("llama-server", self.llama.process.pid)
        log(f"llama-server ready in {self.llama_ready_s:.1f}s")
        for entry in http_json(f"{self.llama_url}/lora-adapters"):
            self.lora_ids[str(Path(entry["path"]).resolve())] = entry["id"]

    def start_gateway(self) -> None:
        a = self.args
        port = free_port()
        roots = sorted({str(Path(p).resolve().parent) for p in a.lora})
        adapters = "\n".join(f"  - {{name: {name}, gguf: \"{Path(p).resolve()}\", backends: [llama]}}"
                             for name, p in zip((ADAPTER_ROUTE, ADAPTER_ROUTE + "-b"), a.lora))
        config = self.work / "gateway.yaml"
        config.write_text(f"""# written by bench/gpu/bench.py
listen: {{host: 127.0.0.1, port: {port}}}
state_dir: {self.work / 'gateway-state'}
adapter_roots: {json.dumps(roots)}
auth:
  client_keys:
    - {{name: bench, key_env: KIMI_BENCH_CLIENT_KEY, models: ["*"]}}
backends:
  - {{name: llama, kind: llamacpp, url: "{self.llama_url}", max_connections: 1024}}
adapters:
{adapters}
routes:
  - {{name: {BASE_ROUTE}, targets: [llama]}}
""")
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
        if a.gateway_cpu:
            argv = ["taskset", "-c", a.gateway_cpu, *argv]
        env = dict(os.environ, KIMI_BENCH_CLIENT_KEY=CLIENT_KEY,
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.gateway_argv = argv
        log("gateway: " + " ".join(argv))
        with open(self.work / "gateway.log", "ab") as output:
            self.gateway = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                            start_new_session=True)
        self.record_pid("gateway", self.gateway.pid)
        self.gateway_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.gateway.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.gateway.returncode}: "
                                   f"{(self.work / 'gateway.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.gateway_url}/readyz", timeout=2) as response:
                    if response.status == 200:
                        log(f"gateway ready (pid {self.gateway.pid})")
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the gateway did not become ready in 120 s")

    def stop(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.terminate()
            try:
                self.gateway.wait(15)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
        if self.llama is not None:
            self.llama.stop()

    # --- requests --------------------------------------------------------------------------------------
    def lora_field(self, adapter: str | None) -> list[dict]:
        """What the gateway sends llama-server: a scale for every loaded adapter, 1.0 for the chosen one."""
        chosen = str(Path(self.args.lora[0]).resolve()) if adapter else None
        return [{"id": i, "scale": 1.0 if path == chosen else 0.0} for path, i in sorted(self.lora_ids.items(),
                                                                                         key=lambda kv: kv[1])]

    def target(self, path: str, adapter: str | None, body: dict) -> tuple[str, str | None, dict]:
        if path == "direct":
            return (f"{self.llama_url}/v1/chat/completions", None,
                    {**body, "model": "bench", "lora": self.lora_field(adapter)})
        return f"{self.gateway_url}/v1/chat/completions", CLIENT_KEY, {**body, "model": adapter or BASE_ROUTE}

    def wait_adapters(self, timeout_s: float = 180) -> float:
        """The gateway loads and verifies registered adapters after it starts (503 until then)."""
        started = time.monotonic()
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1, "stream": False, **SAMPLING}
        url, key, full = self.target("gateway", ADAPTER_ROUTE, body)
        while True:
            try:
                http_json(url, full, key, timeout=60)
                waited = time.monotonic() - started
                log(f"the adapter route answers after {waited:.1f}s")
                return waited
            except urllib.error.HTTPError as exc:
                if exc.code != 503 or time.monotonic() - started > timeout_s:
                    raise RuntimeError(f"the adapter route answers {exc.code}: {exc.read()[:300]!r}") from exc
            time.sleep(0.5)

    def sanity(self) -> dict:
        """Greedy text must be the same direct and through the gateway, and differ with the adapter."""
        body = {"messages": [{"role": "user", "content": "the blue river and the old stone"}], "max_tokens": 12,
                "stream": False, **SAMPLING}
        texts = {}
        for adapter in (None, ADAPTER_ROUTE):
            for path in ("direct", "gateway"):
                url, key, full = self.target(path, adapter, body)
                # From an empty cache each time: a prompt partly reused from the previous request's KV is computed
                # in other batch shapes, and a near-tie token can then flip (the 2026-12-01 run: the 12th token).
                self.erase_slots()
                try:
                    answer = http_json(url, full, key)["choices"][0]["message"]["content"]
                except (OSError, KeyError, IndexError, ValueError) as exc:  # recorded; the sweep says the rest
                    answer = f"error: {exc}"
                texts[f"{path}/{adapter or 'base'}"] = answer
        result = {"texts": texts,
                  "same_text_direct_and_gateway": texts["direct/base"] == texts["gateway/base"]
                  and texts[f"direct/{ADAPTER_ROUTE}"] == texts[f"gateway/{ADAPTER_ROUTE}"],
                  "adapter_changes_text": texts["direct/base"] != texts[f"direct/{ADAPTER_ROUTE}"]}
        log(f"sanity: {result}")
        return result

    def erase_slots(self) -> None:
        """Empty every slot's KV cache between runs, so a run never starts with another's leftovers."""
        for slot in range(self.args.slots):
            try:
                http_json(f"{self.llama_url}/slots/{slot}?action=erase", {}, timeout=30)
            except OSError as exc:
                log(f"slot erase failed ({exc}); continuing without it")
                return

    def run_once(self, path: str, adapter: str | None, bodies: list[dict], concurrency: int) -> dict:
        """One closed-loop run: the records, its wall time and the gateway's CPU seconds over it."""
        requests = [self.target(path, adapter, b) for b in bodies]
        url, key = requests[0][0], requests[0][1]
        self.erase_slots()
        pid = self.gateway.pid
        cpu_before = cpu_seconds(pid)
        records, wall = asyncio.run(run_streams(url, key, [r[2] for r in requests], concurrency))
        return {"records": records, "wall": wall, "cpu": cpu_seconds(pid) - cpu_before}

    def summary(self, path: str, runs: list[dict]) -> dict:
        """A path's figures over its rounds: percentiles of the pooled records, rates over the summed wall time."""
        records = [r for run in runs for r in run["records"]]
        wall, cpu = sum(run["wall"] for run in runs), sum(run["cpu"] for run in runs)
        summary = summarise(records, wall)
        summary["rounds"] = [{k: v for k, v in summarise(run["records"], run["wall"]).items()
                              if k in ("ok", "wall_s", "ttft_p50_ms", "output_tokens_per_s")} for run in runs]
        summary["gateway_cpu_s"] = round(cpu, 4)
        if path == "gateway":
            summary["gateway_cpu_us_per_request"] = round(cpu / max(1, summary["ok"]) * 1e6, 1)
            summary["gateway_cpu_us_per_token"] = round(cpu / max(1, summary["output_tokens"]) * 1e6, 2)
            summary["gateway_cpu_utilisation"] = round(cpu / wall, 4) if wall else None
            summary |= rss_mib(self.gateway.pid)
        return summary

    def run_path(self, path: str, adapter: str | None, bodies: list[dict], concurrency: int) -> dict:
        return self.summary(path, [self.run_once(path, adapter, bodies, concurrency)])

    # --- the sweep -------------------------------------------------------------------------------------
    def sweep(self, results: dict, started: float) -> None:
        a = self.args
        mix = parse_mix(a.prompt_mix)
        last_pair: tuple[int, float] | None = None
        for concurrency in [int(c) for c in a.concurrency.split(",")]:
            for adapter in (None, ADAPTER_ROUTE):
                key = f"c{concurrency}/{adapter or 'base'}"
                if key in results["cells"]:
                    continue
                n = requests_for(concurrency, a.requests_per_stream, a.min_requests, a.max_requests)
                estimate = (1.3 * last_pair[1] * n / last_pair[0]) if last_pair else 0.0  # prefill-bound: ~ n
                left = a.deadline_s - (time.monotonic() - started)
                if estimate > left:
                    log(f"stopping before {key}: about {estimate:.0f}s needed, {left:.0f}s left")
                    results["stopped_before"] = key
                    return
                pair_start = time.monotonic()
                order = [("direct", "gateway") if r % 2 == 0 else ("gateway", "direct") for r in range(a.rounds)]
                cell = {"concurrency": concurrency, "adapter": adapter, "requests": n, "rounds": a.rounds,
                        "order": [p for pair in order for p in pair]}
                runs: dict[str, list[dict]] = {"direct": [], "gateway": []}
                for r, paths in enumerate(order):
                    # Both paths of a round queue the same prompt lengths in the same order; the words differ
                    # (seeded by path and round), so no prompt is ever computed twice.
                    for path in paths:
                        bodies = make_bodies(n, mix, a.max_tokens, seed=zlib.crc32(f"{key}/{path}/{r}".encode()),
                                             order_seed=zlib.crc32(f"{key}/{r}".encode()))
                        log(f"{key} round {r + 1} {path}: {n} requests, {concurrency} streams")
                        profiled = path == "gateway" and r == 0 and key == a.profile_cell
                        profile = self.profiler(key) if profiled else None
                        runs[path].append(self.run_once(path, adapter, bodies, concurrency))
                        if profile is not None:
                            cell["profile"] = profile.stop()
                for path in ("direct", "gateway"):
                    cell[path] = self.summary(path, runs[path])
                    log(f"{key} {path}: {json.dumps({k: v for k, v in cell[path].items() if k != 'rounds'})}")
                if self.llama.process.poll() is not None or not (cell["direct"]["ok"] and cell["gateway"]["ok"]):
                    # Not a result: kept apart with its errors, and the sweep stops so that a rerun measures it again
                    # (llama-server 0.3.36 aborted once in CUDA-graph updates at 256 LoRA streams: see README).
                    cell["llama_server_exit"] = self.llama.process.poll()
                    cell["llama_server_log_tail"] = tail(self.work / "llama-server.log", 3000)
                    results.setdefault("failed_cells", {})[key] = cell
                    write_json(Path(a.out), results, a.mirror)
                    raise RuntimeError(f"{key} failed (llama-server exit {cell['llama_server_exit']}); see failed_cells")
                cell["ratios"] = ratios(cell["direct"], cell["gateway"])
                last_pair = (n, time.monotonic() - pair_start)
                results["cells"][key] = cell
                results.pop("stopped_before", None)
                write_json(Path(a.out), results, a.mirror)

    def profiler(self, key: str) -> Profile | None:
        if not self.args.py_spy or not Path(self.args.py_spy).exists():
            log(f"no profile of {key}: no py-spy at {self.args.py_spy!r}")
            return None
        return Profile(self.args.py_spy, self.gateway.pid, self.work / f"profile-{key.replace('/', '-')}.txt")


class Profile:
    """py-spy sampling the gateway (native frames too) during one run; stop() returns the top frames."""

    def __init__(self, py_spy: str, pid: int, out: Path) -> None:
        self.out = out
        argv = [py_spy, "record", "--pid", str(pid), "--rate", "100", "--native", "--gil", "--format", "raw",
                "--output", str(out)]  # --native needs py-spy to pause the process per sample: 100 Hz
        log("profile: " + " ".join(argv))
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> dict:
        self.process.send_signal(2)  # SIGINT: py-spy writes what it sampled and exits
        try:
            _, err = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return {"error": "py-spy did not stop in 60 s"}
        if not self.out.exists():
            return {"error": f"py-spy wrote nothing (exit {self.process.returncode}): {err.decode()[-400:]}"}
        return top_frames(self.out.read_text())


LINE = re.compile(r":\d+\)$")


def top_frames(collapsed: str, most: int = 25) -> dict:
    """py-spy's raw (collapsed) stacks -> the frames with the most samples on top of the stack (self) and
    anywhere in it (total), as shares of all samples."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [LINE.sub(")", frame) for frame in stack.split(";")]  # by function, not by line
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + n
    share = lambda table: [[frame, round(n / samples, 4)] for frame, n in  # noqa: E731
                           sorted(table.items(), key=lambda kv: -kv[1])[:most]] if samples else []
    return {"samples": samples, "self": share(own), "total": share(total)}


def tail(path: Path, size: int) -> str:
    try:
        return path.read_bytes()[-size:].decode(errors="replace")
    except OSError as exc:
        return f"unreadable: {exc}"


def ratios(direct: dict, gateway: dict) -> dict:
    out = {}
    for field in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "output_tokens_per_s",
                  "requests_per_s"):
        d, g = direct.get(field), gateway.get(field)
        out[field] = round(g / d, 4) if d and g is not None else None
    if direct.get("ttft_p50_ms") is not None and gateway.get("ttft_p50_ms") is not None:
        out["added_ttft_p50_ms"] = round(gateway["ttft_p50_ms"] - direct["ttft_p50_ms"], 3)
    return out


def write_json(path: Path, data: dict, mirror: str = "") -> None:
    text = json.dumps(data, indent=1) + "\n"
    for target in (path, *([Path(mirror, path.name)] if mirror else [])):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)


def command_output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc}"


def machine_facts(args) -> dict:
    import httptools
    import orjson
    import uvicorn
    import uvloop
    llama_version = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True, timeout=30)
    return {
        "gpu": command_output(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                               "--format=csv,noheader"]),
        "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), platform.processor()),
        "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "llama_server_version": (llama_version.stdout + llama_version.stderr).strip()[-400:],
        "uvicorn": uvicorn.__version__, "uvloop": uvloop.__version__, "httptools": httptools.__version__,
        "orjson": orjson.__version__, "gateway_commit": os.environ.get("KIMI_BENCH_COMMIT", "unknown"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--lora", action="append", required=True, help="two adapters: the first is measured")
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", default="/tmp/kimi-bench-gpu")
    parser.add_argument("--concurrency", default="1,8,32,64,128,256")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-mix", default="512:7,4096:1", help="prompt tokens:weight,…")
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--max-requests", type=int, default=128)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--ctx-per-slot", type=int, default=4352, help="KV tokens of each slot (the longest prompt,"
                        " the chat template and max tokens fit)")
    parser.add_argument("--kv-type", default="q8_0", help="-ctk/-ctv: q8_0 fits 256 slots × 4,352 tokens of an 8B in"
                        " 78 GB; f16 would need 146 GB")
    parser.add_argument("--flash-attn", default="on")
    parser.add_argument("--kv-unified", action="store_true", help="one KV buffer of --ctx tokens for all slots")
    parser.add_argument("--ctx", type=int, default=524288, help="with --kv-unified: its total KV tokens")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per cell, ordered A B B A …")
    parser.add_argument("--profile-cell", default="c256/base", help="py-spy the gateway during this cell's first gateway run")
    parser.add_argument("--py-spy", default="", help="the py-spy binary (no profile without it)")
    parser.add_argument("--ngl", type=int, default=99)
    parser.add_argument("--llama-threads", type=int, default=None)
    parser.add_argument("--llama-arg", action="append", default=[], help="one more llama-server argument")
    parser.add_argument("--llama-cpus", default="", help="taskset list for llama-server")
    parser.add_argument("--gateway-cpu", default="", help="taskset list for the gateway (one core)")
    parser.add_argument("--ready-timeout-s", type=float, default=300)
    parser.add_argument("--pid-dir", default="", help="write the pids of the servers started here (for cleanup)")
    parser.add_argument("--mirror", default="", help="also copy the results file into this folder after each cell")
    parser.add_argument("--deadline-s", type=float, default=1e9, help="stop before a cell that would end later")
    args = parser.parse_args(argv)
    if len(args.lora) != 2:
        parser.error("give two --lora files")
    started = time.monotonic()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"cells": {}}
    bench = Bench(args)
    try:
        bench.start_llama()
        bench.start_gateway()
        run = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "llama_argv": bench.llama_argv,
               "gateway_argv": bench.gateway_argv, "llama_ready_s": round(bench.llama_ready_s, 1),
               "bench_argv": sys.argv, "machine": machine_facts(args),
               "env": {k: v for k, v in os.environ.items() if k.startswith(("GGML_", "CUDA_", "LLAMA_"))},
               "adapter_ready_s": round(bench.wait_adapters(), 1), "sanity": bench.sanity()}
        results.setdefault("runs", []).append(run)
        results["settings"] = {k: getattr(args, k) for k in ("model", "lora", "concurrency", "max_tokens",
                                                              "prompt_mix", "requests_per_stream", "min_requests",
                                                              "max_requests", "slots", "ctx", "ctx_per_slot",
                                                              "kv_type", "flash_attn", "kv_unified", "rounds",
                                                              "llama_cpus", "gateway_cpu")}
        write_json(out, results, args.mirror)
        warm = make_bodies(4, parse_mix(args.prompt_mix), 8, seed=99)
        for path in ("direct", "gateway"):
            for adapter in (None, ADAPTER_ROUTE):
                bench.run_path(path, adapter, warm, 4)
        bench.sweep(results, started)
        write_json(out, results, args.mirror)
    finally:
        bench.stop()
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    print(f"{'cell':<18}{'path':<9}{'ok':>5}{'ttft50':>9}{'ttft99':>9}{'itl50':>8}{'itl99':>8}{'tok/s':>9}"
          f"{'req/s':>8}{'cpu/req':>9}{'rss':>7}")
    for key, cell in results["cells"].items():
        for path in ("direct", "gateway"):
            r = cell[path]
            print(f"{key:<18}{path:<9}{r['ok']:>5}{r['ttft_p50_ms'] or 0:>9.1f}{r['ttft_p99_ms'] or 0:>9.1f}"
                  f"{r['itl_p50_ms'] or 0:>8.2f}{r['itl_p99_ms'] or 0:>8.2f}{r['output_tokens_per_s'] or 0:>9.1f}"
                  f"{r['requests_per_s'] or 0:>8.2f}{r.get('gateway_cpu_us_per_request', 0):>9.0f}"
                  f"{r.get('rss_mib', 0):>7.0f}")
        print(f"{'':<18}{'ratio':<9}{json.dumps(cell['ratios'])}")


if __name__ == "__main__":
    sys.exit(main())
