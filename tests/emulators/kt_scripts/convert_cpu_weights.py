"""Stand-in for kt-kernel/scripts/convert_cpu_weights.py (not on PyPI): the exact CLI of reference/sglang-kt.md
§3.2, no more lenient (unknown flags and bad choices exit 2 as argparse does). It reads the input's config.json
and safetensors names, writes the output layout's index and a record of its own argv (`standin-argv.json`)."""
import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--input-path", "-i", required=True)
    parser.add_argument("--input-type", required=True, choices=["awq", "fp8", "fp16", "bf16"])
    parser.add_argument("--output", "-o", required=True)
    parser.add_argument("--quant-method", default="int4", choices=["int4", "int8", "awq", "moe_int4", "moe_int8"])
    parser.add_argument("--cpuinfer-threads", type=int, default=60)
    parser.add_argument("--threadpool-count", type=int, default=2)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--no-merge-safetensor", action="store_true")
    parser.add_argument("--resume-layer", type=int, default=0)
    parser.add_argument("--save-backward-weights", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    source = Path(args.input_path)
    if not (source / "config.json").is_file():
        print(f"FileNotFoundError: {source / 'config.json'}", file=sys.stderr)
        return 1
    output = Path(args.output)  # written directly into --output (§3.2)
    output.mkdir(parents=True, exist_ok=True)
    (output / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    (output / "standin-argv.json").write_text(json.dumps(sys.argv[1:]))
    print(f"converted {source} -> {output} ({args.quant_method}, {args.threadpool_count} NUMA pools)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
