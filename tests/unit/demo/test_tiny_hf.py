"""The tiny model's HF twin and PEFT twins: the same weights under HF names, adapters that validate against
the tiny base, and the q/k row order llama.cpp's converter undoes (proven with the real tool in
tests/integration/test_conversion_live.py)."""
import numpy as np

from adapters.base_model import dims_from_gguf
from adapters.validation import validate_adapter
from gateway.demo import tiny_gguf, tiny_hf


def test_unpermute_is_the_inverse_of_llama_cpps_permute():
    rows = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    permuted = rows.reshape(4, 2, 8, 3).swapaxes(1, 2).reshape(64, 3)  # conversion/llama.py LlamaModel.permute
    assert np.array_equal(tiny_hf.unpermute(permuted, 4), rows)
    assert not np.array_equal(permuted, rows)


def test_twins_round_trip_and_validate(tmp_path):
    model = tiny_gguf.write_tiny_model(tmp_path / "model.gguf")
    twin = tiny_hf.read_safetensors(tiny_hf.write_hf_twin(tmp_path / "hf", model) / "model.safetensors")
    weights = tiny_hf.gguf_tensors(model)
    assert np.array_equal(twin["lm_head.weight"], weights["output.weight"])
    assert np.array_equal(twin["model.layers.1.self_attn.v_proj.weight"], weights["blk.1.attn_v.weight"])
    peft = tiny_hf.write_peft_twin(tmp_path / "peft", model, seed=3)
    facts = validate_adapter(str(peft), None, [str(tmp_path)], dims_from_gguf(model))
    assert (facts.rank, facts.alpha, facts.adapter_class) == (4, 4.0, "attention")
    assert set(facts.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    a, b = tiny_hf.lora_matrices(model, seed=3)["blk.0.ffn_up.weight"]
    stored = tiny_hf.read_safetensors(peft / "adapter_model.safetensors")
    assert np.array_equal(stored["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"], a)
    assert np.array_equal(stored["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"], b)
    direct = tiny_hf.gguf_tensors(tiny_gguf.write_tiny_lora(tmp_path / "l.gguf", model, seed=3, name="l"))
    assert np.array_equal(direct["blk.0.ffn_up.weight.lora_a"], a)   # the same draws as write_tiny_lora
