"""BaseModelDims: the base model's dimensions that adapter shapes are checked against, loaded from an HF
`config.json` or from a GGUF file's metadata and tensor table (never its tensor data).

Two views of the same model:
- per module, in HF/PEFT terms: `module_shape(dims, module)` derives the (out, in) of a linear layer such as
  `self_attn.q_proj` or `mlp.experts.3.down_proj` from the scalar dims (llama-style attention, DeepSeek/Kimi MLA,
  dense MLP, routed and shared experts);
- per tensor, in GGUF terms: `gguf_base_ne(dims, name)` gives the ggml `ne` (ne0 = in, ne1 = out) of a base
  tensor such as `blk.0.attn_k.weight`: the real shape when the dims came from a GGUF, otherwise derived.
What cannot be derived from the dims is reported as unknown (None) and left unchecked, never guessed.
"""
from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# HF `model_type` -> the llama.cpp architecture its GGUF conversion writes (convert_hf_to_gguf.py).
GGUF_ARCH_OF_MODEL_TYPE = {
    "llama": "llama", "mistral": "llama", "mixtral": "llama",
    "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2", "kimi_k2": "deepseek2", "kimi_k25": "deepseek2",
    "qwen2": "qwen2", "qwen2_moe": "qwen2moe", "qwen3": "qwen3", "qwen3_moe": "qwen3moe",
    "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3",
}
# GGUF per-layer tensor kind -> the HF module it was converted from (llama.cpp tensor_mapping.py).
HF_MODULE_OF_GGUF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_a": "self_attn.q_a_proj", "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_b": "self_attn.kv_b_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
MODULE_PATH = re.compile(r"^layers\.(?P<layer>\d+)\.(?P<path>.+)$")
EXPERT_PATH = re.compile(r"^mlp\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")
SHARED_PATH = re.compile(r"^mlp\.shared_experts\.(?P<proj>gate_proj|up_proj|down_proj)$")


class BaseModelError(ValueError):
    """The configured base model's config.json or GGUF cannot be read (a configuration error, not a client's)."""


@dataclass(frozen=True)
class BaseModelDims:
    """The text model's dimensions; None where the source does not say. `tensor_shapes` (GGUF bases only) maps
    every base tensor name to its ggml ne0/ne1 as (ne1, ne0) = (out, in); it is authoritative when present."""
    architecture: str | None                 # GGUF architecture string ("llama", "deepseek2"); None if unknown
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int | None = None
    moe_intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    q_lora_rank: int | None = None           # MLA (DeepSeek V2/V3, Kimi K2/K2.5)
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    first_k_dense_replace: int | None = None  # layers below it are dense, the rest MoE
    tensor_shapes: Mapping[str, tuple[int, int]] | None = field(default=None, hash=False, repr=False)


# --- loaders -----------------------------------------------------------------------------------------------

