"""The tiny GGUF generator: reproducible bytes, llama.cpp's required metadata, a working BPE vocab, matching LoRAs."""

import hashlib
from pathlib import Path

import gguf
import numpy as np
import pytest

from gateway.demo import tiny_gguf
from gateway.demo.tiny_gguf import (
    CONTROL_TOKENS,
    LORA_TARGETS,
    WORDS,
    build_vocab,
    byte_alphabet,
    tensor_shapes,
    write_demo_set,
    write_tiny_lora,
    write_tiny_model,
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def bpe(text: str, merges: list[str], tokens: list[str]) -> list[int]:
    """GPT-2 BPE on one pre-tokenized chunk: repeatedly merge the adjacent pair of lowest merge rank."""
    ranks = {tuple(m.split(" ")): rank for rank, m in enumerate(merges)}
    alphabet = byte_alphabet()
    parts = [alphabet[b] for b in text.encode()]
    while True:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs, default=(len(ranks), -1))
        if rank == len(ranks):
            return [tokens.index(p) for p in parts]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tiny_gguf.DemoModels:
    return write_demo_set(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def model_reader(demo) -> gguf.GGUFReader:
    return gguf.GGUFReader(demo.model)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    first = write_tiny_model(tmp_path / "a.gguf", seed=7)
    again = write_tiny_model(tmp_path / "b.gguf", seed=7)
    other = write_tiny_model(tmp_path / "c.gguf", seed=8)
    assert sha256(first) == sha256(again)
    assert sha256(first) != sha256(other)


def test_lora_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path, demo):
    first = write_tiny_lora(tmp_path / "a.gguf", demo.model, seed=3, name="x")
    again = write_tiny_lora(tmp_path / "b.gguf", demo.model, seed=3, name="x")
    other = write_tiny_lora(tmp_path / "c.gguf", demo.model, seed=4, name="x")
    assert sha256(first) == sha256(again)
    assert sha256(first) != sha256(other)


def test_demo_set_adapters_differ_from_each_other(demo):
    assert sha256(demo.lora_a) != sha256(demo.lora_b)


