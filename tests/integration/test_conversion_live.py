"""Conversion with the real tools: llama.cpp's convert_lora_to_gguf.py on a PEFT adapter of the tiny model's
HF twin, proven right on the real llama-server (the same greedy outputs as the GGUF LoRA written directly
from the same A/B matrices, and not the base model's), and kt-kernel's convert_kt_to_sglang_adapter.py on a
KT-SFT checkpoint, whose output SGLang's loading rules (the emulator) accept. Then both in one admin call
through the gateway, and the ways a conversion fails.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from adapters.base_model import dims_from_gguf, dims_from_hf_config
from adapters.conversion import (
    KT_TO_SGLANG,
    PEFT_TO_GGUF,
    ConversionError,
    ConversionSettings,
    ToolConverter,
    plan,
)
from adapters.validation import validate_adapter
from backends.launchers.llamacpp import LlamaServerLaunch, free_port
from gateway.demo import tiny_gguf, tiny_hf
from tests.adapter_files import KIMI_MINI, kimi_attention_matrices, kt_sft_matrices, write_kt_sft
from tests.emulators.sglang_lora import adapter_dir_error
from tests.integration.conftest import ROOT

ADMIN_KEY = "admin-key-for-conversion-tests"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
ENV = {"KIMI_GATEWAY_ADMIN_KEYS": ADMIN_KEY}
PROMPTS = ("Tell me about the blue river", "the old king walks home", "north wind and snow")
LORA_SEED = 11


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """The tiny model, its HF twin, a GGUF LoRA written directly and the PEFT adapter of the same matrices."""
    root = tmp_path_factory.mktemp("conversion")
    model = tiny_gguf.write_tiny_model(root / "model.gguf")
    return {"root": root, "model": model, "hf": tiny_hf.write_hf_twin(root / "hf", model),
            "direct": tiny_gguf.write_tiny_lora(root / "direct.gguf", model, seed=LORA_SEED, name="direct"),
            "peft": tiny_hf.write_peft_twin(root / "peft", model, seed=LORA_SEED)}


def tool(converters, cache: Path, base_config: Path | None, base=None, timeout_s: float = 600) -> ToolConverter:
    return ToolConverter(ConversionSettings(
        cache_dir=cache, llama_cpp_python=str(converters.llama_cpp_python),
        llama_cpp_dir=str(converters.llama_cpp_dir), kt_python=str(converters.kt_python),
        base_hf_config=str(base_config) if base_config else None, base_name="moonshotai/Kimi-K2.5",
        timeout_s=timeout_s), base)


def greedy(url: str, prompt: str, lora: list[dict]) -> str:
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 24, "lora": lora}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


# --- PEFT -> GGUF ----------------------------------------------------------------------------------------------

def test_the_hf_twin_holds_the_gguf_weights(family):
    """What convert_hf_to_gguf.py's llama mapping does to the twin (q/k rows permuted) gives the GGUF back."""
    gguf_weights = tiny_hf.gguf_tensors(family["model"])
    twin = tiny_hf.read_safetensors(family["hf"] / "model.safetensors")
    assert len(twin) == len(gguf_weights)
    q, k = twin["model.layers.1.self_attn.q_proj.weight"], twin["model.layers.1.self_attn.k_proj.weight"]

    def permute(w, n):   # llama.cpp conversion/llama.py LlamaModel.permute
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    assert np.array_equal(permute(q, tiny_gguf.N_HEAD), gguf_weights["blk.1.attn_q.weight"])
    assert np.array_equal(permute(k, tiny_gguf.N_HEAD_KV), gguf_weights["blk.1.attn_k.weight"])
    assert not np.array_equal(q, gguf_weights["blk.1.attn_q.weight"])  # the permutation is not a no-op here
    assert np.array_equal(twin["model.layers.0.mlp.down_proj.weight"], gguf_weights["blk.0.ffn_down.weight"])
    assert json.loads((family["hf"] / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


async def test_peft_converted_by_llama_cpp_serves_exactly_like_the_direct_gguf(
        converters, family, llama_binary, start_process, tmp_path):
    facts = validate_adapter(str(family["peft"]), None, [str(family["root"])], dims_from_gguf(family["model"]))
    made = await tool(converters, tmp_path / "cache", family["hf"] / "config.json",
                      dims_from_gguf(family["model"])).convert(facts, [PEFT_TO_GGUF])
    converted = Path(made["gguf"])
    assert converted == tmp_path / "cache" / facts.content_hash / "adapter.gguf"
    direct, ours = tiny_hf.gguf_tensors(family["direct"]), tiny_hf.gguf_tensors(converted)
    assert sorted(direct) == sorted(ours) and all(np.array_equal(direct[k], ours[k]) for k in direct)

    launch = LlamaServerLaunch(llama_binary, family["model"], (family["direct"], converted), port=free_port(),
                               threads=1, extra=("-np", "1"))
    start_process("llama-server-conversion", launch.argv(), f"{launch.url}/health")
    for prompt in PROMPTS:
        base = greedy(launch.url, prompt, [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}])
        from_direct = greedy(launch.url, prompt, [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.0}])
        from_converted = greedy(launch.url, prompt, [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}])
        assert from_converted == from_direct, prompt
        assert from_converted != base, prompt


