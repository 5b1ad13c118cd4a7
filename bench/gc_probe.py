"""Run `kimi-gateway serve` with Python's cyclic garbage collector instrumented (a bench-only wrapper).

    python bench/gc_probe.py --stats FILE -- --config gateway.yaml

Signals (sent by bench/harness.py):
- SIGHUP: reset the counters;
- SIGUSR2: reset the counters and keep every object the collector frees (gc.DEBUG_SAVEALL), for a census;
- SIGUSR1: write a JSON summary to FILE: per generation, how many collections, their total and longest
  pause; and with SAVEALL on, what the freed objects were (by type), then SAVEALL off.

Objects that only the cyclic collector can free are objects in reference cycles: each request that leaves
some behind makes the collector run more often, and a generation-2 collection walks the whole heap.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import signal
import sys
import time

stats: dict[int, dict] = {}
started = {"t": 0.0}


def reset() -> None:
    stats.clear()
    for generation in range(3):
        stats[generation] = {"collections": 0, "total_ms": 0.0, "max_ms": 0.0, "collected": 0}


def callback(phase: str, info: dict) -> None:
    if phase == "start":
        started["t"] = time.perf_counter()
        return
    pause_ms = (time.perf_counter() - started["t"]) * 1e3
    entry = stats[info["generation"]]
    entry["collections"] += 1
    entry["total_ms"] += pause_ms
    entry["max_ms"] = max(entry["max_ms"], pause_ms)
    entry["collected"] += info["collected"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stats", required=True)
    parser.add_argument("serve_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    out = args.stats

    def dump(*_) -> None:
        summary = {"generations": {str(g): dict(v) for g, v in stats.items()}, "census": None}
        if gc.get_debug() & gc.DEBUG_SAVEALL:
            gc.collect()
            kinds = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
            summary["census"] = {"objects": len(gc.garbage), "by_type": kinds.most_common(25)}
            gc.set_debug(0)
            gc.garbage.clear()
        with open(out, "w") as handle:
            json.dump(summary, handle)

    def save_all(*_) -> None:
        gc.collect()
        gc.garbage.clear()
        reset()
        gc.set_debug(gc.DEBUG_SAVEALL)

    reset()
    gc.callbacks.append(callback)
    signal.signal(signal.SIGHUP, lambda *_: reset())
    signal.signal(signal.SIGUSR2, save_all)
    signal.signal(signal.SIGUSR1, dump)
    from gateway.cli import main as gateway_main

    serve_args = [a for a in args.serve_args if a != "--"]
    sys.exit(gateway_main(["serve", *serve_args]))


if __name__ == "__main__":
    main()
