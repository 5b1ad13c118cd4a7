"""PEFT adapter directories for tests: adapter_config.json + a safetensors file with real headers (F32, zeros).

`modules` maps a module path relative to the text model (`layers.0.self_attn.q_proj`) to the (out, in) of
the base module it adapts; the file then holds `<prefix><module>.lora_A.weight` (r, in) and `.lora_B.weight`
(out, r). TINY_LLAMA_MODULES fits gateway/demo/tiny_gguf.py's model; KIMI_MINI is a small Kimi-K2.5-shaped
(MLA + MoE, text model under `text_config`) config.json with adapter modules that fit it.
"""
import json
import struct
from pathlib import Path

import numpy as np

from gateway.demo import tiny_gguf

PEFT_PREFIX = "base_model.model.model."
KIMI_PREFIX = "base_model.model.language_model.model."


def write_safetensors(path: Path, tensors: dict[str, list[int]], *, truncate_to: int | None = None) -> None:
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + b"\0" * offset
    path.write_bytes(data[:truncate_to] if truncate_to is not None else data)


def write_peft(directory: Path, *, r: int = 8, shape_r: int | None = None, experts: bool = False,
               modules: dict[str, tuple[int, int]] | None = None, prefix: str = PEFT_PREFIX, **config) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj"], **config}))
    rank = shape_r or r
    if modules is None:
        modules = {"layers.0." + ("mlp.experts.0.gate_proj" if experts else "self_attn.q_proj"): (64, 64)}
    tensors = {}
    for module, (n_out, n_in) in modules.items():
        tensors[f"{prefix}{module}.lora_A.weight"] = [rank, n_in]
        tensors[f"{prefix}{module}.lora_B.weight"] = [n_out, rank]
    write_safetensors(directory / "adapter_model.safetensors", tensors)
    return directory


def tiny_llama_modules() -> dict[str, tuple[int, int]]:
    """Every linear layer of the tiny GGUF model, as PEFT modules with their (out, in)."""
    e, f, q, kv = tiny_gguf.N_EMBD, tiny_gguf.N_FF, tiny_gguf.N_HEAD * tiny_gguf.HEAD_DIM, \
        tiny_gguf.N_HEAD_KV * tiny_gguf.HEAD_DIM
    per_layer = {"self_attn.q_proj": (q, e), "self_attn.k_proj": (kv, e), "self_attn.v_proj": (kv, e),
                 "self_attn.o_proj": (e, q), "mlp.gate_proj": (f, e), "mlp.up_proj": (f, e), "mlp.down_proj": (e, f)}
    return {f"layers.{layer}.{name}": shape for layer in range(tiny_gguf.N_LAYER) for name, shape in per_layer.items()}


TINY_LLAMA_MODULES = tiny_llama_modules()

# Kimi K2.5's layout at toy size: hidden 32, 2 heads, MLA (q_lora 16, kv_lora 8, nope 8, rope 4, v 8),
# layer 0 dense (intermediate 48), layer 1 MoE (4 routed experts of 24, 1 shared).
KIMI_MINI = {
    "architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
    "vision_config": {"hidden_size": 16},
    "text_config": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
        "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 100, "q_lora_rank": 16,
        "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
        "n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1,
    },
}
KIMI_MINI_ATTENTION = {
    f"layers.{layer}.self_attn.{name}": shape for layer in (0, 1) for name, shape in {
        "q_a_proj": (16, 32), "q_b_proj": (2 * (8 + 4), 16), "kv_a_proj_with_mqa": (8 + 4, 32),
        "kv_b_proj": (2 * (8 + 8), 8), "o_proj": (32, 2 * 8)}.items()
}
KIMI_MINI_EXPERTS = {
    "layers.0.mlp.gate_proj": (48, 32), "layers.0.mlp.down_proj": (32, 48),
    "layers.1.mlp.experts.3.gate_proj": (24, 32), "layers.1.mlp.experts.3.up_proj": (24, 32),
    "layers.1.mlp.experts.3.down_proj": (32, 24), "layers.1.mlp.shared_experts.down_proj": (32, 24),
}


KT_PROJS = ("gate", "up", "down")


def kt_sft_matrices(*, rank: int = 4, seed: int = 0, layers: tuple[int, ...] = (1,)) -> dict[str, np.ndarray]:
    """KT fused expert LoRA for KIMI_MINI's MoE layers, known values: `layers.L.experts.{proj}_lora_a`
    [E, r, in] and `_lora_b` [E, out, r] (reference/sglang-kt.md §3.4)."""
    text = KIMI_MINI["text_config"]
    experts, hidden, inter = text["n_routed_experts"], text["hidden_size"], text["moe_intermediate_size"]
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in layers:
        for proj in KT_PROJS:
            n_in, n_out = (inter, hidden) if proj == "down" else (hidden, inter)
            tensors[f"layers.{layer}.experts.{proj}_lora_a"] = rng.normal(0, 0.5, (experts, rank, n_in)).astype("f4")
            tensors[f"layers.{layer}.experts.{proj}_lora_b"] = rng.normal(0, 0.5, (experts, n_out, rank)).astype("f4")
    return tensors


def kimi_attention_matrices(*, rank: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
    """The non-expert PEFT half, as LLaMA-Factory writes it for KIMI_MINI's MLA projections."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (n_out, n_in) in KIMI_MINI_ATTENTION.items():
        tensors[f"base_model.model.model.{module}.lora_A.weight"] = rng.normal(0, 0.5, (rank, n_in)).astype("f4")
        tensors[f"base_model.model.model.{module}.lora_B.weight"] = rng.normal(0, 0.5, (n_out, rank)).astype("f4")
    return tensors


def write_kt_sft(directory: Path, *, rank: int = 4, alpha: float = 8.0, seed: int = 0, attention: bool = True,
                 fused: dict | None = None) -> Path:
    """A KT-SFT checkpoint: fused_expert_lora.safetensors (+ the non-expert adapter_model.safetensors) and
    adapter_config.json, with the matrices of kt_sft_matrices / kimi_attention_matrices."""
    from gateway.demo.tiny_hf import write_safetensors as write_values

    directory.mkdir(parents=True)
    write_values(directory / "fused_expert_lora.safetensors", fused or kt_sft_matrices(rank=rank, seed=seed))
    if attention:
        write_values(directory / "adapter_model.safetensors", kimi_attention_matrices(rank=rank, seed=seed + 1))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "bias": "none", "task_type": "CAUSAL_LM",
        "target_modules": (["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"] if attention
                           else ["gate_proj", "up_proj", "down_proj"]),
        "base_model_name_or_path": "moonshotai/Kimi-K2.5"}))
    return directory
