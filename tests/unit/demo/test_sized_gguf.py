"""The streaming generator for real-size models: llama.cpp's layout and types, sane weight scales, word-only
output rows, LoRAs that match the base, and the 8B shape's arithmetic."""

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from gateway.demo.sized_gguf import SHAPES, LlamaShape, write_sized_lora, write_sized_model
from gateway.demo.tiny_gguf import build_vocab

SMALL = LlamaShape(n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=256, n_vocab=1024, n_ctx=4096)


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_8b_shape_has_llama_3_8b_parameter_count():
    sizes = [int(np.prod(dims)) for dims in SHAPES["8b"].tensor_shapes().values()]
    assert 8.02e9 < sum(sizes) < 8.04e9  # Llama 3.1 8B: 8,030,261,248 parameters


@pytest.mark.parametrize("kind, ggml_type", [("f16", gguf.GGMLQuantizationType.F16),
                                             ("q8_0", gguf.GGMLQuantizationType.Q8_0)])
def test_model_layout_types_and_scales(tmp_path, kind, ggml_type):
    path = write_sized_model(tmp_path / f"m-{kind}.gguf", SMALL, kind=kind)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors) == list(SMALL.tensor_shapes())
    for name, dims in SMALL.tensor_shapes().items():
        tensor = tensors[name]
        assert [int(n) for n in tensor.shape] == list(reversed(dims))  # ggml order: ne0 = in
        expected = gguf.GGMLQuantizationType.F32 if len(dims) == 1 else ggml_type
        assert tensor.tensor_type == expected, name
    assert field(reader, "llama.embedding_length") == 128
    assert field(reader, "llama.attention.head_count_kv") == 2
    assert field(reader, "llama.context_length") == 4096
    assert len(field(reader, "tokenizer.ggml.tokens")) == SMALL.n_vocab
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[-1] == gguf.TokenType.UNUSED  # padding never becomes a control token llama.cpp must scan for

    q = tensors["blk.1.attn_q.weight"]
    weights = dequantize(q.data, q.tensor_type).astype(np.float64)
    assert abs(weights.std() - 1 / np.sqrt(SMALL.n_embd)) < 0.1 / np.sqrt(SMALL.n_embd)
    assert np.isfinite(weights).all()
    down = tensors["blk.0.ffn_down.weight"]
    down_w = dequantize(down.data, down.tensor_type).astype(np.float64)
    assert abs(down_w.std() - 1 / np.sqrt(SMALL.n_ff)) < 0.1 / np.sqrt(SMALL.n_ff)

    out = tensors["output.weight"]
    rows = dequantize(out.data, out.tensor_type).reshape(SMALL.n_vocab, SMALL.n_embd)
    nonzero = set(np.flatnonzero(np.abs(rows).sum(axis=1) > 0).tolist())
    assert nonzero == set(build_vocab().word_ids)


def test_two_seeds_write_different_weights(tmp_path):
    a = gguf.GGUFReader(write_sized_model(tmp_path / "a.gguf", SMALL, kind="f16", seed=1))
    b = gguf.GGUFReader(write_sized_model(tmp_path / "b.gguf", SMALL, kind="f16", seed=2))
    assert not np.array_equal(a.tensors[2].data, b.tensors[2].data)


def test_lora_matches_base_targets(tmp_path):
    path = write_sized_lora(tmp_path / "l.gguf", SMALL, seed=1, name="l", rank=16)
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.lora.alpha") == 16.0
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 7 * SMALL.n_layer
    a, b = tensors["blk.0.ffn_down.weight.lora_a"], tensors["blk.0.ffn_down.weight.lora_b"]
    assert [int(n) for n in a.shape] == [SMALL.n_ff, 16]
    assert [int(n) for n in b.shape] == [16, SMALL.n_embd]
    assert tensors["blk.1.attn_k.weight.lora_b"].shape.tolist() == [16, SMALL.n_head_kv * SMALL.head_dim]
    assert np.isfinite(np.asarray(a.data, dtype=np.float32)).all()
    assert np.asarray(b.data, dtype=np.float32).std() > 0


def test_q8_0_needs_whole_blocks(tmp_path):
    odd = LlamaShape(n_embd=100, n_layer=1, n_head=4, n_head_kv=2, n_ff=256, n_vocab=1024)
    with pytest.raises(ValueError, match="multiple of 32"):
        write_sized_model(tmp_path / "odd.gguf", odd, kind="q8_0")


def test_unknown_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        write_sized_model(tmp_path / "x.gguf", SMALL, kind="q4_0")
