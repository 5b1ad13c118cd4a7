"""Helpers shared by the emulator tests: an in-process client, SSE parsing, adapter directories."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import httpx

from tests.adapter_files import write_safetensors


@asynccontextmanager
async def client_for(app: Any, headers: dict[str, str] | None = None) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://emulator", headers=headers) as client:
        yield client


def sse_payloads(text: str) -> list[Any]:
    """Each `data:` event of an SSE body, JSON-decoded; `[DONE]` stays a string."""
    payloads = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def write_adapter(directory: Path, **overrides: Any) -> str:
    """A PEFT-style adapter directory with adapter_config.json; `None` values drop the key."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_a_proj", "o_proj"], "peft_type": "LORA",
              "base_model_name_or_path": "moonshotai/Kimi-K2.5"}
    config.update(overrides)
    config = {k: v for k, v in config.items() if v is not None}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    write_safetensors(directory / "adapter_model.safetensors",  # SGLang needs weights (sglang-kt.md §1.6)
                      {"base_model.model.model.layers.0.self_attn.q_a_proj.lora_A.weight": [8, 32],
                       "base_model.model.model.layers.0.self_attn.q_a_proj.lora_B.weight": [16, 8]})
    return str(directory)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "days"],
        },
    },
}
