"""validate_adapter(): adapter files checked before anything loads them, from metadata only (no tensor data),
and the facts the registry keeps about them (rank, class, content hash).

- every path must resolve, after symlinks, inside one of the configured adapter roots;
- a PEFT dir needs adapter_config.json (peft_type LORA, r, lora_alpha, target_modules) and safetensors files
  whose headers parse, whose lora_A (r, in) / lora_B (out, r) agree with `r`, and, given the base model's
  dims, whose in/out agree with the base module they adapt (base_model.module_shape) in a layer it has;
- `r` must not exceed the backend's max LoRA rank (SGLang's --max-lora-rank), when one is given;
- a GGUF LoRA needs the GGUF magic, `general.type = adapter`, `adapter.type = lora` and, given the base, the
  base's `general.architecture`, and every `<name>.lora_a`/`.lora_b` pair must fit base tensor `<name>`
  exactly as llama.cpp checks it at load (src/llama-adapter.cpp, reference/llamacpp.md §3).
The PEFT keys also decide the adapter's class: expert tensors (`.mlp.experts.` + gate/up/down_proj) pin it
to one SGLang+KT server at launch; attention-only adapters load at run time (reference/sglang-kt.md §0.1,
§1.7); a GGUF-only adapter serves on llama.cpp only. Messages name paths as the user gave them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from adapters.base_model import (
    BaseModelDims,
    BaseModelError,
    dims_from_gguf,
    dims_from_hf_config,
    gguf_base_ne,
    module_shape,
)
from adapters.kt_sft import FUSED_FILE, check_fused, is_kt_sft

__all__ = [
    "AdapterFacts", "AdapterValidationError", "BaseModelDims", "BaseModelError", "content_hash",
    "dims_from_gguf", "dims_from_hf_config", "validate_adapter",
]

MAX_RANK = 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024   # safetensors caps its JSON header at 100 MB as well
HASH_CHUNK_BYTES = 1 << 20
GGUF_MAGIC = b"GGUF"
# Bytes per element of each safetensors dtype: a tensor's byte range must hold exactly its shape's elements.
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1}
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")
TEXT_LAYER = re.compile(r"(?:^|\.)(?:model|language_model)\.(?P<module>layers\.\d+\..+)$")
EXPERT_PROJS = (".gate_proj.", ".up_proj.", ".down_proj.")

AdapterClass = Literal["attention", "experts", "gguf"]


class AdapterValidationError(ValueError):
    """An adapter that must not be registered; the message names the file and the problem (HTTP 422)."""


@dataclass(frozen=True)
class AdapterFacts:
    rank: int | None                  # PEFT `r`; for a GGUF-only adapter the largest lora_a rank
    alpha: float | None               # PEFT `lora_alpha`, or the GGUF's adapter.lora.alpha
    target_modules: tuple[str, ...]   # PEFT target_modules, or the GGUF base-tensor kinds (attn_q, ...)
    adapter_class: AdapterClass       # "attention" (dense), "experts" (MoE experts), "gguf" (GGUF only)
    content_hash: str                 # sha256 hex over the files (content_hash()): the version id
    source_path: str | None           # real path of the PEFT dir
    gguf_path: str | None             # real path of the GGUF file
    gguf_architecture: str | None     # the GGUF's general.architecture
    source_format: str | None = None  # "peft", or "kt-sft" (KT's fused expert LoRA, converted for SGLang)

    @property
    def touches_experts(self) -> bool:
        return self.adapter_class == "experts"


@dataclass(frozen=True)
class PeftConfig:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class GgufLora:
    architecture: str
    rank: int | None
    alpha: float | None
    targets: tuple[str, ...]


# --- paths and hashing -------------------------------------------------------------------------------------

def resolve_inside(raw: str, roots: Sequence[str], what: str) -> Path:
    """The real path of `raw`, which must lie inside a root: no `..`, no absolute escape, no symlink escape.
    `~` is expanded in both, as a shell would (the gateway's user's home)."""
    if not roots:
        raise AdapterValidationError(f"{what}: no adapter_roots are configured, so no adapter path is allowed")
    if ".." in Path(raw).parts:
        raise AdapterValidationError(f"{what}: '..' is not allowed in adapter paths")
    real = Path(os.path.realpath(os.path.expanduser(raw)))
    for root in roots:
        real_root = Path(os.path.realpath(os.path.expanduser(root)))
        if real == real_root or real_root in real.parents:
            if not real.exists():
                raise AdapterValidationError(f"{what}: {raw} does not exist")
            return real
    raise AdapterValidationError(f"{what}: {raw} resolves outside the adapter roots")


def content_hash(files: Sequence[tuple[str, Path]]) -> str:
    """sha256 hex over (label, file) pairs in the given order, each framed as label, NUL, 8-byte little-endian
    size, then the bytes, read in 1 MiB chunks. Labels are file names inside a PEFT dir and "gguf" for the
    GGUF, so moving or renaming the adapter keeps its hash and changing any byte changes it."""
    digest = hashlib.sha256()
    for label, path in files:
        with path.open("rb") as handle:
            digest.update(label.encode() + b"\0" + os.fstat(handle.fileno()).st_size.to_bytes(8, "little"))
            while chunk := handle.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


# --- PEFT ----------------------------------------------------------------------------------------------------

def read_peft_config(path: Path, shown: str) -> PeftConfig:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterValidationError(f"{shown}: cannot be read as JSON") from exc
    if not isinstance(config, dict):
        raise AdapterValidationError(f"{shown}: expected a JSON object, found {type(config).__name__}")
    if str(config.get("peft_type", "")).lower() != "lora":
        raise AdapterValidationError(f"{shown}: peft_type must be LORA, got {config.get('peft_type')!r}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise AdapterValidationError(f"{shown}: {key} is missing")
    rank, alpha = config["r"], config["lora_alpha"]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise AdapterValidationError(f"{shown}: r must be an integer from 1 to {MAX_RANK}, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise AdapterValidationError(f"{shown}: lora_alpha must be a positive number, got {alpha!r}")
    modules = config["target_modules"]
    if isinstance(modules, str):
        modules = [modules]
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise AdapterValidationError(f"{shown}: target_modules must be a non-empty list of names, got {modules!r}")
    return PeftConfig(rank, float(alpha), tuple(modules))


def read_safetensors_header(path: Path, shown: str) -> dict[str, list[int]]:
    """tensor name -> shape, from the JSON header alone; offsets must lie inside the file."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise AdapterValidationError(f"{shown}: truncated safetensors header (file is {size} bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise AdapterValidationError(f"{shown}: truncated safetensors header "
                                         f"(declares {length} header bytes, file has {size - 8})")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterValidationError(f"{shown}: the safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise AdapterValidationError(f"{shown}: the safetensors header is not a JSON object")
    data_bytes, shapes = size - 8 - length, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(whole, offsets))):
            raise AdapterValidationError(f"{shown}: tensor {name!r} has no valid data_offsets (two whole numbers)")
        if not 0 <= offsets[0] <= offsets[1] <= data_bytes:
            raise AdapterValidationError(f"{shown}: tensor {name!r} points outside the file (truncated?)")
        shape = entry.get("shape")
        if not (isinstance(shape, list) and all(whole(n) and n >= 0 for n in shape)):
            raise AdapterValidationError(f"{shown}: tensor {name!r} has no valid shape, found {str(shape)[:80]}")
        dtype = entry.get("dtype")
        if dtype not in DTYPE_BYTES:
            raise AdapterValidationError(f"{shown}: tensor {name!r} has an unknown dtype {str(dtype)[:16]!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise AdapterValidationError(f"{shown}: tensor {name!r} holds {offsets[1] - offsets[0]} bytes, but "
                                         f"{dtype} {shape} needs {math.prod(shape) * DTYPE_BYTES[dtype]}")
        shapes[name] = shape
    return shapes


def whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def text_module(module_key: str) -> str | None:
    """A PEFT module key (`base_model.model.model.layers.0.self_attn.q_proj`) relative to the text model
    (`layers.0.self_attn.q_proj`, `embed_tokens`, `lm_head`); None for what is not the text model's (a
    vision tower) or not recognised, which is then not checked against the base."""
    if "vision" in module_key or "visual" in module_key:
        return None
    last = module_key.rsplit(".", 1)[-1]
    if last in ("embed_tokens", "lm_head"):
        return last
    match = TEXT_LAYER.search(module_key)
    return match["module"] if match else None


def check_lora_tensor(key: str, shape: list[int], rank: int, base: BaseModelDims | None, shown: str) -> None:
    """lora_A is (r, in), lora_B is (out, r) (lora_embedding_A/B likewise); against the base, `in` and `out`
    must be the adapted module's and its layer must exist."""
    match = LORA_KEY.match(key)
    if match is None:
        return
    is_a = match["part"].endswith("A")
    rank_axis = -2 if is_a else -1
    if len(shape) < 2 or shape[rank_axis] != rank:
        form = "(r, in)" if is_a else "(out, r)"
        raise AdapterValidationError(f"{shown}: tensor {key!r} has shape {shape}, which does not match r={rank} "
                                     f"({match['part']} is {form})")
    module = text_module(match["module"])
    if base is None or module is None:
        return
    layer = module.split(".")[1] if module.startswith("layers.") else None
    if layer is not None and int(layer) >= base.num_hidden_layers:
        raise AdapterValidationError(f"{shown}: tensor {key!r} is for layer {layer}, but the base model has "
                                     f"{base.num_hidden_layers} layers (0-{base.num_hidden_layers - 1})")
    expected = module_shape(base, module)
    if expected.absent:
        raise AdapterValidationError(f"{shown}: tensor {key!r} adapts {module}, but {expected.absent}")
    found, want, side = (shape[-1], expected.inp, "in") if is_a else (shape[-2], expected.out, "out")
    if want is not None and found != want:
        raise AdapterValidationError(
            f"{shown}: tensor {key!r} has shape {shape}: its {side} dimension is {found}, but the base model's "
            f"{module} is (out, in) = ({_dim(expected.out)}, {_dim(expected.inp)}), so expected {side}={want}")


