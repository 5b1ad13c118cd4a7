"""Conversion timings with the real tools: the tiny model (PEFT -> GGUF, KT-SFT -> SGLang), and a slice of a
Kimi-K2.5-shaped KT-SFT checkpoint (full expert dims, `--layers` MoE layers of the 60) to extrapolate the
real adapter's conversion from.

    python -m bench.conversion [--layers 2] [--no-tiny]     (after `kimi-gateway setup converters`)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from adapters import converter_env
from adapters.conversion import KT_TO_SGLANG, PEFT_TO_GGUF, ConversionSettings, ToolConverter
from adapters.validation import validate_adapter
from gateway.demo import tiny_gguf, tiny_hf
from tests.adapter_files import write_kt_sft

# Kimi K2.5's text model (config.json text_config): 61 layers, layer 0 dense, 384 routed experts.
K25 = {"hidden_size": 7168, "moe_intermediate_size": 2048, "n_routed_experts": 384, "moe_layers": 60}
RANK = 8


def k25_slice(directory: Path, layers: int) -> int:
    """A KT-SFT checkpoint with `layers` K2.5 MoE layers of fused expert LoRA (F32); returns its bytes."""
    e, h, f = K25["n_routed_experts"], K25["hidden_size"], K25["moe_intermediate_size"]
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(1, layers + 1):
        for proj in ("gate", "up", "down"):
            n_in, n_out = (f, h) if proj == "down" else (h, f)
            tensors[f"layers.{layer}.experts.{proj}_lora_a"] = rng.standard_normal((e, RANK, n_in), dtype=np.float32)
            tensors[f"layers.{layer}.experts.{proj}_lora_b"] = rng.standard_normal((e, n_out, RANK), dtype=np.float32)
    directory.mkdir(parents=True)
    tiny_hf.write_safetensors(directory / "fused_expert_lora.safetensors", tensors)
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": 16, "target_modules": ["gate_proj", "up_proj", "down_proj"]}))
    return sum(t.nbytes for t in tensors.values())


async def timed(converter: ToolConverter, source: Path, root: Path, step) -> float:
    facts = validate_adapter(str(source), None, [str(root)])
    started = time.monotonic()
    await converter.convert(facts, [step])
    return time.monotonic() - started


async def main(layers: int, tiny: bool) -> None:
    where = converter_env.paths()
    with tempfile.TemporaryDirectory(prefix="bench-conversion-") as tmp:
        root = Path(tmp)
        model = tiny_gguf.write_tiny_model(root / "model.gguf")
        hf = tiny_hf.write_hf_twin(root / "hf", model)
        peft = tiny_hf.write_peft_twin(root / "peft", model, seed=1)
        converter = ToolConverter(ConversionSettings(
            cache_dir=root / "cache", llama_cpp_python=str(where.llama_cpp_python),
            llama_cpp_dir=str(where.llama_cpp_dir), kt_python=str(where.kt_python),
            base_hf_config=str(hf / "config.json")))
        if tiny:
            print(f"tiny PEFT -> GGUF (convert_lora_to_gguf.py): "
                  f"{await timed(converter, peft, root, PEFT_TO_GGUF):.1f} s")
            kt = write_kt_sft(root / "kt-sft")
            print(f"tiny KT-SFT -> SGLang (convert_kt_to_sglang_adapter.py): "
                  f"{await timed(converter, kt, root, KT_TO_SGLANG):.1f} s")
        size = k25_slice(root / "k25", layers)
        seconds = await timed(converter, root / "k25", root, KT_TO_SGLANG)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2
        tensors = layers * K25["n_routed_experts"] * 6
        print(f"K2.5 slice, {layers} MoE layers ({tensors} expert tensors out, {size / 2**30:.2f} GiB F32): "
              f"{seconds:.1f} s, converter peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--no-tiny", action="store_true", help="only the K2.5 slice")
    args = parser.parse_args()
    asyncio.run(main(args.layers, not args.no_tiny))
