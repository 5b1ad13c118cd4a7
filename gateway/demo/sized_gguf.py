"""Llama-architecture GGUF models at real sizes (an 8B shape) with random weights, for benchmarks on a GPU.

The tiny demo model (tiny_gguf.py) is built in memory; an 8B model is 8.5 GB in Q8_0 and 16 GB in f16, so this
writer streams: the header first, then each tensor in 64 MiB pieces cut from a small pool of random values.
Weights repeat across tensors (the pool is reused at random offsets); that changes no timing, and it writes at
disk speed (seconds) instead of drawing 8 billion normals. The vocabulary is the tiny model's (every " word"
is one token, so a prompt of N words is N tokens) padded with unused tokens to the shape's vocabulary size, and
only word tokens get non-zero output rows, so greedy decoding writes words, never EOS: every request decodes
exactly max_tokens.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from gateway.demo.tiny_gguf import (
    ARCH, BOS_TOKEN, CHAT_TEMPLATES, EOS_TOKEN, LORA_TARGETS, RMS_EPS, build_vocab,
)

PIECE_BYTES = 64 << 20  # one write: large enough for disk speed, small enough to keep memory flat
POOL_VALUES = 1 << 24  # random values per pool (32 MiB in f16); tensors are cut from it at random offsets
Q8_0_BLOCK = 32  # weights per Q8_0 block: one f16 scale, then 32 int8
Q8_0_BLOCK_BYTES = 2 + Q8_0_BLOCK
UNIFORM_INT8_STD = 127 / math.sqrt(3)  # std of integers drawn uniformly from [-127, 127]
TYPES = {"f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
         "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}


@dataclass(frozen=True)
class LlamaShape:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx: int = 8192
    rope_freq_base: float = 500000.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Numpy shapes (out, in), in the order they are written."""
        kv = self.n_head_kv * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (self.n_vocab, self.n_embd)}
        for layer in range(self.n_layer):
            block = f"blk.{layer}"
            shapes |= {
                f"{block}.attn_norm.weight": (self.n_embd,),
                f"{block}.attn_q.weight": (self.n_embd, self.n_embd),
                f"{block}.attn_k.weight": (kv, self.n_embd),
                f"{block}.attn_v.weight": (kv, self.n_embd),
                f"{block}.attn_output.weight": (self.n_embd, self.n_embd),
                f"{block}.ffn_norm.weight": (self.n_embd,),
                f"{block}.ffn_gate.weight": (self.n_ff, self.n_embd),
                f"{block}.ffn_up.weight": (self.n_ff, self.n_embd),
                f"{block}.ffn_down.weight": (self.n_embd, self.n_ff),
            }
        return shapes | {"output_norm.weight": (self.n_embd,), "output.weight": (self.n_vocab, self.n_embd)}


# Llama 3.1 8B's dimensions (its config.json): 8.0e9 parameters. "mini" (23M) runs the same scripts on a CPU.
SHAPES = {"8b": LlamaShape(n_embd=4096, n_layer=32, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256,
                           n_ctx=131072),
          "mini": LlamaShape(n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=768, n_vocab=32768)}


