"""Adapter validation from metadata: paths inside roots, PEFT config, safetensors header, GGUF type, the
backend's rank limit, the adapter's class and its content hash (no base model given)."""
import json
import shutil

import pytest

from adapters.validation import AdapterValidationError, validate_adapter
from gateway.demo.tiny_gguf import write_tiny_lora, write_tiny_model
from tests.adapter_files import write_peft, write_safetensors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, base model, a good GGUF LoRA for it), the files inside root."""
    root = tmp_path_factory.mktemp("tiny")
    model = write_tiny_model(root / "model.gguf")
    return root, model, write_tiny_lora(root / "lora.gguf", model, seed=1, name="lora")


def test_good_attention_adapter(tmp_path):
    facts = validate_adapter(str(write_peft(tmp_path / "a")), None, [str(tmp_path)])
    assert (facts.rank, facts.alpha, facts.target_modules) == (8, 16.0, ("q_proj",))
    assert (facts.adapter_class, facts.touches_experts) == ("attention", False)
    assert facts.source_path == str((tmp_path / "a").resolve()) and facts.gguf_path is None


def test_expert_adapter_is_recognised(tmp_path):
    facts = validate_adapter(str(write_peft(tmp_path / "a", experts=True)), None, [str(tmp_path)])
    assert (facts.adapter_class, facts.touches_experts) == ("experts", True)


def test_gguf_only_adapter(tiny):
    root, _, lora = tiny
    facts = validate_adapter(None, str(lora), [str(root)])
    assert (facts.adapter_class, facts.rank, facts.alpha, facts.gguf_architecture) == ("gguf", 4, 4.0, "llama")
    assert facts.target_modules == ("attn_k", "attn_output", "attn_q", "attn_v", "ffn_down", "ffn_gate", "ffn_up")
    assert facts.gguf_path == str(lora.resolve()) and facts.source_path is None


def test_peft_and_gguf_together_take_the_class_from_peft_and_hash_both(tiny):
    root, _, lora = tiny
    source = write_peft(root / "both")
    both = validate_adapter(str(source), str(lora), [str(root)])
    alone = validate_adapter(str(source), None, [str(root)])
    assert (both.adapter_class, both.gguf_architecture, both.rank) == ("attention", "llama", 8)
    assert both.content_hash != alone.content_hash


@pytest.mark.parametrize("make, message", [
    (lambda root, out: str(root / ".." / "x"), "'..' is not allowed"),
    (lambda root, out: str(write_peft(out / "elsewhere")), "resolves outside the adapter roots"),
    (lambda root, out: (root / "link").symlink_to(write_peft(out / "target")) or str(root / "link"),
     "resolves outside the adapter roots"),
    (lambda root, out: str(root / "missing"), "does not exist"),
    (lambda root, out: str(write_peft(root / "a", r=0)), "r must be an integer"),
    (lambda root, out: str(write_peft(root / "a", r="8", shape_r=8)), "r must be an integer"),
    (lambda root, out: str(write_peft(root / "a", r=8, shape_r=4)), "does not match r=8"),
    (lambda root, out: str(write_peft(root / "a", peft_type="IA3")), "peft_type must be LORA"),
    (lambda root, out: str(write_peft(root / "a", lora_alpha="16")), "lora_alpha must be a positive number"),
    (lambda root, out: str(write_peft(root / "a", target_modules={"q_proj": 1})),
     "target_modules must be a non-empty list"),
])
def test_bad_adapters_name_the_problem(tmp_path, make, message):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    with pytest.raises(AdapterValidationError, match=message):
        validate_adapter(make(root, outside), None, [str(root)])


def test_missing_adapter_config_names_the_dir_as_given(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    directory = write_peft(tmp_path / "real" / "a")
    (directory / "adapter_config.json").unlink()
    given = str(tmp_path / "alias" / "a")
    with pytest.raises(AdapterValidationError) as caught:
        validate_adapter(given, None, [str(tmp_path)])
    assert str(caught.value) == f"source: {given} has no adapter_config.json"


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_file_symlinked_out_of_the_roots(tmp_path, name):
    root = tmp_path / "root"
    directory = write_peft(root / "a")
    outside = write_peft(tmp_path / "outside")
    (directory / name).unlink()
    (directory / name).symlink_to(outside / name)
    message = f"^source: {directory}/{name} resolves outside the adapter roots$"
    with pytest.raises(AdapterValidationError, match=message):
        validate_adapter(str(directory), None, [str(root)])


def test_adapter_config_that_is_not_json(tmp_path):
    directory = write_peft(tmp_path / "a")
    (directory / "adapter_config.json").write_text("{'r': 8")
    with pytest.raises(AdapterValidationError, match=r"a/adapter_config.json: cannot be read as JSON"):
        validate_adapter(str(directory), None, [str(tmp_path)])


@pytest.mark.parametrize("field", ["r", "lora_alpha", "target_modules"])
def test_adapter_config_field_missing(tmp_path, field):
    directory = write_peft(tmp_path / "a")
    config = json.loads((directory / "adapter_config.json").read_text())
    del config[field]
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterValidationError, match=f"adapter_config.json: {field} is missing"):
        validate_adapter(str(directory), None, [str(tmp_path)])


def test_lora_a_without_lora_b(tmp_path):
    directory = write_peft(tmp_path / "a")
    write_safetensors(directory / "adapter_model.safetensors",
                      {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": [8, 64]})
    with pytest.raises(AdapterValidationError, match=r"self_attn.q_proj has lora_A but no lora_B"):
        validate_adapter(str(directory), None, [str(tmp_path)])


def test_truncated_safetensors_header(tmp_path):
    directory = write_peft(tmp_path / "a")
    weights = directory / "adapter_model.safetensors"
    write_safetensors(weights, {"x.lora_A.weight": [8, 64]}, truncate_to=20)
    with pytest.raises(AdapterValidationError, match="truncated safetensors header"):
        validate_adapter(str(directory), None, [str(tmp_path)])


def test_every_safetensors_file_in_the_dir_is_checked(tmp_path):
    """SGLang loads every *.safetensors in an adapter dir, not only adapter_model.safetensors."""
    directory = write_peft(tmp_path / "a")
    write_safetensors(directory / "extra.safetensors", {"m.layers.0.self_attn.v_proj.lora_A.weight": [4, 64],
                                                        "m.layers.0.self_attn.v_proj.lora_B.weight": [64, 4]})
    with pytest.raises(AdapterValidationError, match=r"a/extra.safetensors: tensor .* does not match r=8"):
        validate_adapter(str(directory), None, [str(tmp_path)])


def test_rank_over_the_backends_limit(tmp_path):
    directory = str(write_peft(tmp_path / "a", r=64))
    with pytest.raises(AdapterValidationError) as caught:
        validate_adapter(directory, None, [str(tmp_path)], max_rank=16)
    assert str(caught.value) == f"{directory}/adapter_config.json: r=64 exceeds the backend's max LoRA rank 16"
    assert validate_adapter(directory, None, [str(tmp_path)], max_rank=64).rank == 64


def test_the_rank_limit_does_not_apply_to_a_gguf(tiny):
    root, _, lora = tiny
    assert validate_adapter(None, str(lora), [str(root)], max_rank=2).rank == 4


def test_gguf_must_be_a_gguf(tmp_path):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(AdapterValidationError, match="is not a GGUF file"):
        validate_adapter(None, str(not_gguf), [str(tmp_path)])


def test_gguf_model_is_not_a_lora(tiny):
    root, model, _ = tiny
    with pytest.raises(AdapterValidationError, match=r"is not a LoRA adapter \(general.type must be 'adapter', "
                                                     r"found None\)"):
        validate_adapter(None, str(model), [str(root)])


def test_gguf_outside_the_roots(tiny, tmp_path):
    root, _, lora = tiny
    with pytest.raises(AdapterValidationError, match=f"^gguf: {lora} resolves outside the adapter roots$"):
        validate_adapter(None, str(lora), [str(tmp_path)])


def test_no_roots_means_no_paths(tmp_path):
    with pytest.raises(AdapterValidationError, match="no adapter_roots"):
        validate_adapter(str(write_peft(tmp_path / "a")), None, [])


def test_content_hash_is_stable_and_follows_every_byte(tmp_path, tiny):
    first = validate_adapter(str(write_peft(tmp_path / "a")), None, [str(tmp_path)]).content_hash
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert len(first) == 64 and int(first, 16) >= 0
    assert validate_adapter(str(tmp_path / "b"), None, [str(tmp_path)]).content_hash == first  # moved: same id
    weights = tmp_path / "b" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of tensor data: the header still validates
    weights.write_bytes(bytes(data))
    assert validate_adapter(str(tmp_path / "b"), None, [str(tmp_path)]).content_hash != first
    root, _, lora = tiny
    gguf_hash = validate_adapter(None, str(lora), [str(root)]).content_hash
    changed = root / "changed.gguf"
    data = bytearray(lora.read_bytes())
    data[-1] ^= 0x01
    changed.write_bytes(bytes(data))
    assert validate_adapter(None, str(changed), [str(root)]).content_hash != gguf_hash


def test_a_tilde_in_roots_and_paths_is_the_home_directory(tmp_path, monkeypatch):
    """`~/adapters` in adapter_roots and `~/adapters/a` as a source mean the gateway user's home, as in a shell."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_peft(tmp_path / "adapters" / "a")
    facts = validate_adapter("~/adapters/a", None, ["~/adapters"])
    assert facts.source_path == str((tmp_path / "adapters" / "a").resolve())
    with pytest.raises(AdapterValidationError, match="resolves outside the adapter roots"):
        validate_adapter("~/adapters/a", None, ["~/elsewhere"])
