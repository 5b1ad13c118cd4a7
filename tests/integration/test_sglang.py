"""The gateway in front of the SGLang emulator (reference/sglang-kt.md), driven by the openai SDK."""
from __future__ import annotations

import re
import sys

import httpx
import openai
import orjson
import pytest

from backends.launchers.llamacpp import free_port
from tests.adapter_files import write_peft
from tests.integration.conftest import ROOT, sdk
from tests.openai_spec import assert_conforms

PROMPT = [{"role": "user", "content": "Tell me about the blue river"}]


def start_sglang(start_process, name: str, *extra: str) -> str:
    port = free_port()
    argv = [sys.executable, "-m", "tests.emulators.sglang", "--port", str(port), "--served-model-name", "kimi",
            "--enable-lora", "--max-loaded-loras", "8", "--reasoning-parser", "kimi_k2",
            "--tool-call-parser", "kimi_k2", *extra]
    start_process(name, argv, f"http://127.0.0.1:{port}/health", env={"PYTHONPATH": str(ROOT)})
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    return root, {name: write_peft(root / name) for name in ("legal", "medical", "expert")}


@pytest.fixture(scope="module")
def sglang(start_process) -> str:
    return start_sglang(start_process, "sglang")


@pytest.fixture(scope="module")
def gateway(sglang, adapter_dirs, start_gateway) -> str:
    root, dirs = adapter_dirs
    return start_gateway({
        "adapter_roots": [str(root)],
        "backends": [{"name": "kt", "kind": "sglang", "url": sglang}],
        "adapters": [{"name": "legal", "source": str(dirs["legal"]), "backends": ["kt"]},
                     {"name": "medical", "source": str(dirs["medical"]), "profile": "instant", "backends": ["kt"]}],
        "routes": [{"name": "kimi-k2.5", "targets": ["kt"]}],
    }, name="gateway-sglang")


def received(emulator: str) -> list[dict]:
    return httpx.get(f"{emulator}/_emulator/requests", timeout=10).json()


def fault(emulator: str, **spec) -> None:
    spec.setdefault("path", "/v1/chat/completions")  # never taken by the lifecycle's verification probes
    httpx.post(f"{emulator}/_emulator/faults", json=spec, timeout=10).raise_for_status()


def test_adapter_is_loaded_then_selected_by_served_name(gateway, sglang):
    raw = sdk(gateway).chat.completions.with_raw_response.create(model="legal", messages=PROMPT, max_tokens=8)
    response, label = raw.parse(), raw.headers["x-kimi-adapter"]
    assert response.model == "legal" and response.choices[0].message.content
    assert re.fullmatch(r"legal@[0-9a-f]{8}", label)
    body = received(sglang)[-1]["body"]
    assert body["model"] == f"kimi:{label}"
    assert body["chat_template_kwargs"] == {"thinking": True}
    assert (body["temperature"], body["top_p"], body["min_p"]) == (1.0, 0.95, 0.01)
    loaded = httpx.get(f"{sglang}/v1/models", timeout=10).json()["data"]
    assert label in [card["id"] for card in loaded]


def test_base_route_and_reasoning_pass_through(gateway, sglang):
    raw = sdk(gateway).chat.completions.with_raw_response.create(model="kimi-k2.5", messages=PROMPT, max_tokens=8)
    message = raw.parse().choices[0].message
    assert raw.headers["x-kimi-backend"] == "kt" and raw.headers["x-kimi-adapter"] == ""
    assert getattr(message, "reasoning_content", None)  # SGLang's reasoning parser output, relayed
    assert received(sglang)[-1]["body"]["model"] == "kimi"


def test_instant_adapter_turns_thinking_off_in_kwargs(gateway, sglang):
    sdk(gateway).chat.completions.create(model="medical", messages=PROMPT, max_tokens=4)
    body = received(sglang)[-1]["body"]
    assert body["chat_template_kwargs"] == {"thinking": False} and body["temperature"] == 0.6


def test_client_switches_thinking_off_in_hosted_form(gateway, sglang):
    sdk(gateway).chat.completions.create(model="kimi-k2.5", messages=PROMPT, max_tokens=4,
                                         extra_body={"thinking": {"type": "disabled"}})
    body = received(sglang)[-1]["body"]
    assert "thinking" not in body and body["chat_template_kwargs"] == {"thinking": False}


def test_stream_equals_non_stream(gateway):
    client = sdk(gateway)
    kwargs = dict(model="legal", messages=PROMPT, max_tokens=12, temperature=0,
                  extra_body={"chat_template_kwargs": {"thinking": False}})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    parts = [e.choices[0].delta.content or "" for e in client.chat.completions.create(stream=True, **kwargs)
             if e.choices]
    assert "".join(parts) == whole


def test_stream_error_under_200_becomes_an_openai_error_event(gateway, sglang):
    fault(sglang, stream_error_after=2, count=1)
    body = {"model": "kimi-k2.5", "messages": PROMPT, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{gateway}/chat/completions", json=body, timeout=30) as response:
        events = [e for e in response.read().decode().split("\n\n") if e]
    assert response.status_code == 200
    error = orjson.loads(events[-2].removeprefix("data: "))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert_conforms("ErrorResponse", {"error": error})
    assert events[-1] == "data: [DONE]"


def test_503_is_retried(gateway, sglang):
    fault(sglang, status=503, count=1)
    response = sdk(gateway).chat.completions.create(model="kimi-k2.5", messages=PROMPT, max_tokens=4)
    assert response.choices[0].message.content is not None or response.choices[0].message.reasoning_content


def test_backend_400_is_openai_shaped(gateway, sglang):
    fault(sglang, status=400, message="Input is too long", count=1)
    with pytest.raises(openai.BadRequestError) as failure:
        sdk(gateway).chat.completions.create(model="kimi-k2.5", messages=PROMPT, max_tokens=4)
    assert failure.value.body["message"] == "Input is too long"


def test_models_never_leak_server_paths(gateway, adapter_dirs):
    text = httpx.get(f"{gateway}/models", timeout=10).text
    assert str(adapter_dirs[0]) not in text and '"root"' not in text


def test_expert_adapter_server_is_dedicated(start_process, start_gateway, adapter_dirs, sglang):
    """A KT expert server serves its one adapter; base traffic goes to the route's other target."""
    root, dirs = adapter_dirs
    expert = start_sglang(start_process, "sglang-expert", "--lora-paths", f"expert={dirs['expert']}",
                          "--static-expert-adapter", "expert")
    url = start_gateway({
        "adapter_roots": [str(root)],
        "backends": [{"name": "kt-expert", "kind": "sglang", "url": expert, "expert_adapter": "expert"},
                     {"name": "kt", "kind": "sglang", "url": sglang}],
        "adapters": [{"name": "expert", "source": str(dirs["expert"]), "backends": ["kt-expert"]}],
        "routes": [{"name": "kimi-k2.5", "targets": ["kt-expert", "kt"]}],
    }, name="gateway-expert")
    client = sdk(url)
    raw = client.chat.completions.with_raw_response.create(model="expert", messages=PROMPT, max_tokens=4)
    assert raw.headers["x-kimi-backend"] == "kt-expert"
    assert received(expert)[-1]["body"]["model"] == "kimi:expert"
    raw = client.chat.completions.with_raw_response.create(model="kimi-k2.5", messages=PROMPT, max_tokens=4)
    assert raw.headers["x-kimi-backend"] == "kt"
    assert all(entry["body"]["model"] == "kimi:expert" for entry in received(expert))
