"""Stand-in for `python -m sglang.launch_server` (sglang-kt 0.7.2), selected by a launch block's
`server_command`: it takes the launcher's argv with the real flag names (reference/sglang-kt.md §1.5, §3.1,
§4; `allow_abbrev=False`, so a removed name such as `--kt-amx-method` exits 2 as it would there), refuses
paths that do not exist, and then serves the SGLang emulator (tests/emulators/sglang.py).

`SGLANG_STANDIN_EXIT=<code>` makes it exit at once with that code (a server that crashes on start)."""
from __future__ import annotations

import argparse
import os
import sys

from tests.emulators import sglang as emulator

KT_METHODS = ["AMXINT4", "AMXINT8", "RAWINT4", "FP8", "BF16", "FP8_PERCHANNEL", "GPTQ_INT4", "SYCL_GPTQ_INT4",
              "MXFP4", "MXFP8", "LLAMAFILE", "MOE_INT4", "MOE_INT8"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sglang.launch_server", allow_abbrev=False)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--served-model-name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--tensor-parallel-size", "--tp-size", type=int, default=1)
    parser.add_argument("--kt-method", default="AMXINT4", choices=KT_METHODS)
    parser.add_argument("--kt-weight-path")
    for flag in ("--kt-cpuinfer", "--kt-threadpool-count", "--kt-num-gpu-experts",
                 "--kt-max-deferred-experts-per-token", "--kt-gpu-prefill-token-threshold", "--context-length",
                 "--max-running-requests", "--max-loras-per-batch", "--max-loaded-loras", "--max-lora-rank"):
        parser.add_argument(flag, type=int)
    parser.add_argument("--mem-fraction-static", type=float)
    parser.add_argument("--reasoning-parser")
    parser.add_argument("--tool-call-parser")
    parser.add_argument("--enable-metrics", action="store_true")
    parser.add_argument("--enable-lora", action="store_true", default=None)
    parser.add_argument("--lora-backend", default="csgmv", choices=["triton", "csgmv", "ascend", "torch_native"])
    parser.add_argument("--lora-paths", nargs="*", default=[])
    parser.add_argument("--lora-target-modules", nargs="*")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    print(f"stand-in sglang.launch_server: pid {os.getpid()}, port {args.port}", flush=True)
    if code := os.environ.get("SGLANG_STANDIN_EXIT"):
        print(f"stand-in: exiting with {code} as asked (SGLANG_STANDIN_EXIT)", flush=True)
        sys.exit(int(code))
    for flag, path in (("--model-path", args.model_path), ("--kt-weight-path", args.kt_weight_path)):
        if path is not None and not os.path.isdir(path):
            print(f"FileNotFoundError: {flag} {path} is not a directory", file=sys.stderr, flush=True)
            sys.exit(1)
    forwarded = ["--port", str(args.port), "--host", args.host, "--model-path", args.model_path,
                 "--max-loras-per-batch", str(args.max_loras_per_batch or 8)]
    if args.served_model_name:
        forwarded += ["--served-model-name", args.served_model_name]
    if args.lora_paths:
        forwarded += ["--lora-paths", *args.lora_paths]
    if args.enable_lora:
        forwarded.append("--enable-lora")
    for flag, value in (("--max-loaded-loras", args.max_loaded_loras), ("--max-lora-rank", args.max_lora_rank),
                        ("--reasoning-parser", args.reasoning_parser), ("--tool-call-parser", args.tool_call_parser),
                        ("--context-length", args.context_length)):
        if value is not None:
            forwarded += [flag, str(value)]
    if args.enable_metrics:
        forwarded.append("--enable-metrics")
    emulator.main(forwarded)


if __name__ == "__main__":
    main()
