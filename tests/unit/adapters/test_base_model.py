"""Base-model dims: from an HF config.json (flat or Kimi's nested text_config) and from a GGUF's metadata and
tensor table (split GGUFs included), and the module shapes derived from them."""
import dataclasses
import json

import gguf
import numpy as np
import pytest

from adapters.base_model import BaseModelError, dims_from_gguf, dims_from_hf_config, gguf_base_ne, module_shape
from gateway.demo import tiny_gguf
from tests.adapter_files import KIMI_MINI


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_gguf.write_tiny_model(tmp_path_factory.mktemp("model") / "model.gguf")


def scalars(dims) -> dict:
    return {k: v for k, v in dataclasses.asdict(dims).items() if k != "tensor_shapes"}


def test_hf_config_and_gguf_of_the_tiny_model_agree(tmp_path, tiny_model):
    from_gguf = dims_from_gguf(tiny_model)
    from_hf = dims_from_hf_config(tiny_gguf.write_tiny_hf_config(tmp_path / "config.json"))
    assert scalars(from_gguf) == scalars(from_hf)
    vocab = len(tiny_gguf.build_vocab().tokens)
    assert (from_hf.architecture, from_hf.hidden_size, from_hf.intermediate_size, from_hf.head_dim,
            from_hf.num_hidden_layers, from_hf.vocab_size) == ("llama", 64, 128, 16, 2, vocab)
    assert from_hf.tensor_shapes is None


def test_gguf_tensor_table_is_out_in(tiny_model):
    shapes = dims_from_gguf(tiny_model).tensor_shapes
    expected = tiny_gguf.tensor_shapes(len(tiny_gguf.build_vocab().tokens))
    assert shapes == {name: shape if len(shape) == 2 else (1, shape[0]) for name, shape in expected.items()}


def test_kimi_nested_text_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(KIMI_MINI))
    dims = dims_from_hf_config(tmp_path / "config.json")
    assert (dims.architecture, dims.hidden_size, dims.q_lora_rank, dims.kv_lora_rank, dims.n_routed_experts,
            dims.first_k_dense_replace, dims.head_dim) == ("deepseek2", 32, 16, 8, 4, 1, None)
    assert dataclasses.astuple(module_shape(dims, "layers.1.self_attn.kv_b_proj")) == (32, 8, None)
    assert dataclasses.astuple(module_shape(dims, "embed_tokens")) == (32, 100, None)


def test_unknown_model_type_has_no_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "brand_new", "hidden_size": 8,
                                                      "num_hidden_layers": 1}))
    assert dims_from_hf_config(tmp_path / "config.json").architecture is None


@pytest.mark.parametrize("content, message", [
    ("{", "cannot be read as JSON"),
    ("[]", "is not a JSON object"),
    ('{"hidden_size": 64}', "num_hidden_layers must be a non-negative integer, got None"),
    ('{"hidden_size": "64", "num_hidden_layers": 2}', "hidden_size must be a non-negative integer, got '64'"),
])
def test_bad_hf_config(tmp_path, content, message):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(BaseModelError, match=message):
        dims_from_hf_config(tmp_path / "config.json")


def test_bad_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGML" + b"\0" * 32)
    with pytest.raises(BaseModelError, match="is not a GGUF file"):
        dims_from_gguf(tmp_path / "x.gguf")


def write_split(directory, count_tensors: int = 3):
    writer = gguf.GGUFWriter(directory / "m.gguf", "llama", split_max_tensors=2)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    for layer in range(count_tensors):
        writer.add_tensor(f"blk.0.t{layer}.weight", np.zeros((3 + layer, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_split_gguf_reads_every_shard(tmp_path):
    write_split(tmp_path)
    dims = dims_from_gguf(tmp_path / "m-00001-of-00002.gguf")
    assert dims.tensor_shapes == {"blk.0.t0.weight": (3, 8), "blk.0.t1.weight": (4, 8), "blk.0.t2.weight": (5, 8)}
    assert gguf_base_ne(dims, "blk.0.t2.weight") == (8, 5)


def test_split_gguf_needs_the_first_shard_and_all_others(tmp_path):
    write_split(tmp_path)
    with pytest.raises(BaseModelError, match="name the first, <name>-00001-of-00002.gguf"):
        dims_from_gguf(tmp_path / "m-00002-of-00002.gguf")
    (tmp_path / "m-00002-of-00002.gguf").unlink()
    with pytest.raises(BaseModelError, match="split into 2 shards; missing m-00002-of-00002.gguf"):
        dims_from_gguf(tmp_path / "m-00001-of-00002.gguf")


def test_derived_gguf_shapes_without_a_table(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_gguf.tiny_hf_config()))
    dims = dims_from_hf_config(tmp_path / "config.json")
    assert gguf_base_ne(dims, "blk.1.ffn_down.weight") == (128, 64)
    assert gguf_base_ne(dims, "blk.2.ffn_down.weight") is None
    assert gguf_base_ne(dims, "blk.0.attn_kv_b.weight") is None
    assert gguf_base_ne(dims, "blk.0.something_new.weight") == (None, None)
