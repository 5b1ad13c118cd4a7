"""Adapter validation against the base model, end to end: real gateway processes configured with
`base_model: {gguf: ...}` (and `{hf_config: ...}`) in front of the SGLang emulator (`max_lora_rank: 8`) and
the real llama-server. Each bad adapter gets a precise 422 from POST /admin/adapters, naming the file and the
expected and found values, and leaves no trace in /admin/adapters or /v1/models; good ones register and
serve. A bad adapter in the config stops `kimi-gateway serve` (and `check`) with exit 1, naming it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from backends.launchers.llamacpp import free_port
from gateway.demo.tiny_gguf import write_tiny_hf_config, write_tiny_lora
from tests.adapter_files import TINY_LLAMA_MODULES, write_peft
from tests.integration.conftest import ROOT
from tests.integration.test_adapter_lifecycle import ENV, admin, ask

MAX_RANK = 8
Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"


def start_sglang(start_process, name: str) -> str:
    """The emulator with the same --max-lora-rank the gateway's config says."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.emulators.sglang", "--port", str(port), "--served-model-name", "kimi",
            "--enable-lora", "--max-loaded-loras", "8", "--max-lora-rank", str(MAX_RANK)]
    start_process(name, argv, f"http://127.0.0.1:{port}/health", env={"PYTHONPATH": str(ROOT)})
    return f"http://127.0.0.1:{port}"


def gateway_config(root: Path, tiny_models, sglang_url: str, llama_url: str, base_model: dict) -> dict:
    return {"adapter_roots": [str(root), str(tiny_models.model.parent)],
            "base_model": base_model,
            "backends": [{"name": "kt", "kind": "sglang", "urls": [sglang_url], "max_lora_rank": MAX_RANK},
                         {"name": "llama", "kind": "llamacpp", "url": llama_url}],
            "adapters": [],
            "routes": [{"name": "kimi-k2.5", "targets": ["kt"]}]}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """One adapter root holding good and bad adapters, and a folder outside it."""
    base = tmp_path_factory.mktemp("validation-live")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    model = tiny_models.model
    no_config = write_peft(root / "no-config", modules=TINY_LLAMA_MODULES)
    (no_config / "adapter_config.json").unlink()
    return {
        "root": root,
        "good-peft": write_peft(root / "good-peft", r=MAX_RANK, modules=TINY_LLAMA_MODULES),
        "wrong-rank": write_peft(root / "wrong-rank", r=8, shape_r=4, modules=TINY_LLAMA_MODULES),
        "rank-over-limit": write_peft(root / "rank-over-limit", r=16, modules=TINY_LLAMA_MODULES),
        "wrong-hidden": write_peft(root / "wrong-hidden", modules={"layers.0.self_attn.q_proj": (64, 32)}),
        "no-config": no_config,
        "other-arch": write_tiny_lora(root / "qwen.gguf", model, seed=5, name="qwen", arch="qwen2"),
        "wrong-shapes": write_tiny_lora(root / "narrow.gguf", model, seed=6, name="narrow",
                                        shapes={"blk.0.attn_q.weight": (64, 32)}),
        "outside": write_peft(outside / "escapee", modules=TINY_LLAMA_MODULES),
        "hf-config": write_tiny_hf_config(base / "config.json"),
    }


@pytest.fixture(scope="module")
def gateways(files, tiny_models, llama_server, start_process, start_gateway) -> dict[str, str]:
    """base kind -> base URL of a gateway validating against that description of the tiny model."""
    sglang = start_sglang(start_process, "sglang-validation")
    bases = {"gguf": {"gguf": str(tiny_models.model)}, "hf_config": {"hf_config": str(files["hf-config"])}}
    return {kind: start_gateway(gateway_config(files["root"], tiny_models, sglang, llama_server, base),
                                name=f"gw-validation-{kind}", env=ENV) for kind, base in bases.items()}


def expected_failures(files: dict[str, Path]) -> dict[str, tuple[dict, list[str]]]:
    """case -> (POST body, the fragments its 422 message must hold: the file, expected and found values)."""
    def peft(case: str) -> dict:
        return {"name": case, "source": str(files[case]), "backends": ["kt"]}

    def gguf(case: str) -> dict:
        return {"name": case, "gguf": str(files[case]), "backends": ["llama"]}

    weights = "/adapter_model.safetensors"
    return {
        "wrong-rank": (peft("wrong-rank"), [f"{files['wrong-rank']}{weights}: tensor '{Q_PROJ}.lora_A.weight'",
                                            "has shape [4, 64]", "does not match r=8"]),
        "rank-over-limit": (peft("rank-over-limit"), [f"{files['rank-over-limit']}/adapter_config.json: r=16",
                                                      "exceeds the backend's max LoRA rank 8"]),
        "wrong-hidden": (peft("wrong-hidden"), [f"{files['wrong-hidden']}{weights}: tensor '{Q_PROJ}.lora_A.weight'",
                                                "its in dimension is 32", "(out, in) = (64, 64)", "expected in=64"]),
        "no-config": (peft("no-config"), [f"source: {files['no-config']} has no adapter_config.json"]),
        "other-arch": (gguf("other-arch"), [f"gguf: {files['other-arch']} is a LoRA for architecture 'qwen2'",
                                            "the base model is 'llama'"]),
        "wrong-shapes": (gguf("wrong-shapes"), [f"gguf: {files['wrong-shapes']}: blk.0.attn_q.weight.lora_a",
                                                "'blk.0.attn_q.weight' is (64, 64)", "expected in=64, found 32"]),
        "outside": (peft("outside"), [f"source: {files['outside']} resolves outside the adapter roots"]),
    }


