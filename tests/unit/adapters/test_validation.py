"""Adapter validation from metadata: paths inside roots, PEFT config, safetensors header, GGUF type."""
import pytest

from adapters.validation import AdapterValidationError, validate_adapter
from tests.adapter_files import write_peft, write_safetensors


def test_good_attention_adapter(tmp_path):
    facts = validate_adapter(str(write_peft(tmp_path / "a")), None, [str(tmp_path)])
    assert (facts.rank, facts.alpha, facts.touches_experts) == (8, 16.0, False)


def test_expert_adapter_is_recognised(tmp_path):
    assert validate_adapter(str(write_peft(tmp_path / "a", experts=True)), None, [str(tmp_path)]).touches_experts


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
])
def test_bad_adapters_name_the_problem(tmp_path, make, message):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    with pytest.raises(AdapterValidationError, match=message):
        validate_adapter(make(root, outside), None, [str(root)])


def test_truncated_safetensors_header(tmp_path):
    directory = write_peft(tmp_path / "a")
    weights = directory / "adapter_model.safetensors"
    write_safetensors(weights, {"x.lora_A.weight": [8, 64]}, truncate_to=20)
    with pytest.raises(AdapterValidationError, match="truncated safetensors header"):
        validate_adapter(str(directory), None, [str(tmp_path)])


def test_gguf_must_be_a_lora(tmp_path):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(AdapterValidationError, match="is not a GGUF file"):
        validate_adapter(None, str(not_gguf), [str(tmp_path)])


def test_no_roots_means_no_paths(tmp_path):
    with pytest.raises(AdapterValidationError, match="no adapter_roots"):
        validate_adapter(str(write_peft(tmp_path / "a")), None, [])
