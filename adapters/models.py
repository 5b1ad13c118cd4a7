"""AdapterSpec: one LoRA adapter as data (the same fields as a config `adapters:` entry and the admin POST
body), and AdapterRecord, what the registry keeps about it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# Names become route names, metric labels and URL path segments: keep them to a safe charset.
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$"
Name = Annotated[str, Field(pattern=SAFE_NAME)]


class AdapterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    source: str | None = None                     # PEFT dir (adapter_config.json + adapter_model.safetensors)
    gguf: str | None = None                       # GGUF LoRA for llama.cpp backends
    profile: str | None = None
    backends: tuple[Name, ...] = Field(min_length=1)


@dataclass(frozen=True)
class AdapterRecord:
    spec: AdapterSpec
    origin: str          # "config" (seeded from the file) or "admin" (registered at run time)
    version: int         # bumped by every change of the spec
    updated_at: float