def dims_from_hf_config(path: str | Path) -> BaseModelDims:
    """Dims from an HF config.json, flat (Llama, DeepSeek V3) or with the text model under `text_config`
    (Kimi K2.5's KimiK25ForConditionalGeneration)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"base_model.hf_config: {path} cannot be read as JSON") from exc
    if not isinstance(config, dict):
        raise BaseModelError(f"base_model.hf_config: {path} is not a JSON object")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

    def number(key: str, *, required: bool = False) -> int | None:
        value = text.get(key)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BaseModelError(f"base_model.hf_config: {path}: {key} must be a non-negative integer, got {value!r}")
        return value

    hidden, heads = number("hidden_size", required=True), number("num_attention_heads")
    head_dim = number("head_dim")
    if head_dim is None and heads and number("kv_lora_rank") is None:
        head_dim = hidden // heads
    return BaseModelDims(
        architecture=_gguf_arch(text, config),
        hidden_size=hidden,
        num_hidden_layers=number("num_hidden_layers", required=True),
        intermediate_size=number("intermediate_size"),
        moe_intermediate_size=number("moe_intermediate_size"),
        num_attention_heads=heads,
        num_key_value_heads=number("num_key_value_heads") if "num_key_value_heads" in text else heads,
        head_dim=head_dim,
        vocab_size=number("vocab_size"),
        q_lora_rank=number("q_lora_rank"),
        kv_lora_rank=number("kv_lora_rank"),
        qk_nope_head_dim=number("qk_nope_head_dim"),
        qk_rope_head_dim=number("qk_rope_head_dim"),
        v_head_dim=number("v_head_dim"),
        n_routed_experts=number("n_routed_experts") or number("num_experts") or number("num_local_experts"),
        n_shared_experts=number("n_shared_experts"),
        first_k_dense_replace=number("first_k_dense_replace"),
    )


def _gguf_arch(text: dict, config: dict) -> str | None:
    for model_type in (text.get("model_type"), config.get("model_type")):
        if isinstance(model_type, str) and model_type in GGUF_ARCH_OF_MODEL_TYPE:
            return GGUF_ARCH_OF_MODEL_TYPE[model_type]
    return None


def dims_from_gguf(path: str | Path) -> BaseModelDims:
    """Dims from a base GGUF's metadata, plus the real shape of every tensor (all shards of a split GGUF);
    the reader maps the file and parses only the header, so no tensor data is read."""
    import gguf  # heavy import (numpy): only where a GGUF is read

    path = Path(path)
    reader = _open_gguf(path)
    shapes = _tensor_table(reader)
    for shard in _other_shards(path, reader):
        shapes |= _tensor_table(_open_gguf(shard))
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise BaseModelError(f"base model: {path} has no general.architecture")

    def number(key: str) -> int | None:
        value = _field(reader, key.format(arch=arch))
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    heads, hidden, layers = (number(gguf.Keys.Attention.HEAD_COUNT), number(gguf.Keys.LLM.EMBEDDING_LENGTH),
                             number(gguf.Keys.LLM.BLOCK_COUNT))
    if hidden is None or layers is None:
        raise BaseModelError(f"base model: {path} has no {arch}.embedding_length or {arch}.block_count")
    kv_lora = number(gguf.Keys.Attention.KV_LORA_RANK)
    rope = number(gguf.Keys.Rope.DIMENSION_COUNT)
    key_len = number(gguf.Keys.Attention.KEY_LENGTH_MLA) or number(gguf.Keys.Attention.KEY_LENGTH)
    value_len = number(gguf.Keys.Attention.VALUE_LENGTH_MLA) or number(gguf.Keys.Attention.VALUE_LENGTH)
    embd = shapes.get("token_embd.weight")
    return BaseModelDims(
        architecture=arch,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=number(gguf.Keys.LLM.FEED_FORWARD_LENGTH),
        moe_intermediate_size=number(gguf.Keys.LLM.EXPERT_FEED_FORWARD_LENGTH),
        num_attention_heads=heads,
        num_key_value_heads=number(gguf.Keys.Attention.HEAD_COUNT_KV) or heads,
        head_dim=None if kv_lora else (key_len or (hidden // heads if heads else None)),
        vocab_size=number(gguf.Keys.LLM.VOCAB_SIZE) or (embd[0] if embd else None),
        q_lora_rank=number(gguf.Keys.Attention.Q_LORA_RANK),
        kv_lora_rank=kv_lora,
        qk_nope_head_dim=key_len - rope if kv_lora and key_len and rope else None,
        qk_rope_head_dim=rope if kv_lora else None,
        v_head_dim=value_len if kv_lora else None,
        n_routed_experts=number(gguf.Keys.LLM.EXPERT_COUNT),
        n_shared_experts=number(gguf.Keys.LLM.EXPERT_SHARED_COUNT),
        first_k_dense_replace=number(gguf.Keys.LLM.LEADING_DENSE_BLOCK_COUNT),
        tensor_shapes=shapes,
    )


def _open_gguf(path: Path):
    from gguf import GGUFReader

    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise BaseModelError(f"base model: {path} cannot be read") from exc
    if magic != b"GGUF":
        raise BaseModelError(f"base model: {path} is not a GGUF file")
    try:
        return GGUFReader(path)
    except (ValueError, struct.error, IndexError) as exc:
        raise BaseModelError(f"base model: {path} is truncated or corrupt") from exc


def _field(reader, key: str):
    item = reader.fields.get(key)
    return item.contents() if item is not None else None


def _tensor_table(reader) -> dict[str, tuple[int, int]]:
    """name -> (ne1, ne0) = (out, in); a 1-D tensor has ne1 = 1."""
    table = {}
    for tensor in reader.tensors:
        ne = [int(n) for n in tensor.shape]  # the reader reports ggml order: ne0 first
        table[tensor.name] = (ne[1] if len(ne) > 1 else 1, ne[0])
    return table


def _other_shards(path: Path, reader) -> list[Path]:
    count = _field(reader, "split.count")
    match = SPLIT_NAME.match(path.name)
    if not isinstance(count, int) or count <= 1:
        return []
    if match is None or int(match["no"]) != 1:
        raise BaseModelError(f"base model: {path} is one of {count} GGUF shards; name the first, "
                             f"<name>-00001-of-{count:05d}.gguf")
    shards = [path.with_name(f"{match['prefix']}-{no:05d}-of-{count:05d}.gguf") for no in range(2, count + 1)]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise BaseModelError(f"base model: {path} is split into {count} shards; missing {', '.join(missing)}")
    return shards


# --- expected shapes ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleShape:
    """What the base says about one module: its (out, in), either of which may be unknown, or why it is absent."""
    out: int | None = None
    inp: int | None = None
    absent: str | None = None


def _product(*values: int | None) -> int | None:
    result = 1
    for value in values:
        if value is None:
            return None
        result *= value
    return result


def _sum(*values: int | None) -> int | None:
    return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]


def module_shape(dims: BaseModelDims, module: str) -> ModuleShape:
    """The (out, in) of an HF module path relative to the text model: `layers.N.<path>`, `embed_tokens` or
    `lm_head`. Derivable: q/k/v/o_proj (llama heads, or MLA), q_a/q_b/kv_a_proj_with_mqa/kv_b_proj (MLA),
    mlp gate/up/down_proj (dense, `experts.N.` routed, `shared_experts.`), embed_tokens ((out, in) = (hidden,
    vocab), PEFT's lora_embedding orientation) and lm_head. Any other module: both unknown (not checked)."""
    if module == "embed_tokens":
        return ModuleShape(dims.hidden_size, dims.vocab_size)
    if module == "lm_head":
        return ModuleShape(dims.vocab_size, dims.hidden_size)
    match = MODULE_PATH.match(module)
    if match is None:
        return ModuleShape()
    layer, path = int(match["layer"]), match["path"]
    if path.startswith("self_attn."):
        return _attention_shape(dims, path.removeprefix("self_attn."))
    if path.startswith("mlp."):
        return _mlp_shape(dims, layer, path)
    return ModuleShape()


def _attention_shape(dims: BaseModelDims, proj: str) -> ModuleShape:
    hidden, heads = dims.hidden_size, dims.num_attention_heads
    if dims.kv_lora_rank is None:  # llama-style attention
        mla_only = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"}
        if proj in mla_only:
            return ModuleShape(absent=f"the base model has no {proj} (it has no MLA attention)")
        q_width, kv_width = _product(heads, dims.head_dim), _product(dims.num_key_value_heads, dims.head_dim)
        table = {"q_proj": (q_width, hidden), "k_proj": (kv_width, hidden), "v_proj": (kv_width, hidden),
                 "o_proj": (hidden, q_width)}
        return ModuleShape(*table[proj]) if proj in table else ModuleShape()
    qk_head = _sum(dims.qk_nope_head_dim, dims.qk_rope_head_dim)
    if proj in ("k_proj", "v_proj") or (proj == "q_proj" and dims.q_lora_rank is not None):
        return ModuleShape(absent=f"the base model has no {proj} (its MLA attention uses q_a_proj/q_b_proj, "
                                  "kv_a_proj_with_mqa and kv_b_proj)")
    if proj in ("q_a_proj", "q_b_proj") and dims.q_lora_rank is None:
        return ModuleShape(absent=f"the base model has no {proj} (q_lora_rank is not set)")
    table = {
        "q_proj": (_product(heads, qk_head), hidden),
        "q_a_proj": (dims.q_lora_rank, hidden),
        "q_b_proj": (_product(heads, qk_head), dims.q_lora_rank),
        "kv_a_proj_with_mqa": (_sum(dims.kv_lora_rank, dims.qk_rope_head_dim), hidden),
        "kv_b_proj": (_product(heads, _sum(dims.qk_nope_head_dim, dims.v_head_dim)), dims.kv_lora_rank),
        "o_proj": (hidden, _product(heads, dims.v_head_dim)),
    }
    return ModuleShape(*table[proj]) if proj in table else ModuleShape()


def _mlp_shape(dims: BaseModelDims, layer: int, path: str) -> ModuleShape:
    moe_layer = dims.first_k_dense_replace is not None and layer >= dims.first_k_dense_replace
    if (expert := EXPERT_PATH.match(path)) is not None:
        if dims.n_routed_experts is None and dims.moe_intermediate_size is None:
            return ModuleShape(absent="the base model has no routed experts (it is not a MoE model)")
        if dims.first_k_dense_replace is not None and not moe_layer:
            return ModuleShape(absent=f"layer {layer} of the base model is dense (first_k_dense_replace="
                                      f"{dims.first_k_dense_replace}); it has no experts")
        if dims.n_routed_experts is not None and int(expert["expert"]) >= dims.n_routed_experts:
            return ModuleShape(absent=f"the base model has {dims.n_routed_experts} routed experts "
                                      f"(0-{dims.n_routed_experts - 1}), not expert {expert['expert']}")
        return _ffn(dims.hidden_size, dims.moe_intermediate_size, expert["proj"])
    if (shared := SHARED_PATH.match(path)) is not None:
        return _ffn(dims.hidden_size, _product(dims.moe_intermediate_size, dims.n_shared_experts), shared["proj"])
    proj = path.removeprefix("mlp.")
    if proj in ("gate_proj", "up_proj", "down_proj"):
        if moe_layer:
            return ModuleShape(absent=f"layer {layer} of the base model is a MoE layer (first_k_dense_replace="
                                      f"{dims.first_k_dense_replace}); it has no dense mlp.{proj}")
        return _ffn(dims.hidden_size, dims.intermediate_size, proj)
    return ModuleShape()


def _ffn(hidden: int, width: int | None, proj: str) -> ModuleShape:
    return ModuleShape(hidden, width) if proj == "down_proj" else ModuleShape(width, hidden)


def gguf_base_ne(dims: BaseModelDims, name: str) -> tuple[int | None, int | None] | None:
    """The ggml (ne0, ne1) of base tensor `name`: from the real table when there is one (None = no such
    tensor), otherwise derived through the HF module it was converted from (None = the base has no such
    tensor: a block past num_hidden_layers, or a module it lacks; (None, None) = not derivable, unchecked)."""
    if dims.tensor_shapes is not None:
        shape = dims.tensor_shapes.get(name)
        return None if shape is None else (shape[1], shape[0])
    if name in ("token_embd.weight", "output.weight"):
        return dims.hidden_size, dims.vocab_size
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" \
            and parts[2] in HF_MODULE_OF_GGUF:
        if int(parts[1]) >= dims.num_hidden_layers:
            return None
        shape = module_shape(dims, f"layers.{parts[1]}.{HF_MODULE_OF_GGUF[parts[2]]}")
        return None if shape.absent else (shape.inp, shape.out)
    return None, None
