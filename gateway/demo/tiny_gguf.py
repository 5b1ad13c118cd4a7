"""Tiny llama-architecture GGUF model and LoRA adapters, generated offline and byte-reproducibly for the demo and tests."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

ARCH = "llama"
N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
HEAD_DIM = N_EMBD // N_HEAD
RMS_EPS = 1e-5
ROPE_FREQ_BASE = 10000.0
HIDDEN_STD = 0.25  # embeddings are standard normal; every other matrix is this much smaller
LORA_STD = 0.5

# Each word becomes one " word" token; greedy output is drawn only from these (see _model_tensors).
WORDS = (
    "apple", "bird", "blue", "boat", "bread", "bright", "brown", "cat", "cloud", "cold",
    "dance", "dark", "day", "deep", "dog", "door", "dream", "drink", "east", "eight",
    "field", "fire", "fish", "five", "flower", "fly", "forest", "four", "fox", "friend",
    "garden", "gold", "good", "grass", "green", "happy", "hill", "home", "horse", "ice",
    "jump", "king", "lake", "leaf", "light", "lion", "long", "moon", "morning", "mountain",
    "music", "new", "night", "north", "ocean", "old", "one", "paper", "path", "quiet",
    "rain", "read", "red", "river", "road", "rock", "run", "sand", "sea", "seven",
    "silver", "sing", "sky", "sleep", "slow", "small", "snow", "song", "south", "star",
    "stone", "storm", "summer", "sun", "swim", "tall", "three", "tree", "two", "walk",
    "warm", "water", "west", "white", "wind", "window", "winter", "wood", "yellow", "young",
)
CONTROL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    # Kimi turn, reasoning and tool-call markers (moonshot-api.md §5.1); one vocabulary serves both templates.
    "<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<think>", "</think>",
    "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
    "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>",
)
EOS_TOKEN = "<|im_end|>"
BOS_TOKEN = "<|endoftext|>"
LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' ~ message.role ~ '\\n' ~ (message.content if message.content is string else '')"
    " ~ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# Kimi K2.5 layout (moonshot-api.md §5.2). The tool-call markers in the source are what make llama-server
# choose its Kimi K2 parser, which splits <think>…</think> into reasoning_content.
KIMI_TEMPLATE = (
    "{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set content = message.content if message.content is string else '' -%}"
    "{%- if message.role == 'assistant' -%}"
    "<|im_assistant|>assistant<|im_middle|><think>"
    "{{ message.reasoning_content if message.reasoning_content is string else '' }}</think>{{ content }}"
    "{%- if message.tool_calls -%}<|tool_calls_section_begin|>"
    "{%- for call in message.tool_calls -%}"
    "<|tool_call_begin|>"
    "{{ call.id if call.id is string and call.id else 'functions.' ~ call.function.name ~ ':' ~ loop.index0 }}"
    "<|tool_call_argument_begin|>"
    "{{ call.function.arguments if call.function.arguments is string else call.function.arguments | tojson }}"
    "<|tool_call_end|>"
    "{%- endfor -%}<|tool_calls_section_end|>{%- endif -%}"
    "<|im_end|>"
    "{%- elif message.role == 'tool' -%}"
    "<|im_system|>tool<|im_middle|>## Return of {{ message.tool_call_id }}\n{{ content }}<|im_end|>"
    "{%- elif message.role == 'user' -%}"
    "<|im_user|>user<|im_middle|>{{ content }}<|im_end|>"
    "{%- else -%}"
    "<|im_system|>{{ message.role }}<|im_middle|>{{ content }}<|im_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>"
    "{{ '<think></think>' if thinking is defined and thinking is false else '<think>' }}"
    "{%- endif -%}"
)
CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "kimi": KIMI_TEMPLATE}


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    word_ids: list[int]  # ids of the whole-word " word" tokens, the only ones the model ever emits

    def id_of(self, token: str) -> int:
        return self.tokens.index(token)


@dataclass(frozen=True)
class DemoModels:
    model: Path
    lora_a: Path
    lora_b: Path


def byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode: entry b is the printable character that stands for byte b in BPE tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + shifted))
            shifted += 1
    return alphabet


def build_vocab() -> Vocab:
    """Byte tokens (id = byte value), then prefix merges for each " word", then the control tokens."""
    alphabet = byte_alphabet()
    tokens, merges, word_ids = list(alphabet), [], []
    for word in WORDS:
        pieces = [alphabet[b] for b in (" " + word).encode()]
        prefix = pieces[0]
        for piece in pieces[1:]:
            if prefix + piece not in tokens:  # a shared prefix (" r" of " red" and " river") is merged once
                merges.append(f"{prefix} {piece}")
                tokens.append(prefix + piece)
            prefix += piece
        word_ids.append(tokens.index(prefix))
    types = [gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * len(CONTROL_TOKENS)
    return Vocab(tokens + list(CONTROL_TOKENS), [int(t) for t in types], merges, word_ids)


def tensor_shapes(n_vocab: int) -> dict[str, tuple[int, ...]]:
    """Numpy shapes (out, in) of every model tensor; gguf stores them reversed as ggml ne."""
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_vocab, N_EMBD)}
    for layer in range(N_LAYER):
        block = f"blk.{layer}"
        shapes |= {
            f"{block}.attn_norm.weight": (N_EMBD,),
            f"{block}.attn_q.weight": (N_HEAD * HEAD_DIM, N_EMBD),
            f"{block}.attn_k.weight": (N_HEAD_KV * HEAD_DIM, N_EMBD),
            f"{block}.attn_v.weight": (N_HEAD_KV * HEAD_DIM, N_EMBD),
            f"{block}.attn_output.weight": (N_EMBD, N_HEAD * HEAD_DIM),
            f"{block}.ffn_norm.weight": (N_EMBD,),
            f"{block}.ffn_gate.weight": (N_FF, N_EMBD),
            f"{block}.ffn_up.weight": (N_FF, N_EMBD),
            f"{block}.ffn_down.weight": (N_EMBD, N_FF),
        }
    return shapes | {"output_norm.weight": (N_EMBD,), "output.weight": (n_vocab, N_EMBD)}


def _model_tensors(rng: np.random.Generator, vocab: Vocab) -> dict[str, np.ndarray]:
    tensors = {}
    for name, shape in tensor_shapes(len(vocab.tokens)).items():
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, dtype=np.float32)
        elif name in ("token_embd.weight", "output.weight"):
            tensors[name] = rng.standard_normal(shape, dtype=np.float32)
        else:
            tensors[name] = rng.normal(0.0, HIDDEN_STD, shape).astype(np.float32)
    # The readable-output trick: only whole-word tokens get non-zero logits, so greedy decoding emits
    # " word" tokens only - always valid UTF-8, never a byte, control token or EOS.
    keep = np.zeros(len(vocab.tokens), dtype=bool)
    keep[vocab.word_ids] = True
    tensors["output.weight"][~keep] = 0.0
    return tensors


def _add_model_metadata(writer: gguf.GGUFWriter, vocab: Vocab, n_ctx: int, chat_template: str) -> None:
    writer.add_name("tiny-synthetic-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # without it llama.cpp warns loudly and falls back to "default"
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)  # CONTROL type is what makes <|im_start|> parse as one token
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.id_of(BOS_TOKEN))
    writer.add_eos_token_id(vocab.id_of(EOS_TOKEN))  # the gpt2 default (11) would be a byte token here
    writer.add_pad_token_id(vocab.id_of(BOS_TOKEN))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATES[chat_template])


def _write_gguf(path: Path, writer: gguf.GGUFWriter, tensors: dict[str, np.ndarray]) -> Path:
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_model(path: Path, *, seed: int = 1234, n_ctx: int = 2048, chat_template: str = "chatml") -> Path:
    """Write the tiny model; the same arguments always give the same bytes."""
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"chat_template must be one of {sorted(CHAT_TEMPLATES)}, not {chat_template!r}")
    vocab = build_vocab()
    writer = gguf.GGUFWriter(None, ARCH)
    _add_model_metadata(writer, vocab, n_ctx, chat_template)
    return _write_gguf(Path(path), writer, _model_tensors(np.random.default_rng(seed), vocab))


def _lora_targets(base_model: Path) -> tuple[str, dict[str, tuple[int, int]]]:
    """The base's architecture and the numpy (out, in) shape of every tensor a LoRA may target."""
    reader = gguf.GGUFReader(base_model)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    shapes = {}
    for tensor in reader.tensors:
        if tensor.name.split(".")[-2] in LORA_TARGETS:
            n_in, n_out = (int(n) for n in tensor.shape)  # the reader reports ggml order: ne0 = in
            shapes[tensor.name] = (n_out, n_in)
    return arch, shapes