async def test_a_peft_dir_for_another_architecture_fails_with_the_tools_last_lines(converters, family, tmp_path):
    base = tmp_path / "other"
    base.mkdir()
    config = {**tiny_gguf.tiny_hf_config(), "architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}
    (base / "config.json").write_text(json.dumps(config))
    facts = validate_adapter(str(family["peft"]), None, [str(family["root"])])
    with pytest.raises(ConversionError, match="convert_lora_to_gguf.py failed \\(exit 1\\).*its last lines:\n"
                                              "(.|\n)*NoSuchForCausalLM"):
        await tool(converters, tmp_path / "cache", base / "config.json").convert(facts, [PEFT_TO_GGUF])
    assert [p.name for p in (tmp_path / "cache" / facts.content_hash).iterdir()] == []


async def test_a_missing_base_config_and_a_timeout_leave_nothing_behind(converters, family, tmp_path):
    facts = validate_adapter(str(family["peft"]), None, [str(family["root"])])
    (tmp_path / "base").mkdir()   # the base model's dir, without its config.json
    with pytest.raises(ConversionError, match="failed \\(exit 1\\)(.|\n)*No such file or directory: "
                                              f"'{tmp_path}/base/config.json'"):
        await tool(converters, tmp_path / "cache", tmp_path / "base" / "config.json").convert(facts, [PEFT_TO_GGUF])
    with pytest.raises(ConversionError, match="timed out after"):
        await tool(converters, tmp_path / "cache", family["hf"] / "config.json",
                   timeout_s=0.5).convert(facts, [PEFT_TO_GGUF])
    assert [p.name for p in (tmp_path / "cache" / facts.content_hash).iterdir()] == []


def kimi_peft(directory: Path, with_kv_b: bool) -> Path:
    tensors = {k: v for k, v in kimi_attention_matrices().items() if with_kv_b or "kv_b_proj" not in k}
    directory.mkdir(parents=True)
    tiny_hf.write_safetensors(directory / "adapter_model.safetensors", tensors)
    modules = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"] + (["kv_b_proj"] if with_kv_b else [])
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                               "target_modules": modules}))
    return directory


async def test_kimi_attention_lora_converts_to_gguf_except_on_kv_b_proj(converters, tmp_path):
    """A Kimi-K2.5-shaped base (kimi_k25, text model under text_config, MLA): llama.cpp's converter maps the MLA
    projections, but raises NotImplementedError on kv_b_proj, which is why plan() refuses that one up front."""
    config = tmp_path / "kimi" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(KIMI_MINI))
    converter = tool(converters, tmp_path / "cache", config)
    good = validate_adapter(str(kimi_peft(tmp_path / "good", False)), None, [str(tmp_path)])
    made = await converter.convert(good, [PEFT_TO_GGUF])
    names = set(tiny_hf.gguf_tensors(Path(made["gguf"])))
    assert {"blk.0.attn_q_a.weight.lora_a", "blk.1.attn_q_b.weight.lora_b", "blk.1.attn_kv_a_mqa.weight.lora_a",
            "blk.0.attn_output.weight.lora_b"} <= names and len(names) == 16
    bad = validate_adapter(str(kimi_peft(tmp_path / "bad", True)), None, [str(tmp_path)])
    with pytest.raises(ConversionError, match="cannot convert a LoRA on kv_b_proj"):
        plan(bad, {"gguf": "llamacpp"})
    with pytest.raises(ConversionError, match="failed \\(exit 1\\)(.|\n)*NotImplementedError"):
        await converter.convert(bad, [PEFT_TO_GGUF])


