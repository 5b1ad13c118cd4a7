"""Adapter validation against the base model: PEFT shapes and layers from its dims (llama attention, Kimi/DeepSeek
MLA, dense and expert MLPs), GGUF LoRAs against its architecture and real tensor shapes (llama.cpp's load test)."""
import json

import pytest

from adapters.base_model import dims_from_gguf, dims_from_hf_config
from adapters.validation import AdapterValidationError, validate_adapter
from gateway.demo.tiny_gguf import LORA_TARGETS, build_vocab, tensor_shapes, write_tiny_hf_config, write_tiny_lora, \
    write_tiny_model
from tests.adapter_files import KIMI_MINI, KIMI_MINI_ATTENTION, KIMI_MINI_EXPERTS, KIMI_PREFIX, TINY_LLAMA_MODULES, \
    write_peft


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def model(root):
    return write_tiny_model(root / "model.gguf")


@pytest.fixture(scope="module", params=["hf_config", "gguf"])
def base(request, root, model):
    """The tiny model's dims, once from its HF-style config.json and once from its GGUF: both must judge alike."""
    if request.param == "gguf":
        return dims_from_gguf(model)
    return dims_from_hf_config(write_tiny_hf_config(root / "config.json"))


@pytest.fixture(scope="module")
def kimi(root):
    (root / "kimi").mkdir()
    (root / "kimi" / "config.json").write_text(json.dumps(KIMI_MINI))
    return dims_from_hf_config(root / "kimi" / "config.json")


def lora_targets() -> dict[str, tuple[int, int]]:
    return {name: shape for name, shape in tensor_shapes(len(build_vocab().tokens)).items()
            if name.split(".")[-2] in LORA_TARGETS}


def check(path, base, **kwargs):
    return validate_adapter(str(path), None, [str(path.parent)], base, **kwargs)


def check_gguf(path, base):
    return validate_adapter(None, str(path), [str(path.parent)], base)


def test_good_peft_and_gguf_pass_with_one_base(tmp_path, model, base):
    source = write_peft(tmp_path / "peft", modules=TINY_LLAMA_MODULES, r=4)
    lora = write_tiny_lora(tmp_path / "lora.gguf", model, seed=1, name="x")
    facts = validate_adapter(str(source), str(lora), [str(tmp_path)], base, max_rank=4)
    assert (facts.adapter_class, facts.rank, facts.gguf_architecture) == ("attention", 4, "llama")
    assert check_gguf(lora, base).adapter_class == "gguf"


def test_wrong_hidden_size_for_the_base(tmp_path, base):
    source = write_peft(tmp_path / "a", modules={"layers.0.self_attn.q_proj": (64, 96)})
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(AdapterValidationError) as caught:
        check(source, base)
    assert str(caught.value) == (
        f"{source}/adapter_model.safetensors: tensor '{key}' has shape [8, 96]: its in dimension is 96, but the "
        "base model's layers.0.self_attn.q_proj is (out, in) = (64, 64), so expected in=64")


@pytest.mark.parametrize("module, shape, message", [
    ("layers.1.mlp.gate_proj", (96, 64), r"its out dimension is 96, .* layers.1.mlp.gate_proj is \(out, in\) = "
                                         r"\(128, 64\), so expected out=128"),
    ("layers.0.mlp.down_proj", (64, 64), "so expected in=128"),
    ("layers.0.self_attn.k_proj", (32, 64), "so expected out=64"),
    ("layers.2.self_attn.q_proj", (64, 64), r"is for layer 2, but the base model has 2 layers \(0-1\)"),
    ("layers.0.mlp.experts.0.gate_proj", (128, 64), "has no routed experts"),
    ("layers.0.self_attn.kv_b_proj", (64, 64), "has no kv_b_proj"),
])
def test_peft_shape_against_the_base(tmp_path, base, module, shape, message):
    with pytest.raises(AdapterValidationError, match=message):
        check(write_peft(tmp_path / "a", modules={module: shape}), base)


def test_unknown_modules_are_not_checked(tmp_path, base):
    facts = check(write_peft(tmp_path / "a", modules={"layers.0.self_attn.rotary_mixer": (3, 5)}), base)
    assert facts.adapter_class == "attention"


