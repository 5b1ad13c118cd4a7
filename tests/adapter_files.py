"""PEFT adapter directories for tests: adapter_config.json + a safetensors file with real headers."""
import json
import struct
from pathlib import Path


def write_safetensors(path: Path, tensors: dict[str, list[int]], *, truncate_to: int | None = None) -> None:
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + b"\0" * offset
    path.write_bytes(data[:truncate_to] if truncate_to is not None else data)


def write_peft(directory: Path, *, r: int = 8, shape_r: int | None = None, experts: bool = False, **config) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj"], **config}))
    rank = shape_r or r
    prefix = "base_model.model.model.layers.0." + ("mlp.experts.0.gate_proj" if experts else "self_attn.q_proj")
    write_safetensors(directory / "adapter_model.safetensors",
                      {f"{prefix}.lora_A.weight": [rank, 64], f"{prefix}.lora_B.weight": [64, rank]})
    return directory
