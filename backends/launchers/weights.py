"""WeightSizes: what a model directory's safetensors headers say about its MoE experts and the rest (no tensor
data is read), and the size estimates the launch preflight checks disk and RAM against."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
EXPERT_MARK = ".mlp.experts."
INT4_PER_I32 = 8              # compressed-tensors packs eight INT4 values in each int32 (`weight_packed`)
INT8_SCALE_OVERHEAD = 1.02    # per-channel scales beside the INT8 weights: a 2% margin


class WeightsError(ValueError):
    """A header that cannot be read; the message names the file."""


def read_header(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 1024 * 1024:
                raise WeightsError(f"{path}: safetensors header of {length} bytes is not plausible")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    header.pop("__metadata__", None)
    return header


@dataclass(frozen=True)
class WeightSizes:
    expert_params: int        # MoE expert weights, counted unpacked (an INT4 value is one parameter)
    expert_bytes: int         # the expert tensors as stored (packed weights, scales, shapes)
    other_bytes: int          # everything else: attention, dense and shared layers, embeddings
    files: int

    @property
    def bf16_bytes(self) -> int:
        """The INT4 -> BF16 output: experts unpacked to two bytes each, the rest as it is."""
        return self.expert_params * 2 + self.other_bytes

    @property
    def int8_bytes(self) -> int:
        """convert_cpu_weights.py --quant-method int8: one byte per expert parameter plus scales, and a copy
        of the non-expert shard (reference/sglang-kt.md §3.2)."""
        return int(self.expert_params * INT8_SCALE_OVERHEAD) + self.other_bytes

    def cpu_expert_bytes(self, kt_method: str) -> int:
        """What the CPU experts take in RAM: INT8 weights for AMXINT8, the stored INT4 tensors for RAWINT4."""
        return int(self.expert_params * INT8_SCALE_OVERHEAD) if kt_method == "AMXINT8" else self.expert_bytes


def scan_weights(directory: Path) -> WeightSizes:
    expert_params = expert_bytes = other_bytes = files = 0
    for path in sorted(directory.glob("*.safetensors")):
        files += 1
        for key, info in read_header(path).items():
            shape, dtype = info.get("shape") or [], info.get("dtype", "")
            start, end = (info.get("data_offsets") or [0, 0])[:2]
            stored = end - start
            if EXPERT_MARK not in key:
                other_bytes += stored
                continue
            expert_bytes += stored
            count = 1
            for dim in shape:
                count *= dim
            if key.endswith(".weight_packed") and dtype == "I32":
                expert_params += count * INT4_PER_I32
            elif key.endswith(".weight"):
                expert_params += count
    if files == 0:
        raise WeightsError(f"{directory}: no *.safetensors files")
    return WeightSizes(expert_params, expert_bytes, other_bytes, files)