@pytest.mark.parametrize("modules, adapter_class", [
    (KIMI_MINI_ATTENTION, "attention"),
    (KIMI_MINI_ATTENTION | KIMI_MINI_EXPERTS, "experts"),
])
def test_kimi_shaped_adapters_fit_a_nested_text_config(tmp_path, kimi, modules, adapter_class):
    source = write_peft(tmp_path / "a", modules=modules, prefix=KIMI_PREFIX)
    assert check(source, kimi).adapter_class == adapter_class


@pytest.mark.parametrize("module, shape, message", [
    ("layers.0.self_attn.kv_b_proj", (32, 16), r"kv_b_proj is \(out, in\) = \(32, 8\), so expected in=8"),
    ("layers.0.self_attn.q_b_proj", (32, 16), "so expected out=24"),
    ("layers.1.self_attn.kv_a_proj_with_mqa", (8, 32), "so expected out=12"),
    ("layers.0.self_attn.k_proj", (32, 32), r"has no k_proj \(its MLA attention uses"),
    ("layers.0.self_attn.q_proj", (24, 32), "has no q_proj"),
    ("layers.0.mlp.experts.0.up_proj", (24, 32), "layer 0 of the base model is dense"),
    ("layers.1.mlp.gate_proj", (48, 32), "layer 1 of the base model is a MoE layer"),
    ("layers.1.mlp.experts.4.up_proj", (24, 32), r"has 4 routed experts \(0-3\), not expert 4"),
    ("layers.1.mlp.experts.0.down_proj", (32, 48), "so expected in=24"),
    ("layers.1.mlp.shared_experts.gate_proj", (48, 32), "so expected out=24"),
])
def test_kimi_shaped_adapter_errors(tmp_path, kimi, module, shape, message):
    with pytest.raises(AdapterValidationError, match=message):
        check(write_peft(tmp_path / "a", modules={module: shape}, prefix=KIMI_PREFIX), kimi)


def test_gguf_of_another_architecture(tmp_path, model, base):
    lora = write_tiny_lora(tmp_path / "x.gguf", model, seed=1, name="x", arch="qwen2")
    with pytest.raises(AdapterValidationError) as caught:
        check_gguf(lora, base)
    assert str(caught.value) == f"gguf: {lora} is a LoRA for architecture 'qwen2', the base model is 'llama'"


def test_tiny_gguf_is_not_for_a_kimi_base(tmp_path, model, kimi):
    lora = write_tiny_lora(tmp_path / "x.gguf", model, seed=1, name="x")
    with pytest.raises(AdapterValidationError, match="architecture 'llama', the base model is 'deepseek2'"):
        check_gguf(lora, kimi)


def test_gguf_with_wrong_shapes(tmp_path, model, base):
    lora = write_tiny_lora(tmp_path / "x.gguf", model, seed=1, name="x",
                           shapes=lora_targets() | {"blk.0.attn_k.weight": (64, 65)})
    with pytest.raises(AdapterValidationError) as caught:
        check_gguf(lora, base)
    assert str(caught.value) == (
        f"gguf: {lora}: blk.0.attn_k.weight.lora_a/.lora_b fit a base tensor of (out, in) = (64, 65), but the base "
        "model's 'blk.0.attn_k.weight' is (64, 64): expected in=64, found 65")


def test_gguf_with_wrong_out_dimension(tmp_path, model, base):
    lora = write_tiny_lora(tmp_path / "x.gguf", model, seed=1, name="x",
                           shapes=lora_targets() | {"blk.1.ffn_up.weight": (64, 64)})
    with pytest.raises(AdapterValidationError, match=r"'blk.1.ffn_up.weight' is \(128, 64\): expected out=128, "
                                                     "found 64"):
        check_gguf(lora, base)


def test_gguf_lora_for_a_tensor_the_base_lacks(tmp_path, model, base):
    lora = write_tiny_lora(tmp_path / "x.gguf", model, seed=1, name="x",
                           shapes=lora_targets() | {"blk.2.attn_q.weight": (64, 64)})
    with pytest.raises(AdapterValidationError, match=r"adapts 'blk.2.attn_q.weight', which does not exist in the "
                                                     "base model"):
        check_gguf(lora, base)


def test_peft_checks_need_no_base(tmp_path):
    """Without base dims only what the adapter says about itself is checked (the pre-base behaviour)."""
    facts = check(write_peft(tmp_path / "a", modules={"layers.9.self_attn.q_proj": (7, 96)}), None)
    assert facts.rank == 8
