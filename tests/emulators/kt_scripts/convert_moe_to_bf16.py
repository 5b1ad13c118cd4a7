"""Stand-in for kt-kernel/scripts/convert_moe_to_bf16.py: its CLI (reference/sglang-kt.md §3.2:
`--model-dir [--output-dir] [--files] [--config-path] [--overwrite]`). Copies config.json, records its argv.
`STANDIN_FAIL=1` makes it fail half-way (after writing part of its output), like an interrupted run."""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--output-dir")
    parser.add_argument("--files", nargs="*")
    parser.add_argument("--config-path")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    output = Path(args.output_dir or args.model_dir)
    output.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(args.model_dir) / "config.json", output / "config.json")
    if os.environ.get("STANDIN_FAIL") == "1":
        print("RuntimeError: killed half-way", file=sys.stderr)
        return 1
    (output / "standin-argv.json").write_text(json.dumps(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