# --- KT-SFT -> SGLang ------------------------------------------------------------------------------------------

@pytest.fixture
def kimi_base(tmp_path):
    path = tmp_path / "kimi" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(KIMI_MINI))
    return path


async def test_kt_sft_converted_for_sglang_has_what_sglang_loads(converters, kimi_base, tmp_path):
    checkpoint = write_kt_sft(tmp_path / "kt-sft", rank=4, alpha=8.0, seed=5)
    base = dims_from_hf_config(kimi_base)
    facts = validate_adapter(str(checkpoint), None, [str(tmp_path)], base)
    made = await tool(converters, tmp_path / "cache", kimi_base, base).convert(facts, [KT_TO_SGLANG])
    out = Path(made["sglang"])
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["bias"], config["task_type"]) == \
        ("LORA", 4, 8.0, "none", "CAUSAL_LM")
    assert config["base_model_name_or_path"] == "moonshotai/Kimi-K2.5"
    assert set(config["target_modules"]) == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"}
    tensors = tiny_hf.read_safetensors(out / "adapter_model.safetensors")
    fused, attention = kt_sft_matrices(rank=4, seed=5), kimi_attention_matrices(rank=4, seed=6)
    expected = {key.removeprefix("base_model.model."): value for key, value in attention.items()}
    experts = KIMI_MINI["text_config"]["n_routed_experts"]
    for name, value in fused.items():
        _, layer, _, kt_name = name.split(".")
        proj, part = kt_name.split("_lora_")
        for expert in range(experts):   # [E, r, in] / [E, out, r] -> per-expert PEFT lora_A (r, in) / lora_B (out, r)
            key = f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.lora_{part.upper()}.weight"
            expected[key] = value[expert]
    assert sorted(tensors) == sorted(expected)
    assert all(np.array_equal(tensors[key], expected[key]) for key in expected)
    assert tensors["model.layers.1.mlp.experts.3.down_proj.lora_A.weight"].shape == (4, 24)

    # SGLang's loading rules: the converted dir loads, the raw checkpoint and a corrupted copy do not.
    assert adapter_dir_error("legal", str(out), max_rank=8) is None
    assert "raw KT training adapter" in adapter_dir_error("legal", str(checkpoint), max_rank=8)
    corrupted = tmp_path / "corrupted"
    shutil.copytree(out, corrupted)
    weights = corrupted / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert adapter_dir_error("legal", str(corrupted), max_rank=8) == \
        "Error while deserializing header: MetadataIncompleteBuffer"
    assert adapter_dir_error("legal", str(out), max_rank=2).startswith("LoRA adapter legal with rank 4")


async def test_a_kt_converter_crash_leaves_the_tools_last_lines(converters, kimi_base, tmp_path):
    checkpoint = write_kt_sft(tmp_path / "kt-sft")
    facts = validate_adapter(str(checkpoint), None, [str(tmp_path)])
    # Changed after validation, to a rank the converter itself refuses: a non-expert r=2 beside experts of r=4.
    tiny_hf.write_safetensors(checkpoint / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": np.zeros((2, 16), "f4"),
        "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight": np.zeros((32, 2), "f4")})
    with pytest.raises(ConversionError, match="convert_kt_to_sglang_adapter.py failed \\(exit 1\\)"
                                              "(.|\n)*rank mismatch"):
        await tool(converters, tmp_path / "cache", kimi_base).convert(facts, [KT_TO_SGLANG])
    assert [p.name for p in (tmp_path / "cache" / facts.content_hash).iterdir()] == []


# --- one admin call through the gateway -------------------------------------------------------------------------