def _dim(value: int | None) -> str:
    return "?" if value is None else str(value)


def check_pairs(keys: Sequence[str], shown: str) -> None:
    parts: dict[str, set[str]] = {}
    for key in keys:
        if (match := LORA_KEY.match(key)) is not None:
            parts.setdefault(match["module"], set()).add(match["part"][-1])
    for module, seen in sorted(parts.items()):
        if seen != {"A", "B"}:
            missing = "B" if "A" in seen else "A"
            raise AdapterValidationError(f"{shown}: {module} has lora_{min(seen)} but no lora_{missing}")


def is_expert_key(key: str) -> bool:
    """sglang-kt's composite (expert) adapter test (reference/sglang-kt.md §1.7)."""
    return ".mlp.experts." in key and any(proj in key for proj in EXPERT_PROJS)


def validate_peft_dir(directory: Path, raw: str, roots: Sequence[str], base: BaseModelDims | None,
                      max_rank: int | None) -> tuple[PeftConfig, bool, list[tuple[str, Path]]]:
    """(config, touches experts, the files to hash in order). Each file must itself resolve inside the roots:
    a dir inside them may hold a symlink to a file outside. A KT-SFT checkpoint (adapters/kt_sft.py) needs
    no adapter_model.safetensors: its fused expert file may be all of it."""
    if not directory.is_dir():
        raise AdapterValidationError(f"source: {raw} is not a directory")
    shown = raw.rstrip("/") + "/"
    if not (directory / PEFT_CONFIG).is_file():
        raise AdapterValidationError(f"source: {raw} has no {PEFT_CONFIG}")
    config_path = resolve_inside(shown + PEFT_CONFIG, roots, "source")
    config = read_peft_config(config_path, shown + PEFT_CONFIG)
    if max_rank is not None and config.rank > max_rank:
        raise AdapterValidationError(f"{shown}{PEFT_CONFIG}: r={config.rank} exceeds the backend's max LoRA "
                                     f"rank {max_rank}")
    kt = is_kt_sft(directory)
    if not kt and not (directory / PEFT_WEIGHTS).is_file():
        raise AdapterValidationError(f"source: {raw} has no {PEFT_WEIGHTS}")
    # SGLang loads every *.safetensors in the dir (reference/sglang-kt.md §1.6): check and hash them all.
    names = sorted(p.name for p in directory.glob("*.safetensors") if p.is_file())
    files = [(PEFT_CONFIG, config_path), *((name, resolve_inside(shown + name, roots, "source")) for name in names)]
    experts, tensors = False, 0
    for name, path in files[1:]:
        shapes = read_safetensors_header(path, shown + name)
        tensors += len(shapes)
        if name == FUSED_FILE and kt:
            if problems := check_fused(shapes, config.rank, base, shown + name):
                raise AdapterValidationError(problems[0])
            experts = True
            continue
        for key, shape in shapes.items():
            check_lora_tensor(key, shape, config.rank, base, shown + name)
            experts |= is_expert_key(key)
        check_pairs(list(shapes), shown + name)
    if not tensors:
        raise AdapterValidationError(f"source: {raw} holds no tensors (its safetensors files are empty)")
    return config, experts, files