def listed(base: str) -> tuple[set[str], set[str]]:
    """(names in GET /admin/adapters, ids in GET /v1/models)."""
    adapters = admin(base, "GET", "/adapters")
    models = httpx.get(f"{base}/models", timeout=30)
    assert adapters.status_code == 200 and models.status_code == 200, (adapters.text, models.text)
    return {view["name"] for view in adapters.json()["data"]}, {card["id"] for card in models.json()["data"]}


CASES = ["wrong-rank", "rank-over-limit", "wrong-hidden", "no-config", "other-arch", "wrong-shapes", "outside"]


@pytest.mark.parametrize("base_kind", ["gguf", "hf_config"])
@pytest.mark.parametrize("case", CASES)
def test_bad_adapter_gets_a_precise_422_and_is_not_registered(gateways, files, case, base_kind):
    base = gateways[base_kind]
    body, fragments = expected_failures(files)[case]
    response = admin(base, "POST", "/adapters", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["type"] == "invalid_request_error", error
    missing = [fragment for fragment in fragments if fragment not in error["message"]]
    assert not missing, (missing, error["message"])
    names, models = listed(base)
    assert case not in names and case not in models
    assert admin(base, "GET", f"/adapters/{case}").status_code == 404


@pytest.mark.parametrize("name, artifact, backend", [("good-peft", "source", "kt"), ("good-gguf", "gguf", "llama")])
def test_good_adapter_registers_and_serves(gateways, files, tiny_models, name, artifact, backend):
    base = gateways["gguf"]
    path = files["good-peft"] if artifact == "source" else tiny_models.lora_b  # llama-server has lora-b loaded
    response = admin(base, "POST", "/adapters", json={"name": name, artifact: str(path), "backends": [backend]})
    assert response.status_code == 201, response.text
    view = response.json()
    active = [version for version in view["versions"] if version["status"] == "active"]
    assert len(active) == 1 and active[0]["version"].startswith(view["active"]), view
    assert view["class"] == ("attention" if artifact == "source" else "gguf")
    assert {replica["state"] for replica in view["replicas"]} == {"ready"}, view["replicas"]
    names, models = listed(base)
    assert name in names and name in models
    with httpx.Client(timeout=60) as client:
        answers = [ask(client, base, name, stream) for stream in (False, True)]
    for answer in answers:
        assert answer.status == 200 and answer.text, answer
        assert re.fullmatch(rf"{name}@[0-9a-f]{{8}}", answer.label) and answer.label == f"{name}@{view['active']}"


# --- at start-up: a bad config adapter stops `serve` and `check` ------------------------------------------

STARTUP_CASES = {  # case -> (its file's key, backend, reason fragments)
    "wrong-rank": ("source", "kt", ["adapter_model.safetensors: tensor", "has shape [4, 64]", "does not match r=8"]),
    "rank-over-limit": ("source", "kt", ["r=16 exceeds the backend's max LoRA rank 8"]),
    "other-arch": ("gguf", "llama", ["is a LoRA for architecture 'qwen2', the base model is 'llama'"]),
    "outside": ("source", "kt", ["resolves outside the adapter roots"]),
}


@pytest.mark.parametrize("case", sorted(STARTUP_CASES))
def test_bad_config_adapter_stops_serve_and_check(files, tiny_models, tmp_path, case):
    artifact, backend, reasons = STARTUP_CASES[case]
    config = gateway_config(files["root"], tiny_models, "http://127.0.0.1:9", "http://127.0.0.1:9",
                            {"gguf": str(tiny_models.model)})
    config["adapters"] = [{"name": case, artifact: str(files[case]), "backends": [backend]}]
    config.update(listen={"host": "127.0.0.1", "port": free_port()}, state_dir=str(tmp_path / "state"))
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    for command in (["serve", "--config", str(path)], ["check", str(path)]):
        result = subprocess.run([sys.executable, "-m", "gateway.cli", *command], capture_output=True, text=True,
                                timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 1, (command, result.returncode, result.stdout, result.stderr[-2000:])
        assert f"error: {path}: adapters[0] ({case}): " in result.stderr, result.stderr[-2000:]
        assert str(files[case]) in result.stderr, result.stderr[-2000:]
        missing = [reason for reason in reasons if reason not in result.stderr]
        assert not missing, (missing, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