class _Pool:
    """Random tensor bytes of one type and standard deviation, cut at random offsets (whole blocks for Q8_0)."""

    def __init__(self, rng: np.random.Generator, kind: str, std: float) -> None:
        self.rng = rng
        if kind == "f16":
            values = rng.standard_normal(POOL_VALUES, dtype=np.float32) * std
            self.unit, self.data = 2, values.astype(np.float16).tobytes()
        else:
            blocks = np.empty((POOL_VALUES // Q8_0_BLOCK, Q8_0_BLOCK_BYTES), dtype=np.uint8)
            blocks[:, :2] = np.frombuffer(np.float16(std / UNIFORM_INT8_STD).tobytes(), dtype=np.uint8)
            blocks[:, 2:] = rng.integers(-127, 128, (len(blocks), Q8_0_BLOCK), dtype=np.int8).view(np.uint8)
            self.unit, self.data = Q8_0_BLOCK_BYTES, blocks.tobytes()
        self.view = memoryview(self.data)

    def write(self, fout, nbytes: int) -> None:
        while nbytes > 0:
            start = int(self.rng.integers(0, len(self.data) // self.unit)) * self.unit
            piece = min(nbytes, PIECE_BYTES, len(self.data) - start)
            fout.write(self.view[start:start + piece])
            nbytes -= piece


def _row_bytes(n_in: int, kind: str) -> int:
    if kind == "f16":
        return 2 * n_in
    if n_in % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs rows that are a multiple of {Q8_0_BLOCK} wide, not {n_in}")
    return n_in // Q8_0_BLOCK * Q8_0_BLOCK_BYTES


def _add_metadata(writer: gguf.GGUFWriter, shape: LlamaShape, name: str, kind: str, chat_template: str) -> None:
    vocab = build_vocab()
    if shape.n_vocab < len(vocab.tokens):
        raise ValueError(f"n_vocab {shape.n_vocab} is smaller than the word vocabulary ({len(vocab.tokens)})")
    pad = shape.n_vocab - len(vocab.tokens)
    # UNUSED, not CONTROL: llama.cpp scans every control token in each prompt, 128k of them would cost seconds.
    tokens = vocab.tokens + [f"<|unused_{i}|>" for i in range(pad)]
    types = vocab.token_types + [int(gguf.TokenType.UNUSED)] * pad
    writer.add_name(name)
    writer.add_file_type(TYPES[kind][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_freq_base(shape.rope_freq_base)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_vocab_size(shape.n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.id_of(BOS_TOKEN))
    writer.add_eos_token_id(vocab.id_of(EOS_TOKEN))
    writer.add_pad_token_id(vocab.id_of(BOS_TOKEN))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATES[chat_template])


def write_sized_model(path: Path, shape: LlamaShape, *, kind: str = "q8_0", seed: int = 1234,
                      chat_template: str = "chatml", name: str = "synthetic-llama") -> Path:
    """Stream a random-weight Llama model of `shape` to path: matrices in `kind` (f16 or q8_0), norms in f32."""
    if kind not in TYPES:
        raise ValueError(f"kind must be one of {sorted(TYPES)}, not {kind!r}")
    rng = np.random.default_rng(seed)
    word_ids = build_vocab().word_ids
    writer = gguf.GGUFWriter(None, ARCH)
    _add_metadata(writer, shape, name, kind, chat_template)
    raw_type = TYPES[kind][0]
    shapes = shape.tensor_shapes()
    for tensor, dims in shapes.items():
        if len(dims) == 1:
            writer.add_tensor_info(tensor, dims, np.dtype(np.float32), 4 * dims[0])
        else:
            byte_shape = (dims[0], _row_bytes(dims[1], kind))
            writer.add_tensor_info(tensor, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1],
                                   raw_dtype=raw_type)
    path = Path(path)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # std 1/sqrt(fan_in) keeps every activation near unit scale through all layers (no f16 overflow).
    pools: dict[int, _Pool] = {}
    fout = writer.fout[0]
    for tensor, dims in shapes.items():
        writer.write_padding(fout, fout.tell())
        if len(dims) == 1:
            data = np.ones(dims, dtype=np.float32).tobytes()
            fout.write(data)
            writer.write_padding(fout, len(data))
            continue
        n_out, n_in = dims
        if n_in not in pools:
            pools[n_in] = _Pool(rng, kind, 1.0 / math.sqrt(n_in))
        pool = pools[n_in]
        row = _row_bytes(n_in, kind)
        if tensor == "output.weight":
            _write_word_head(fout, pool, row, n_out, word_ids)
        else:
            pool.write(fout, n_out * row)
        writer.write_padding(fout, n_out * row)
    writer.close()
    return path


def _write_word_head(fout, pool: _Pool, row: int, n_out: int, word_ids: list[int]) -> None:
    """Output rows: random for word tokens, zero for every other token, so greedy decoding picks a word: the
    best of ~100 unit-scale word logits is positive (the zero rows lose) unless all ~100 are negative."""
    head = np.zeros((max(word_ids) + 1, row), dtype=np.uint8)
    for token in word_ids:
        start = int(pool.rng.integers(0, len(pool.data) // pool.unit)) * pool.unit
        source = np.frombuffer(pool.data, dtype=np.uint8, count=row, offset=min(start, len(pool.data) - row))
        head[token] = source
    fout.write(head.tobytes())
    zeros = bytes(min(PIECE_BYTES, (n_out - len(head)) * row) // row * row)
    left = (n_out - len(head)) * row
    while left > 0:
        piece = min(left, len(zeros))
        fout.write(zeros[:piece])
        left -= piece


def write_sized_lora(path: Path, shape: LlamaShape, *, seed: int, name: str, rank: int = 16,
                     alpha: float = 16.0) -> Path:
    """A rank-`rank` f16 LoRA on every attention and FFN matrix of a `shape` model, written in one pass."""
    rng = np.random.default_rng(seed)
    targets = {t: d for t, d in shape.tensor_shapes().items() if t.split(".")[-2] in LORA_TARGETS}
    writer = gguf.GGUFWriter(None, ARCH)
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    pieces = {}
    for tensor, (n_out, n_in) in targets.items():
        pieces[f"{tensor}.lora_a"] = (rank, n_in)
        pieces[f"{tensor}.lora_b"] = (n_out, rank)
    for tensor, dims in pieces.items():
        writer.add_tensor_info(tensor, dims, np.dtype(np.float16), 2 * dims[0] * dims[1])
    path = Path(path)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # A delta of about half the base matrix's output: strong enough to change greedy text (the gateway verifies
    # that an adapter answers differently from the base before it serves it), small enough to stay finite.
    pool = rng.standard_normal(POOL_VALUES // 4, dtype=np.float32).astype(np.float16)
    fout = writer.fout[0]
    for tensor, (rows, cols) in pieces.items():
        std = (1.0 / math.sqrt(cols)) if tensor.endswith("lora_a") else 0.5 / math.sqrt(rank)
        count = rows * cols
        start = int(rng.integers(0, len(pool) - count)) if count < len(pool) else 0
        data = np.resize(pool[start:], count) * np.float16(std)
        writer.write_padding(fout, fout.tell())
        fout.write(data.astype(np.float16).tobytes())
        writer.write_padding(fout, data.nbytes)
    writer.close()
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a random-weight Llama GGUF at a real size (and LoRAs).")
    parser.add_argument("path", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--type", dest="kind", choices=sorted(TYPES), default="q8_0")
    parser.add_argument("--lora", type=Path, action="append", default=[],
                        help="also write a rank-16 LoRA for this shape to this path (repeatable; seeds 1, 2, …)")
    parser.add_argument("--lora-only", action="store_true", help="write only the LoRAs")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    if not args.lora_only:
        print(write_sized_model(args.path, shape, kind=args.kind, name=f"synthetic-llama-{args.shape}"), flush=True)
    for seed, lora in enumerate(args.lora, start=1):
        print(write_sized_lora(lora, shape, seed=seed, name=f"lora-{seed}"), flush=True)


if __name__ == "__main__":
    main()
