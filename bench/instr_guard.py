"""Instruction-count regression guard for the data plane (issue 22): CPU instructions per request, counted by
callgrind, against the budget in bench/instr_budget.json.

    bench/instr-check                       # measure, compare, exit 1 when a figure is over its budget
    bench/instr-check --update              # measure and write the figures as the new budget (say why in the commit)
    python bench/instr_guard.py --inner ... # (what valgrind runs; not for people)

Why instructions and not time: on these shared 2-core VMs wall and CPU time move 2-3x between runs, while the
instruction count of the same work is stable to a fraction of a percent, so a change that adds per-request
work shows up in review as a number. It is not a test-suite assertion and never looks at a clock.

What is counted: bench/dataplane_micro.py's in-process requests (no sockets, no HTTP server: the gateway's own
work), on a config with every per-request feature on: a client key with rpm/tpm limits, the default metrics,
the default sampling policy, the request-id and x-kimi-* headers. Three kinds: a chat completion with a JSON
reply, a streamed one (32 SGLang-shaped events), and `stream-llamacpp` (33 llama.cpp-shaped events, paced: a turn of
the loop before each, so each event is its own read, as from a GPU server writing one token at a time). Only the measured loop is counted: valgrind starts with
instrumentation off (start-up and imports run at near-native speed), a warm-up runs, then callgrind_control
switches instrumentation on and zeroes the counters, N requests run, and a dump is taken before exit.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUDGET = HERE / "instr_budget.json"
KINDS = {"json": dict(stream=False, requests=200), "stream": dict(stream=True, requests=60),
         "stream-llamacpp": dict(stream=True, llamacpp=True, requests=60)}
WARMUP = 300
TOLERANCE = 0.03   # over budget by more than this: fail (runs of the same code spread by up to 2%: README)


# ---------------------------------------------------------------- inside valgrind

SPIN = 20_000  # each turn of the wait below is one C call of this many iterations (subtracted by name afterwards)


def control(*args: str) -> None:
    """Ask callgrind (through callgrind_control) to act on this process, and keep executing while it does:
    callgrind reads commands every few thousand basic blocks of client code, so a blocking wait would hang.
    The wait spins inside builtin `sum`, whose inclusive cost measure() subtracts: how long callgrind_control
    (a Perl script) takes to start would otherwise add a varying count to the measured loop."""
    proc = subprocess.Popen(["callgrind_control", *args, str(os.getpid())], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        sum(range(SPIN))
    if proc.returncode != 0:
        raise SystemExit(f"callgrind_control {' '.join(args)} failed ({proc.returncode})")


async def inner(kind: str, requests: int) -> None:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import dataplane_micro
    app, scope, exchange, sent = dataplane_micro.build(KINDS[kind]["stream"], config=dataplane_micro.full_config(),
                                                       llamacpp=KINDS[kind].get("llamacpp", False))
    # The log writer wakes every 50 ms of wall time: under valgrind (about 50x slower) that would be 50x more
    # wake-ups per request than in a server, and a count that follows the machine's load.
    dataplane_micro.access_log(flush_s=2.5)
    for _ in range(WARMUP):
        await dataplane_micro.one(app, scope, exchange)
    assert sent[0]["status"] == 200, sent[:2]
    sent.clear()
    gc.collect()
    gc.freeze()   # as serve's lifespan does after start-up (gateway/app.py)
    control("--instr=on")
    control("--zero")
    for _ in range(requests):
        await dataplane_micro.one(app, scope, exchange)
    control("--dump=measured")
    assert len([m for m in sent if m["type"] == "http.response.start"]) == requests
    os._exit(0)  # interpreter teardown is not the data plane's


# ---------------------------------------------------------------- outside

def measure(kind: str, python: str, workdir: Path) -> dict:
    requests = KINDS[kind]["requests"]
    out = workdir / f"callgrind.{kind}.out"
    env = dict(os.environ, PYTHONHASHSEED="0")
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            python, str(Path(__file__).resolve()), "--inner", kind, "--requests", str(requests)]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800, cwd=HERE.parent)
    dumps = sorted(workdir.glob(f"callgrind.{kind}.out.*"))
    if done.returncode != 0 or not dumps:
        raise SystemExit(f"valgrind run for {kind} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    text = dumps[-1].read_text()
    total = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
    if total is None:
        raise SystemExit(f"no instruction total in {dumps[-1]}")
    instructions = int(total.group(1)) - spin_cost(dumps[-1])
    return {"requests": requests, "instructions": instructions,
            "per_request": round(instructions / requests), "seconds": round(time.monotonic() - started, 1),
            "dump": str(dumps[-1])}


def spin_cost(dump: Path) -> int:
    """Instructions spent in control()'s wait, inside builtin `sum` (inclusive: the range iteration too)."""
    annotated = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(dump)],
                               capture_output=True, text=True, check=True).stdout
    costs = [int(line.split()[0].replace(",", "")) for line in annotated.splitlines()
             if re.search(r":builtin_sum\b", line) and re.match(r"\s*[\d,]+ ", line)]
    return max(costs, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inner", choices=sorted(KINDS))
    parser.add_argument("--requests", type=int)
    parser.add_argument("--update", action="store_true", help="write the measured figures as the budget")
    parser.add_argument("--kinds", default=",".join(KINDS), help="which to measure: json,stream,stream-llamacpp")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--keep", help="keep the callgrind dumps in this folder (callgrind_annotate reads them)")
    args = parser.parse_args()
    if args.inner:
        import random

        import uvloop  # what `serve` runs on
        random.seed(0)
        uvloop.run(inner(args.inner, args.requests))
        return 0
    for tool in ("valgrind", "callgrind_control"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            raise SystemExit(f"{tool} is missing: apt-get install valgrind")
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kimi-instr-"))
    workdir.mkdir(parents=True, exist_ok=True)
    budget = json.loads(BUDGET.read_text()) if BUDGET.exists() else {"kinds": {}}
    failed = False
    measured = {}
    for kind in args.kinds.split(","):
        result = measure(kind, args.python, workdir)
        measured[kind] = result
        limit = budget["kinds"].get(kind, {}).get("per_request")
        line = f"{kind}: {result['per_request']:,} instructions per request ({result['requests']} requests, " \
               f"{result['seconds']} s under valgrind)"
        if limit is None:
            line += "; no budget recorded"
        else:
            ratio = result["per_request"] / limit
            over = ratio > 1 + TOLERANCE
            failed |= over
            line += f"; budget {limit:,} -> {ratio:.3f}x {'OVER BUDGET' if over else 'ok'}"
        print(line, flush=True)
    if args.update:
        for kind, result in measured.items():
            budget["kinds"][kind] = {"per_request": result["per_request"], "requests": result["requests"]}
        budget["tolerance"] = TOLERANCE
        budget["measured"] = time.strftime("%Y-%m-%d")
        BUDGET.write_text(json.dumps(budget, indent=1) + "\n")
        print(f"wrote {BUDGET}")
        return 0
    if failed:
        print(f"over budget by more than {TOLERANCE:.0%}: find the added work (callgrind_annotate on the dumps in "
              f"{workdir}, or --keep DIR), or raise the budget with --update and say why in the commit")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