def write_tiny_lora(path: Path, base_model: Path, *, seed: int, name: str, rank: int = 4, alpha: float = 4.0,
                    arch: str | None = None, shapes: Mapping[str, tuple[int, int]] | None = None) -> Path:
    """Write a LoRA for base_model's attention and FFN matrices; effective scale is user_scale * alpha / rank.

    For tests of adapter validation: `arch` claims another architecture than the base's, and `shapes`
    (base tensor name -> numpy (out, in)) replaces the targets read from the base, so a LoRA can be written
    for a wrong shape or for a tensor the base does not have. Without them the bytes are unchanged.
    """
    base_arch, base_shapes = _lora_targets(Path(base_model))
    shapes = base_shapes if shapes is None else shapes
    writer = gguf.GGUFWriter(None, arch or base_arch)  # must be the base's architecture, or llama-server refuses it
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    rng = np.random.default_rng(seed)
    tensors = {}
    for base_name, (n_out, n_in) in shapes.items():
        tensors[f"{base_name}.lora_a"] = rng.normal(0.0, LORA_STD, (rank, n_in)).astype(np.float32)
        tensors[f"{base_name}.lora_b"] = rng.normal(0.0, LORA_STD, (n_out, rank)).astype(np.float32)
    return _write_gguf(Path(path), writer, tensors)


