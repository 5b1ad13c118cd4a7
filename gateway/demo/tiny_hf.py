"""The tiny GGUF model's HF-format twin (config.json + model.safetensors with the same weights), and PEFT
adapters of known A/B matrices, so that the real converters can run on the tiny model family.

Names and layout follow what llama.cpp's convert_hf_to_gguf.py maps for a `LlamaForCausalLM`: HF
`model.layers.N.self_attn.q_proj.weight` becomes `blk.N.attn_q.weight`, with q and k rows permuted for
llama.cpp's rotary layout (conversion/llama.py `LlamaModel.permute`). The twin stores q and k un-permuted,
so converting it gives exactly the tiny GGUF's tensors; a PEFT lora_B for q/k is un-permuted the same way,
so converting it gives exactly the GGUF LoRA written directly from the same matrices.
Written with numpy alone (the safetensors format is a JSON header + raw little-endian data).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Mapping

import gguf
import numpy as np

from gateway.demo import tiny_gguf

# GGUF tensor kind -> HF module (llama.cpp gguf-py tensor_mapping for LLAMA).
HF_OF_GGUF = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
TOP_LEVEL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
PEFT_PREFIX = "base_model.model."


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> Path:
    """F32 tensors in the safetensors format, in the given order."""
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)          # the format aligns the data section to 8 bytes
    path = Path(path)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            handle.write(blob)
    return path


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every F32 tensor of a safetensors file (what the converters write for F32 input)."""
    raw = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    data = raw[8 + length:]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] != "F32":
            raise ValueError(f"{path}: {name} is {entry['dtype']}, only F32 is read here")
        start, stop = entry["data_offsets"]
        tensors[name] = np.frombuffer(data[start:stop], dtype="<f4").reshape(entry["shape"])
    return tensors


def unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama.cpp's `LlamaModel.permute` along axis 0 (HF rotary half-split layout)."""
    return rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def heads_of(gguf_name: str) -> int | None:
    """How many heads llama.cpp permutes a tensor's rows by (q: heads, k: KV heads), None when it doesn't."""
    kind = gguf_name.split(".")[-2]
    return {"attn_q": tiny_gguf.N_HEAD, "attn_k": tiny_gguf.N_HEAD_KV}.get(kind)


def hf_name(gguf_name: str) -> str:
    if gguf_name in TOP_LEVEL:
        return TOP_LEVEL[gguf_name]
    _, layer, kind, _ = gguf_name.split(".")
    return f"model.layers.{layer}.{HF_OF_GGUF[kind]}.weight"


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(path)
    return {t.name: np.array(t.data).reshape(tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}


def write_hf_twin(directory: Path, model_gguf: Path) -> Path:
    """config.json + model.safetensors holding the GGUF model's weights under their HF names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, array in gguf_tensors(model_gguf).items():
        heads = heads_of(name)
        tensors[hf_name(name)] = unpermute(array, heads) if heads else array
    write_safetensors(directory / "model.safetensors", dict(sorted(tensors.items())))
    tiny_gguf.write_tiny_hf_config(directory / "config.json")
    return directory


def lora_matrices(base_model: Path, *, seed: int, rank: int = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GGUF base tensor name -> (A (rank, in), B (out, rank)): exactly the matrices write_tiny_lora draws."""
    _, shapes = tiny_gguf._lora_targets(Path(base_model))
    rng = np.random.default_rng(seed)
    matrices = {}
    for name, (n_out, n_in) in shapes.items():
        a = rng.normal(0.0, tiny_gguf.LORA_STD, (rank, n_in)).astype(np.float32)
        b = rng.normal(0.0, tiny_gguf.LORA_STD, (n_out, rank)).astype(np.float32)
        matrices[name] = (a, b)
    return matrices


def write_peft_twin(directory: Path, base_model: Path, *, seed: int, rank: int = 4, alpha: float = 4.0,
                    base_name_or_path: str = "tiny-synthetic-llama") -> Path:
    """The PEFT adapter (as LLaMA-Factory writes it) whose GGUF conversion is write_tiny_lora(seed=seed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, modules = {}, set()
    for name, (a, b) in lora_matrices(base_model, seed=seed, rank=rank).items():
        heads = heads_of(name)
        module = hf_name(name).removesuffix(".weight")
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = unpermute(b, heads) if heads else b
        modules.add(module.rsplit(".", 1)[-1])
    write_safetensors(directory / "adapter_model.safetensors", tensors)
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(modules), "bias": "none",
        "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name_or_path, "lora_dropout": 0.0,
    }, indent=2) + "\n")
    return directory