def admin(base: str, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{base.removesuffix('/v1')}/admin{path}", headers=ADMIN, timeout=600, **kwargs)


def chat(base: str, model: str, prompt: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 24}
    response = httpx.post(f"{base}/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_registering_a_peft_adapter_for_llama_cpp_converts_verifies_and_serves_it(
        converters, family, llama_binary, start_gateway):
    port = free_port()
    base = start_gateway({
        "adapter_roots": [str(family["root"])],
        "base_model": {"hf_config": str(family["hf"] / "config.json"), "gguf": str(family["model"])},
        "conversion": {"llama_cpp_python": str(converters.llama_cpp_python),
                       "llama_cpp_dir": str(converters.llama_cpp_dir), "kt_python": str(converters.kt_python)},
        "backends": [{"name": "llama", "kind": "llamacpp", "url": f"http://127.0.0.1:{port}",
                      "launch": {"binary": str(llama_binary), "model": str(family["model"]), "threads": 1}}],
        "adapters": [{"name": "direct", "gguf": str(family["direct"]), "backends": ["llama"]}],
        "routes": [{"name": "kimi-k2.5", "targets": ["llama"]}],
    }, name="gateway-conversion", env={**ENV, "PYTHONPATH": str(ROOT)})
    response = admin(base, "POST", "/adapters", json={"name": "trained", "source": str(family["peft"]),
                                                        "backends": ["llama"]})
    assert response.status_code == 201, response.text
    view = admin(base, "GET", "/adapters/trained").json()
    active = next(v for v in view["versions"] if v["status"] == "active")
    assert active["source"] == str(family["peft"]) and active["gguf"] is None
    assert active["converted"]["gguf"].endswith(f"/converted/{active['version']}/adapter.gguf")
    assert {r["state"] for r in view["replicas"]} == {"ready"}
    for prompt in PROMPTS:
        assert chat(base, "trained", prompt) == chat(base, "direct", prompt) != chat(base, "kimi-k2.5", prompt)

    # A PEFT dir the converter cannot take: 422 with the tool's last lines, nothing registered.
    bad = family["root"] / "bad-peft"
    shutil.copytree(family["peft"], bad)
    tensors = tiny_hf.read_safetensors(bad / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.weight"] = np.zeros((64, 64), "f4")  # not LoRA
    tiny_hf.write_safetensors(bad / "adapter_model.safetensors", tensors)
    response = admin(base, "POST", "/adapters", json={"name": "bad", "source": str(bad), "backends": ["llama"]})
    assert response.status_code == 422, response.text
    assert "convert_lora_to_gguf.py failed" in response.json()["error"]["message"]
    assert admin(base, "GET", "/adapters/bad").status_code == 404


def test_registering_a_kt_sft_checkpoint_for_sglang_converts_and_loads_it(
        converters, kimi_base, start_process, start_gateway, tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "tests.emulators.sglang", "--port", str(port), "--served-model-name", "kimi",
            "--enable-lora", "--max-loaded-loras", "8"]
    start_process("sglang-conversion", argv, f"http://127.0.0.1:{port}/health", env={"PYTHONPATH": str(ROOT)})
    checkpoint = write_kt_sft(tmp_path / "kt-sft")
    base = start_gateway({
        "adapter_roots": [str(tmp_path)],
        "base_model": {"hf_config": str(kimi_base)},
        "conversion": {"kt_python": str(converters.kt_python)},
        "backends": [{"name": "kt", "kind": "sglang", "url": f"http://127.0.0.1:{port}"}],
        "routes": [{"name": "kimi-k2.5", "targets": ["kt"]}],
    }, name="gateway-kt-conversion", env={**ENV, "PYTHONPATH": str(ROOT)})
    response = admin(base, "POST", "/adapters", json={"name": "neko", "source": str(checkpoint), "backends": ["kt"]})
    assert response.status_code == 201, response.text
    view = admin(base, "GET", "/adapters/neko").json()
    active = next(v for v in view["versions"] if v["status"] == "active")
    assert active["source"] == str(checkpoint)
    assert active["converted"]["source"].endswith(f"/converted/{active['version']}/sglang")
    assert view["class"] == "experts" and {r["state"] for r in view["replicas"]} == {"ready"}
    loaded = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]
    assert {card["id"]: card["root"] for card in loaded if card["id"] != "kimi"} == \
        {f"neko@{active['version'][:8]}": active["converted"]["source"]}
    assert chat(base, "neko", PROMPTS[0])