def test_model_metadata_has_every_key_llama_server_needs(tmp_path):
    reader = gguf.GGUFReader(write_tiny_model(tmp_path / "m.gguf", n_ctx=512))
    vocab = build_vocab()
    expected = {
        "general.architecture": "llama",
        "llama.context_length": 512,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 4,
        "llama.rope.dimension_count": 16,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.eos_token_id": vocab.tokens.index("<|im_end|>"),
        "tokenizer.ggml.bos_token_id": vocab.tokens.index("<|endoftext|>"),
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field(reader, "tokenizer.ggml.tokens") == vocab.tokens
    assert field(reader, "tokenizer.ggml.merges") == vocab.merges


def test_control_tokens_are_typed_control_and_everything_else_normal(model_reader):
    tokens = field(model_reader, "tokenizer.ggml.tokens")
    types = dict(zip(tokens, field(model_reader, "tokenizer.ggml.token_type")))
    assert {t for t, kind in types.items() if kind == gguf.TokenType.CONTROL} == set(CONTROL_TOKENS)
    assert {kind for t, kind in types.items() if t not in CONTROL_TOKENS} == {gguf.TokenType.NORMAL}


def test_tensor_shapes_read_back_in_ggml_order_and_all_f32(model_reader):
    n_vocab = len(build_vocab().tokens)
    found = {t.name: (tuple(int(n) for n in t.shape), t.tensor_type) for t in model_reader.tensors}
    expected = {name: (shape[::-1], gguf.GGMLQuantizationType.F32) for name, shape in tensor_shapes(n_vocab).items()}
    assert found == expected
    assert found["blk.1.ffn_down.weight"][0] == (128, 64)


def test_output_rows_are_zero_except_whole_word_tokens(model_reader):
    vocab = build_vocab()
    output = next(t for t in model_reader.tensors if t.name == "output.weight").data
    live = set(np.flatnonzero(np.abs(output).sum(axis=1)).tolist())
    assert live == set(vocab.word_ids)
    assert {vocab.tokens[i] for i in live} == {byte_alphabet()[32] + w for w in WORDS}


def test_byte_tokens_use_the_gpt2_alphabet_with_id_equal_to_byte():
    alphabet, tokens = byte_alphabet(), build_vocab().tokens
    assert len(set(alphabet)) == 256
    assert tokens[:256] == alphabet
    assert (tokens[ord("A")], tokens[ord(" ")], tokens[ord("\n")], tokens[0]) == ("A", "Ġ", "Ċ", "Ā")


@pytest.mark.parametrize("word", [" river", " blue", " wind", " window", " apple"])
def test_a_listed_word_is_one_token_after_bpe(word):
    vocab = build_vocab()
    assert bpe(word, vocab.merges, vocab.tokens) == [vocab.tokens.index(word.replace(" ", "Ġ"))]


def test_unlisted_text_falls_back_to_byte_tokens():
    vocab = build_vocab()
    assert bpe(" xyz", vocab.merges, vocab.tokens) == [32, ord("x"), ord("y"), ord("z")]


def test_every_merge_joins_two_earlier_tokens_into_a_new_one():
    vocab = build_vocab()
    position = {token: i for i, token in enumerate(vocab.tokens)}
    for merge in vocab.merges:
        left, right = merge.split(" ")
        assert position[left] < position[left + right] and position[right] < position[left + right]
    assert len(position) == len(vocab.tokens)


def test_lora_metadata_marks_a_llama_lora_adapter(demo):
    reader = gguf.GGUFReader(demo.lora_a)
    keys = ["general.architecture", "general.type", "adapter.type", "adapter.lora.alpha", "general.name"]
    assert [field(reader, key) for key in keys] == ["llama", "adapter", "lora", 4.0, "lora-A"]


def test_lora_tensors_match_the_base_shapes(demo, model_reader):
    base = {t.name: tuple(int(n) for n in t.shape) for t in model_reader.tensors}
    lora = {t.name: tuple(int(n) for n in t.shape) for t in gguf.GGUFReader(demo.lora_b).tensors}
    targets = [f"blk.{layer}.{target}.weight" for layer in range(2) for target in LORA_TARGETS]
    assert set(lora) == {f"{name}.lora_{ab}" for name in targets for ab in "ab"}
    for name in targets:
        n_in, n_out = base[name]
        assert lora[f"{name}.lora_a"] == (n_in, 4)
        assert lora[f"{name}.lora_b"] == (4, n_out)


def test_lora_rank_and_alpha_are_written(tmp_path, demo):
    reader = gguf.GGUFReader(write_tiny_lora(tmp_path / "r8.gguf", demo.model, seed=1, name="r8", rank=8, alpha=16))
    assert field(reader, "adapter.lora.alpha") == 16.0
    assert {tuple(int(n) for n in t.shape)[1] for t in reader.tensors if t.name.endswith(".lora_a")} == {8}


def test_kimi_template_carries_the_markers_llama_server_detects(tmp_path):
    reader = gguf.GGUFReader(write_tiny_model(tmp_path / "k.gguf", chat_template="kimi"))
    template = field(reader, "tokenizer.chat_template")
    for marker in ("<|tool_calls_section_begin|>", "<|tool_call_begin|>", "<|im_assistant|>assistant<|im_middle|>"):
        assert marker in template
    assert "thinking is false" in template


def test_unknown_chat_template_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="chat_template"):
        write_tiny_model(tmp_path / "x.gguf", chat_template="llama3")


def test_demo_set_rewrites_files_for_a_new_template_and_leaves_no_temp_files(tmp_path):
    write_demo_set(tmp_path, chat_template="chatml")
    models = write_demo_set(tmp_path, chat_template="kimi")
    assert "<|im_user|>" in field(gguf.GGUFReader(models.model), "tokenizer.chat_template")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-a.gguf", "lora-b.gguf", "model.gguf"]


def test_cli_writes_the_demo_set_and_prints_the_paths(tmp_path, capsys):
    tiny_gguf.main([str(tmp_path), "--chat-template", "kimi"])
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / name) for name in ("model.gguf", "lora-a.gguf", "lora-b.gguf")]
    assert all(Path(p).stat().st_size > 0 for p in printed)
