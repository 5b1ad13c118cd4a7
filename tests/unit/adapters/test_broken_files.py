"""Broken adapter files: each is an AdapterValidationError (422 at the admin API) naming the file and the problem,
never another exception (a 500); through the admin API nothing is registered and a swap leaves the active
version serving."""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest

from adapters.validation import AdapterValidationError, validate_adapter
from gateway.demo.tiny_gguf import write_tiny_lora, write_tiny_model
from tests.adapter_files import write_peft

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def safetensors(header: dict, data: bytes = b"\0" * 4096) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def tensor(shape: list, offsets: list, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


GOOD_PAIR = {Q_A: tensor([8, 64], [0, 2048]), Q_B: tensor([64, 8], [2048, 4096])}

# (case, adapter_config.json text or None for the good one, adapter_model.safetensors bytes or None, fragment)
PEFT_CASES = [
    ("config-not-json", "{oops", None, "adapter_config.json: cannot be read as JSON"),
    ("config-not-utf8", b"\xff\xfe\x00", None, "adapter_config.json: cannot be read as JSON"),
    ("config-a-list", "[]", None, "adapter_config.json: expected a JSON object, found list"),
    ("config-alpha-nan", '{"peft_type": "LORA", "r": 8, "lora_alpha": NaN, "target_modules": ["q_proj"]}', None,
     "adapter_config.json: lora_alpha must be a positive number"),
    ("config-alpha-infinite", '{"peft_type": "LORA", "r": 8, "lora_alpha": Infinity, "target_modules": ["q"]}',
     None, "adapter_config.json: lora_alpha must be a positive number"),
    ("config-rank-a-string", '{"peft_type": "LORA", "r": "8", "lora_alpha": 16, "target_modules": ["q_proj"]}',
     None, "adapter_config.json: r must be an integer"),
    ("weights-empty", None, b"", "adapter_model.safetensors: truncated safetensors header (file is 0 bytes)"),
    ("weights-garbage", None, b"this is not a safetensors file at all", "adapter_model.safetensors: truncated"),
    ("weights-header-not-json", None, struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", "header is not valid JSON"),
    ("weights-header-a-list", None, safetensors([]), "header is not a JSON object"),   # type: ignore[arg-type]
    ("offsets-strings", None, safetensors({**GOOD_PAIR, Q_A: tensor([8, 64], ["a", 1])}),
     f"tensor '{Q_A}' has no valid data_offsets"),
    ("offsets-floats", None, safetensors({**GOOD_PAIR, Q_A: tensor([8, 64], [0.5, 2048])}),
     "has no valid data_offsets"),
    ("offsets-one-number", None, safetensors({**GOOD_PAIR, Q_A: tensor([8, 64], [0])}), "has no valid data_offsets"),
    ("offsets-past-the-end", None, safetensors({**GOOD_PAIR, Q_B: tensor([64, 8], [2048, 99999])}),
     "points outside the file"),
    ("size-disagrees-with-shape", None, safetensors({**GOOD_PAIR, Q_A: tensor([8, 64], [0, 16])}),
     f"tensor '{Q_A}' holds 16 bytes, but F32 [8, 64] needs 2048"),
    ("unknown-dtype", None, safetensors({**GOOD_PAIR, Q_A: tensor([8, 64], [0, 2048], "F31")}),
     "has an unknown dtype 'F31'"),
    ("shape-with-a-string", None, safetensors({**GOOD_PAIR, Q_A: tensor([8, "64"], [0, 2048])}),
     "has no valid shape"),
    ("no-tensors", None, safetensors({}), "holds no tensors"),
    ("metadata-only", None, safetensors({"__metadata__": {"format": "pt"}}), "holds no tensors"),
]


@pytest.mark.parametrize("case, config, weights, fragment", PEFT_CASES, ids=[c[0] for c in PEFT_CASES])
def test_a_broken_peft_dir_names_the_file_and_the_problem(tmp_path, case, config, weights, fragment):
    directory = write_peft(tmp_path / case)
    if config is not None:
        (directory / "adapter_config.json").write_bytes(config.encode() if isinstance(config, str) else config)
    if weights is not None:
        (directory / "adapter_model.safetensors").write_bytes(weights)
    with pytest.raises(AdapterValidationError) as caught:
        validate_adapter(str(directory), None, [str(tmp_path)])
    assert fragment in str(caught.value) and case in str(caught.value)   # the path names the dir


def test_a_truncated_weights_file_is_refused_at_every_cut(tmp_path):
    """Cut anywhere, the file is refused with a validation error (never an unpacking or type error)."""
    directory = write_peft(tmp_path / "cut")
    weights = directory / "adapter_model.safetensors"
    whole = weights.read_bytes()
    for size in range(0, len(whole) - 1, 7):
        weights.write_bytes(whole[:size])
        with pytest.raises(AdapterValidationError, match="adapter_model.safetensors"):
            validate_adapter(str(directory), None, [str(tmp_path)])


@pytest.mark.parametrize("missing, fragment", [
    ("adapter_config.json", "has no adapter_config.json"),
    ("fused_expert_lora.safetensors", "has no adapter_model.safetensors"),
])
def test_a_kt_sft_checkpoint_missing_a_file(tmp_path, missing, fragment):
    from tests.adapter_files import write_kt_sft

    directory = write_kt_sft(tmp_path / "kt", attention=False)
    (directory / missing).unlink()
    with pytest.raises(AdapterValidationError, match=fragment):
        validate_adapter(str(directory), None, [str(tmp_path)])


def test_a_kt_sft_fused_file_that_is_garbage(tmp_path):
    from tests.adapter_files import write_kt_sft

    directory = write_kt_sft(tmp_path / "kt")
    (directory / "fused_expert_lora.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterValidationError, match="kt/fused_expert_lora.safetensors: truncated"):
        validate_adapter(str(directory), None, [str(tmp_path)])


@pytest.mark.parametrize("content, fragment", [
    (b"", "is not a GGUF file"),
    (b"hello world", "is not a GGUF file"),
    (b"PK\x03\x04 a zip file", "is not a GGUF file"),
    (b"GGUF", "is truncated or corrupt"),
    (b"GGUF" + struct.pack("<I", 3) + struct.pack("<QQ", 2 ** 62, 2 ** 62), "is truncated or corrupt"),
])
def test_a_gguf_that_is_not_gguf(tmp_path, content, fragment):
    path = tmp_path / "lora.gguf"
    path.write_bytes(content)
    with pytest.raises(AdapterValidationError, match=f"gguf: .*lora.gguf {fragment}"):
        validate_adapter(None, str(path), [str(tmp_path)])


def test_a_damaged_gguf_is_a_validation_error_wherever_it_is_damaged(tmp_path):
    """A real GGUF LoRA cut short or with bytes overwritten: valid or a validation error, nothing else."""
    good = write_tiny_lora(tmp_path / "good.gguf", write_tiny_model(tmp_path / "base.gguf"), seed=1, name="a")
    data, rng = good.read_bytes(), random.Random(7)
    path = tmp_path / "damaged.gguf"
    for i in range(120):
        damaged = bytearray(data[:rng.randrange(4, len(data))] if i % 2 else data)
        for _ in range(0 if i % 2 else 16):
            damaged[rng.randrange(4, min(len(damaged), 4096))] = rng.randrange(256)
        path.write_bytes(bytes(damaged))
        try:
            validate_adapter(None, str(path), [str(tmp_path)])
        except AdapterValidationError as error:
            assert "damaged.gguf" in str(error)


def admin_app(tmp_path: Path, monkeypatch):
    from gateway.app import create_app
    from gateway.config import GatewayConfig
    from tests.app_client import running
    from tests.emulators.fake_driver import FakeDriver

    monkeypatch.setenv("KIMI_GATEWAY_ADMIN_KEYS", "admin-secret")
    config = GatewayConfig.model_validate({
        "state_dir": str(tmp_path / "state"), "adapter_roots": [str(tmp_path / "roots")],
        "backends": [{"name": "kt", "kind": "sglang", "url": "http://127.0.0.1:9"}]})
    return running(create_app(config, drivers={"kt": FakeDriver("kt")}))


ADMIN = {"authorization": "Bearer admin-secret"}


@pytest.mark.parametrize("case, config, weights, fragment", [c for c in PEFT_CASES if c[0] in (
    "config-not-json", "offsets-strings", "size-disagrees-with-shape", "no-tensors", "weights-garbage")])
async def test_the_admin_api_answers_422_and_registers_nothing(tmp_path, monkeypatch, case, config, weights,
                                                                fragment):
    good = write_peft(tmp_path / "roots" / "good")
    bad = write_peft(tmp_path / "roots" / case)
    if config is not None:
        (bad / "adapter_config.json").write_text(config)
    if weights is not None:
        (bad / "adapter_model.safetensors").write_bytes(weights)
    async with admin_app(tmp_path, monkeypatch) as client:
        added = await client.post("/admin/adapters", headers=ADMIN,
                                  json={"name": "legal", "source": str(bad), "backends": ["kt"]})
        assert added.status_code == 422 and fragment in added.json()["error"]["message"], added.text
        assert (await client.get("/admin/adapters", headers=ADMIN)).json()["data"] == []
        assert (await client.post("/admin/adapters", headers=ADMIN, json={
            "name": "legal", "source": str(good), "backends": ["kt"]})).status_code == 201
        before = (await client.get("/admin/adapters/legal", headers=ADMIN)).json()
        swapped = await client.post("/admin/adapters/legal/swap", headers=ADMIN, json={"source": str(bad)})
        assert swapped.status_code == 422 and fragment in swapped.json()["error"]["message"], swapped.text
        assert (await client.get("/admin/adapters/legal", headers=ADMIN)).json() == before
