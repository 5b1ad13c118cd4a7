"""Results JSON of bench/gpu/bench.py -> the markdown table in bench/README.md (between its gpu-table markers).

    python bench/gpu/report.py bench/gpu/results/2026-12-01-q8_0.json [--readme bench/README.md]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

START, END = "<!-- gpu-table:start -->", "<!-- gpu-table:end -->"


def fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def signed(value) -> str:
    return "–" if value is None else f"{value:+,.1f}"


def ratio(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def own(r: dict) -> str:
    """The gateway's own time before the response head, from its Server-Timing header (absent in older runs)."""
    if r.get("gateway_own_p50_ms") is None:
        return "–"
    return f"{r['gateway_own_p50_ms']:.3f} / {r['gateway_own_p99_ms']:.3f}"


def profiles(results: dict, most: int = 12) -> list[str]:
    """py-spy's top frames of the gateway in the profiled cell (self time: where the CPU really was)."""
    lines = []
    for key, cell in results["cells"].items():
        profile = cell.get("profile")
        if not profile:
            continue
        if profile.get("error"):
            lines += ["", f"Profile of the gateway in `{key}`: {profile['error']}"]
            continue
        lines += ["", f"Profile of the gateway in `{key}` (py-spy, native frames, {profile['samples']:,} samples; "
                  f"share of samples with the frame on top of the stack):", "",
                  "| frame | self |", "|---|---:|"]
        lines += [f"| `{frame[:110]}` | {share:.1%} |" for frame, share in profile["self"][:most]]
    return lines


def table(results: dict, name: str) -> str:
    run = results["runs"][-1]
    machine = run["machine"]
    settings = results["settings"]
    if settings.get("kv_unified", True):
        kv = f"{settings['ctx']:,} KV tokens shared"
    else:
        kv = (f"{settings['ctx_per_slot']:,} KV tokens each, {settings['kv_type']} KV, flash attention "
              f"{settings['flash_attn']}")
    rounds = settings.get("rounds", 1)
    lines = [
        f"Results file: `{name}`. Model: `{Path(settings['model']).name}` ({settings['slots']} slots, {kv}), "
        f"prompts `{settings['prompt_mix']}` (tokens:weight), "
        f"{settings['max_tokens']} tokens out, greedy; requests per cell = "
        f"max(streams, clamp({settings['requests_per_stream']} × streams, {settings['min_requests']}, "
        f"{settings['max_requests']})) per path and round; {rounds} round{'s' if rounds > 1 else ''} per cell "
        f"(A B B A …), each path's figures over its rounds pooled.",
        f"Machine: {machine['gpu']}; {machine['cpu']}, {machine['cores']} cores; Python {machine['python']}, "
        f"uvicorn {machine['uvicorn']}, uvloop {machine['uvloop']}, httptools {machine['httptools']}; "
        f"gateway commit {machine['gateway_commit']}.",
        f"llama-server: `{' / '.join(machine['llama_server_version'].splitlines())}` (llama-cpp-python 0.3.36's "
        f"vendor/llama.cpp, CUDA 13.0, sm_90).",
        f"Sanity (greedy, 12 tokens): same text direct and through the gateway: "
        f"{run['sanity']['same_text_direct_and_gateway']}; the adapter changes the text: "
        f"{run['sanity']['adapter_changes_text']}.",
        "",
        "| streams | adapter | path | ok | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | output tok/s | req/s "
        "| gateway's own ms p50 / p99 | gateway CPU µs/req | µs/token | RSS MiB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in results["cells"].values():
        adapter = cell["adapter"] or "none"
        for path in ("direct", "gateway"):
            r = cell[path]
            gw = path == "gateway"
            lines.append(
                f"| {cell['concurrency']} | {adapter} | {path} | {r['ok']}/{r['requests']} | {fmt(r['ttft_p50_ms'])} "
                f"| {fmt(r['ttft_p99_ms'])} | {fmt(r['itl_p50_ms'], 2)} | {fmt(r['itl_p99_ms'], 2)} "
                f"| {fmt(r['output_tokens_per_s'])} | {fmt(r['requests_per_s'], 2)} "
                f"| {own(r) if gw else ''} "
                f"| {fmt(r.get('gateway_cpu_us_per_request'), 0) if gw else ''} "
                f"| {fmt(r.get('gateway_cpu_us_per_token'), 1) if gw else ''} "
                f"| {fmt(r.get('rss_mib'), 0) if gw else ''} |")
        q = cell["ratios"]
        lines.append(
            f"| {cell['concurrency']} | {adapter} | **gateway/direct** | | {ratio(q['ttft_p50_ms'])} "
            f"({signed(q.get('added_ttft_p50_ms'))} ms) | {ratio(q['ttft_p99_ms'])} | {ratio(q['itl_p50_ms'])} "
            f"| {ratio(q['itl_p99_ms'])} | **{ratio(q['output_tokens_per_s'])}** | {ratio(q['requests_per_s'])} "
            f"| | | | |")
    lines += profiles(results)
    if results.get("stopped_before"):
        lines.append(f"\nNot measured (the device time ran out): from `{results['stopped_before']}` on.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+")
    parser.add_argument("--readme", help="rewrite the block between the gpu-table markers of this file")
    args = parser.parse_args()
    text = "\n\n".join(table(json.loads(Path(p).read_text()), Path(p).name) for p in args.results)
    if not args.readme:
        print(text)
        return 0
    readme = Path(args.readme)
    body = readme.read_text()
    if START not in body or END not in body:
        print(f"{readme} has no {START} … {END} block", file=sys.stderr)
        return 1
    readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{text}\n{END}",
                             body, flags=re.S))
    return 0


if __name__ == "__main__":
    sys.exit(main())
