"""Stand-in for kt-kernel/scripts/convert_kt_to_sglang_adapter.py: its CLI (reference/sglang-kt.md §3.4), the
input check it makes (a KT-SFT dir with fused_expert_lora.safetensors) and its output files' names."""
import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("input_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--base-model-name-or-path", required=True)
    parser.add_argument("--lora-alpha", type=float)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--expert-output-dir")
    parser.add_argument("--nonexpert-output-dir")
    args = parser.parse_args()
    if not (Path(args.input_dir) / "fused_expert_lora.safetensors").is_file():
        print("no fused_expert_lora.safetensors in the input", file=sys.stderr)
        return 1
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                            "base_model_name_or_path": args.base_model_name_or_path}))
    (output / "adapter_model.safetensors").write_bytes(b"")
    (output / "standin-argv.json").write_text(json.dumps(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