# --- GGUF ----------------------------------------------------------------------------------------------------

def read_gguf(path: Path, shown: str):
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise AdapterValidationError(f"gguf: {shown} is not a GGUF file")
    from gguf import GGUFReader  # maps the file and parses the header; no tensor data is read

    try:
        return GGUFReader(str(path))
    except (ValueError, struct.error, IndexError) as exc:
        raise AdapterValidationError(f"gguf: {shown} is truncated or corrupt") from exc


def gguf_field(reader, key: str):
    item = reader.fields.get(key)
    return item.contents() if item is not None else None


def validate_gguf_lora(path: Path, shown: str, base: BaseModelDims | None) -> GgufLora:
    reader = read_gguf(path, shown)
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora")):
        found = gguf_field(reader, key)
        if found != want:
            raise AdapterValidationError(f"gguf: {shown} is not a LoRA adapter ({key} must be {want!r}, "
                                         f"found {found!r})")
    arch = gguf_field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise AdapterValidationError(f"gguf: {shown} has no general.architecture")
    if base is not None and base.architecture is not None and arch != base.architecture:
        raise AdapterValidationError(f"gguf: {shown} is a LoRA for architecture {arch!r}, "
                                     f"the base model is {base.architecture!r}")
    pairs = gguf_pairs(reader, shown)
    ranks = [check_gguf_pair(name, a, b, base, shown) for name, (a, b) in sorted(pairs.items())]
    alpha = gguf_field(reader, "adapter.lora.alpha")
    targets = sorted({re.sub(r"^blk\.\d+\.", "", name).removesuffix(".weight") for name in pairs})
    return GgufLora(arch, max(ranks, default=None), float(alpha) if isinstance(alpha, (int, float)) else None,
                    tuple(targets))


