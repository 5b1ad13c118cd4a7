"""The converter interface: how an adapter's files become the artifact a backend kind needs (PEFT -> GGUF for
llama.cpp with llama.cpp's convert_lora_to_gguf.py; KT-SFT -> SGLang with kt-kernel's
convert_kt_to_sglang_adapter.py). The lifecycle marks a version `converting` on a backend while this runs.

Until the real converters land (their own issue), `Unconverted` is the only implementation: it says what to
provide instead, so a config or admin request that needs a conversion fails fast and precisely.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from backends.base import AdapterFiles


class ConversionError(Exception):
    """A conversion that cannot run or failed; the message names the input and the tool (HTTP 422)."""


class Converter(Protocol):
    def needs(self, files: AdapterFiles, artifact: str) -> bool: ...          # artifact: "source" | "gguf"
    async def convert(self, files: AdapterFiles, artifact: str, out_dir: Path) -> AdapterFiles: ...


class Unconverted:
    """No converter configured: every artifact must be given."""

    def needs(self, files: AdapterFiles, artifact: str) -> bool:
        return getattr(files, artifact) is None

    async def convert(self, files: AdapterFiles, artifact: str, out_dir: Path) -> AdapterFiles:
        raise ConversionError(f"this adapter has no `{artifact}` and no converter is configured: "
                              f"give `{artifact}` explicitly")
