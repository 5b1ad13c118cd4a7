"""Stand-in for kt-kernel's convert_kt_to_sglang_adapter.py: its CLI (reference/sglang-kt.md §3.4), the
input check it makes (a KT-SFT dir with fused_expert_lora.safetensors) and its output's form: per-expert PEFT
keys `model.layers.{L}.mlp.experts.{E}.{proj}_proj.lora_{A|B}.weight` with the fused tensors' shapes (zeros: the
values are the real converter's business, tests/integration/test_conversion_live.py checks those)."""
import argparse
import json
import re
import struct
import sys
from pathlib import Path

FUSED_KEY = re.compile(r"^layers\.(\d+)\.experts\.(gate|up|down)_lora_(a|b)$")


def read_header(path: Path) -> dict:
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        return json.loads(handle.read(size))


def write_zeros(path: Path, shapes: dict[str, list[int]]) -> None:
    """A safetensors file of F32 zeros with these tensor shapes."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 4
        for dim in shape:
            size *= dim
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(offset))


def per_expert(fused: dict) -> dict[str, list[int]]:
    shapes = {}
    for key, info in fused.items():
        match = FUSED_KEY.match(key)
        if match is None:
            continue
        layer, proj, part = match.groups()
        experts, *shape = info["shape"]
        for expert in range(experts):
            shapes[f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.lora_{part.upper()}.weight"] = shape
    return shapes


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
    config = json.loads((Path(args.input_dir) / "adapter_config.json").read_text())
    (output / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": config["r"], "lora_alpha": config.get("lora_alpha", 16),
        "target_modules": ["gate_proj", "up_proj", "down_proj"],
        "base_model_name_or_path": args.base_model_name_or_path}))
    write_zeros(output / "adapter_model.safetensors",
                per_expert(read_header(Path(args.input_dir) / "fused_expert_lora.safetensors")))
    (output / "standin-argv.json").write_text(json.dumps(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