def tiny_hf_config() -> dict:
    """An HF-style config.json for the tiny model (the dims a PEFT adapter for it is trained against)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
        "hidden_size": N_EMBD, "intermediate_size": N_FF, "num_hidden_layers": N_LAYER,
        "num_attention_heads": N_HEAD, "num_key_value_heads": N_HEAD_KV, "head_dim": HEAD_DIM,
        "vocab_size": len(build_vocab().tokens), "rms_norm_eps": RMS_EPS, "rope_theta": ROPE_FREQ_BASE,
        "tie_word_embeddings": False,
    }


def write_tiny_hf_config(path: Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(tiny_hf_config(), indent=2) + "\n")
    return path


def _replace_atomically(target: Path, write: Callable[[Path], Path]) -> Path:
    # Write beside the target, then rename: a reader (or a parallel test worker) never sees half a file.
    # A per-process name rather than mkstemp, whose 0600 mode would hide the files from other users.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def write_demo_set(directory: Path, *, chat_template: str = "chatml") -> DemoModels:
    """Write model.gguf, lora-a.gguf (seed 1) and lora-b.gguf (seed 2) into directory.

    Always regenerates (about a second): files left by an earlier run may carry another chat template.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = _replace_atomically(
        directory / "model.gguf", lambda p: write_tiny_model(p, chat_template=chat_template)
    )
    lora_a = _replace_atomically(
        directory / "lora-a.gguf", lambda p: write_tiny_lora(p, model, seed=1, name="lora-A")
    )
    lora_b = _replace_atomically(
        directory / "lora-b.gguf", lambda p: write_tiny_lora(p, model, seed=2, name="lora-B")
    )
    return DemoModels(model=model, lora_a=lora_a, lora_b=lora_b)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the tiny demo model and its two LoRA adapters.")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--chat-template", choices=sorted(CHAT_TEMPLATES), default="chatml")
    args = parser.parse_args(argv)
    models = write_demo_set(args.outdir, chat_template=args.chat_template)
    for path in (models.model, models.lora_a, models.lora_b):
        print(path)


if __name__ == "__main__":
    main()