def gguf_pairs(reader, shown: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """base tensor name -> (lora_a ne, lora_b ne), both present; `*_norm.weight` is skipped as llama.cpp does."""
    halves: dict[str, dict[str, tuple[int, ...]]] = {}
    for tensor in reader.tensors:
        name, ne = tensor.name, tuple(int(n) for n in tensor.shape)  # ggml order: ne0 first
        if name.endswith((".lora_a", ".lora_b")):
            halves.setdefault(name[:-7], {})[name[-1]] = ne + (1,) * (2 - len(ne))
        elif not name.endswith("_norm.weight"):
            raise AdapterValidationError(f"gguf: {shown}: tensor {name!r} is neither a .lora_a nor a .lora_b")
    for name, half in halves.items():
        if set(half) != {"a", "b"}:
            raise AdapterValidationError(f"gguf: {shown}: {name} has {name}.lora_{next(iter(half))} but no "
                                         f"{name}.lora_{'b' if 'a' in half else 'a'}")
    return {name: (half["a"], half["b"]) for name, half in halves.items()}


def check_gguf_pair(name: str, a: tuple[int, ...], b: tuple[int, ...], base: BaseModelDims | None,
                    shown: str) -> int:
    """llama.cpp's load-time test, in ggml ne (ne0 = in): lora_a is [in, rank], lora_b is [rank, out]
    (token_embd is flipped: lora_a [rank, vocab], lora_b [hidden, rank]). Returns the rank."""
    embd = name.endswith("token_embd.weight")
    rank = a[0] if embd else a[1]
    if not embd and a[1] != b[0]:
        raise AdapterValidationError(f"gguf: {shown}: {name}.lora_a has rank {a[1]} but {name}.lora_b has "
                                     f"rank {b[0]}")
    if base is None:
        return rank
    base_ne = gguf_base_ne(base, name)
    if base_ne is None:
        raise AdapterValidationError(f"gguf: {shown}: tensor {name}.lora_a adapts {name!r}, which does not "
                                     "exist in the base model")
    found = (b[1], a[1]) if embd else (a[0], b[1])
    for axis, (want_n, found_n) in enumerate(zip(base_ne, found)):
        if want_n is not None and want_n != found_n:
            raise AdapterValidationError(
                f"gguf: {shown}: {name}.lora_a/.lora_b fit a base tensor of (out, in) = ({found[1]}, {found[0]}), "
                f"but the base model's {name!r} is ({_dim(base_ne[1])}, {_dim(base_ne[0])}): expected "
                f"{('in', 'out')[axis]}={want_n}, found {found_n}")
    return rank


# --- the API -------------------------------------------------------------------------------------------------

def validate_adapter(source: str | None, gguf: str | None, roots: Sequence[str],
                     base: BaseModelDims | None = None, max_rank: int | None = None) -> AdapterFacts:
    """Check an adapter's files and describe it. Synchronous and blocking (it reads headers and hashes the
    files): call it through asyncio.to_thread. `base` enables the base-model checks; `max_rank` is the
    --max-lora-rank of the SGLang backends that will load the PEFT `source` (llama.cpp has no such limit,
    so a GGUF is not checked against it). Raises AdapterValidationError with a client-safe message."""
    if source is None and gguf is None:
        raise AdapterValidationError("an adapter needs `source` (PEFT dir) and/or `gguf` (GGUF LoRA file)")
    source_path = resolve_inside(source, roots, "source") if source is not None else None
    gguf_path = resolve_inside(gguf, roots, "gguf") if gguf is not None else None
    peft, experts, files = None, False, []
    source_format = None
    if source is not None and source_path is not None:
        peft, experts, files = validate_peft_dir(source_path, source, roots, base, max_rank)
        source_format = "kt-sft" if is_kt_sft(source_path) else "peft"
    lora = None
    if gguf is not None and gguf_path is not None:
        if not gguf_path.is_file():
            raise AdapterValidationError(f"gguf: {gguf} is not a file")
        lora = validate_gguf_lora(gguf_path, gguf, base)
        files.append(("gguf", gguf_path))
    if peft is not None:
        rank, alpha, targets = peft.rank, peft.alpha, peft.target_modules
        adapter_class: AdapterClass = "experts" if experts else "attention"
    else:
        assert lora is not None  # one of source/gguf was given
        rank, alpha, targets, adapter_class = lora.rank, lora.alpha, lora.targets, "gguf"
    return AdapterFacts(
        rank=rank, alpha=alpha, target_modules=targets, adapter_class=adapter_class,
        content_hash=content_hash(files),
        source_path=str(source_path) if source_path else None,
        gguf_path=str(gguf_path) if gguf_path else None,
        gguf_architecture=lora.architecture if lora else None,
        source_format=source_format,
    )
