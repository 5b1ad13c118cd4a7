"""validate_adapter(): adapter files checked before anything loads them, from metadata only (no tensor data).

- every path must resolve, after symlinks, inside one of the configured adapter roots;
- a PEFT dir needs adapter_config.json (peft_type LORA, r, lora_alpha, target_modules) and a safetensors
  file whose header parses and whose lora_A/lora_B shapes agree with `r`;
- a GGUF LoRA needs the GGUF magic and `general.type = adapter`, `adapter.type = lora`.
The PEFT keys also decide the adapter's kind: expert tensors (`.mlp.experts.`) pin it to one SGLang+KT
server at launch; attention-only adapters load at run time (reference/sglang-kt.md §0.1, §1.7).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

MAX_RANK = 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024   # safetensors caps its JSON header at 100 MB as well
GGUF_MAGIC = b"GGUF"


class AdapterValidationError(ValueError):
    """An adapter that must not be registered; the message names the file and the problem (HTTP 422)."""


@dataclass(frozen=True)
class AdapterFacts:
    rank: int | None
    alpha: float | None
    target_modules: tuple[str, ...]
    touches_experts: bool


def resolve_inside(raw: str, roots: Sequence[str], what: str) -> Path:
    """The real path of `raw`, which must lie inside a root: no `..`, no absolute escape, no symlink escape."""
    if not roots:
        raise AdapterValidationError(f"{what}: no adapter_roots are configured, so no adapter path is allowed")
    if ".." in Path(raw).parts:
        raise AdapterValidationError(f"{what}: '..' is not allowed in adapter paths")
    real = Path(os.path.realpath(raw))
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if real == real_root or real_root in real.parents:
            if not real.exists():
                raise AdapterValidationError(f"{what}: {raw} does not exist")
            return real
    raise AdapterValidationError(f"{what}: {raw} resolves outside the adapter roots")


def read_safetensors_header(path: Path) -> dict:
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise AdapterValidationError(f"{path.name}: truncated safetensors header (file is {size} bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise AdapterValidationError(f"{path.name}: truncated safetensors header "
                                         f"(declares {length} header bytes, file has {size - 8})")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterValidationError(f"{path.name}: the safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise AdapterValidationError(f"{path.name}: the safetensors header is not a JSON object")
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise AdapterValidationError(f"{path.name}: tensor {name!r} points outside the file (truncated?)")
    return header


def read_peft_config(path: Path) -> AdapterFacts:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterValidationError(f"{path.name}: cannot be read as JSON") from exc
    if str(config.get("peft_type", "")).lower() != "lora":
        raise AdapterValidationError(f"{path.name}: peft_type must be LORA, got {config.get('peft_type')!r}")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise AdapterValidationError(f"{path.name}: r must be an integer from 1 to {MAX_RANK}, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise AdapterValidationError(f"{path.name}: lora_alpha must be a positive number, got {alpha!r}")
    modules = config.get("target_modules")
    if isinstance(modules, str):
        modules = [modules]
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise AdapterValidationError(f"{path.name}: target_modules must be a non-empty list of names")
    return AdapterFacts(rank, float(alpha), tuple(modules), False)


def check_ranks(header: dict, rank: int, name: str) -> bool:
    """Every lora_A is (r, in) and every lora_B is (out, r); returns whether any tensor is an expert's."""
    experts = False
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = entry.get("shape") or []
        experts |= ".mlp.experts." in key
        if "lora_A" in key and (len(shape) < 2 or shape[-2] != rank):
            raise AdapterValidationError(f"{name}: tensor {key!r} has shape {shape}, which does not match r={rank}")
        if "lora_B" in key and (len(shape) < 2 or shape[-1] != rank):
            raise AdapterValidationError(f"{name}: tensor {key!r} has shape {shape}, which does not match r={rank}")
    return experts


def validate_peft_dir(directory: Path) -> AdapterFacts:
    if not directory.is_dir():
        raise AdapterValidationError(f"source: {directory} is not a directory")
    facts = read_peft_config(directory / "adapter_config.json") if (directory / "adapter_config.json").exists() \
        else None
    if facts is None:
        raise AdapterValidationError(f"source: {directory} has no adapter_config.json")
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterValidationError(f"source: {directory} has no adapter_model.safetensors")
    header = read_safetensors_header(weights)
    experts = check_ranks(header, facts.rank or 0, weights.name)
    return AdapterFacts(facts.rank, facts.alpha, facts.target_modules, experts)


def validate_gguf_lora(path: Path) -> None:
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise AdapterValidationError(f"gguf: {path.name} is not a GGUF file")
    from gguf import GGUFReader  # reads metadata and maps tensors lazily; no tensor data is loaded

    try:
        reader = GGUFReader(str(path))
    except (ValueError, struct.error, IndexError) as exc:
        raise AdapterValidationError(f"gguf: {path.name} is truncated or corrupt") from exc
    fields = {name: reader.fields[name] for name in ("general.type", "adapter.type") if name in reader.fields}
    values = {name: bytes(field.parts[field.data[0]]).decode(errors="replace") for name, field in fields.items()}
    if values.get("general.type") != "adapter" or values.get("adapter.type") != "lora":
        raise AdapterValidationError(f"gguf: {path.name} is not a LoRA adapter (general.type={values.get('general.type')!r})")


def validate_adapter(source: str | None, gguf: str | None, roots: Sequence[str]) -> AdapterFacts:
    if source is None and gguf is None:
        raise AdapterValidationError("an adapter needs `source` (PEFT dir) and/or `gguf` (GGUF LoRA file)")
    facts = AdapterFacts(None, None, (), False)
    if source is not None:
        facts = validate_peft_dir(resolve_inside(source, roots, "source"))
    if gguf is not None:
        validate_gguf_lora(resolve_inside(gguf, roots, "gguf"))
    return facts
