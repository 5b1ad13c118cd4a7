"""LoRA adapter state of the SGLang emulator (sglang-kt 0.7.2).

Owns the adapter registry: startup `--lora-paths`, `/load_lora_adapter` and `/unload_lora_adapter`
with their `LoRAUpdateOutput` bodies and error texts (sglang-kt.md §1.1, §1.2), LRU eviction past
`--max-loaded-loras`, the never-cleared reload cache (§1.2 "Implicit reload"), per-request adapter
resolution (§1.3), adapter-directory validation (§1.6), the `/v1/models` cards (§1.4) and the
static KT expert adapter mode (§0.1, §1.7). No HTTP here.

Inferred or approximated (the reference gives no exact text): `loaded_adapters` is null for errors
raised on the tokenizer side (not enabled, static mode, unknown on unload, failed eviction) and the
current map for scheduler-side load failures; the text of the peft_type, pin-limit and eviction
failures past their documented prefixes; a path that is not a local directory fails the way an
offline Hugging Face Hub lookup does (`HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import getpass
import glob
import hashlib
import json
import os
import re
import struct
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

NOT_ENABLED = "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."
STATIC_LOAD = (
    "Dynamic LoRA loading is disabled because KT expert LoRA is statically paired with adapter '{name}'. "
    "Restart the server to change this adapter."
)
STATIC_UNLOAD = (
    "LoRA unloading is disabled because KT expert LoRA is statically paired with adapter '{name}'. "
    "Restart the server to remove or change this adapter."
)
STATIC_REQUEST = (
    "This server has KT expert LoRA statically paired with adapter '{name}'. Every request in the batch "
    "must select exactly that adapter; base, mixed, and other-adapter requests are not supported."
)
REQUEST_NOT_ENABLED = (
    "LoRA adapter '{name}' was requested, but LoRA is not enabled. Please launch the server with "
    "--enable-lora flag and preload adapters using --lora-paths or /load_lora_adapter endpoint."
)
NEVER_LOADED = "Got LoRA adapter that has never been loaded: {name}\nAll loaded adapters: {names}."
ALREADY_LOADED = "Failed to load LoRA adapter {name} because it is already loaded"
UNKNOWN_ON_UNLOAD = "LoRA with name {name} does not exist. Loaded LoRAs: {names}"
RANK_TOO_LARGE = (
    "LoRA adapter {name} with rank {rank} is incompatible with the current LoRA memory pool configuration. "
    "Please ensure that the LoRA adapter's rank is within the configured `--max-lora-rank` and that the "
    "target modules are included in `--lora-target-modules`."
)
ADDS_TOKENS = "LoRA serving currently doesn't support adapters that add tokens to the vocabulary"
PIN_LIMIT = (
    "Failed to load LoRA adapter {name} as a pinned adapter. It is not allowed to pin all slots in the LoRA "
    "memory pool to avoid starvation for unpinned adapters and base models."
)
EVICTION_FAILED = (
    "Didn't find any LoRA adapters when trying to evict LRU LoRA adapter. "
    "All registered adapters are pinned."
)
HUB_BAD_REPO_ID = (
    "Repo id must be in the form 'repo_name' or 'namespace/repo_name': '{path}'. "
    "Use `repo_type` argument if needed."
)
HUB_OFFLINE = (
    "Cannot find an appropriate cached snapshot folder for the specified revision on the local disk and "
    "outgoing traffic has been disabled. To enable repo look-ups and downloads online, pass "
    "'local_files_only=False' as input."
)
NO_WEIGHTS = "Cannot find any model weights with `{path}`"
RAW_KT = ("--lora-paths received raw KT training adapter {path} (fused_expert_lora.safetensors). Convert it with "
          "convert_kt_to_sglang_adapter.py first.")
BAD_HEADER = "Error while deserializing header: {reason}"
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def dict_keys_repr(names: Any) -> str:
    """How Python prints `dict.keys()`, which SGLang interpolates into its messages."""
    return repr({name: None for name in names}.keys())


def parse_lora_paths(entries: list[str]) -> dict[str, str]:
    """`--lora-paths` entries: `PATH`, `NAME=PATH` (first '=') or a JSON object (sglang-kt.md §1.5)."""
    adapters: dict[str, str] = {}
    for entry in entries:
        if entry.startswith("{") and entry.endswith("}"):
            spec = json.loads(entry)
            adapters[spec["lora_name"]] = spec["lora_path"]
        elif "=" in entry:
            name, path = entry.split("=", 1)
            adapters[name] = path
        else:
            adapters[entry] = entry
    return adapters


def adapter_dir_error(name: str, path: str, max_rank: int | None) -> str | None:
    """Why SGLang would refuse to load this adapter directory, or None (sglang-kt.md §1.2, §1.6)."""
    if not os.path.isdir(path):
        return HUB_OFFLINE if REPO_ID.match(path) else HUB_BAD_REPO_ID.format(path=path)
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        return f"[Errno 2] No such file or directory: '{config_path}'"
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except ValueError as exc:
        return str(exc)
    for key in ("target_modules", "r", "lora_alpha", "peft_type"):
        if key not in config:
            return repr(key)  # str(KeyError(key))
    if str(config["peft_type"]).lower() != "lora":
        return f"peft_type must be 'lora' (case-insensitive), got {config['peft_type']!r}"
    if added_tokens(path):
        return ADDS_TOKENS
    if max_rank is not None and int(config["r"]) > max_rank:
        return RANK_TOO_LARGE.format(name=name, rank=config["r"])
    return weights_error(path)


def weights_error(path: str) -> str | None:
    """The weight files SGLang's loader takes (§1.6: *.safetensors, else *.bin, else *.pt), each safetensors
    header read the way the safetensors library reads it; a raw KT training dir is refused (§1.7)."""
    if os.path.isfile(os.path.join(path, "fused_expert_lora.safetensors")):
        return RAW_KT.format(path=path)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        if glob.glob(os.path.join(path, "*.bin")) or glob.glob(os.path.join(path, "*.pt")):
            return None
        return NO_WEIGHTS.format(path=path)
    for file in files:
        if (reason := safetensors_header_error(file)) is not None:
            return BAD_HEADER.format(reason=reason)
    return None


def safetensors_header_error(file: str) -> str | None:
    """The safetensors format's own checks: header length, JSON, and every tensor's byte range inside the data
    and matching its dtype and shape (the reason names are the library's error variants)."""
    size = os.path.getsize(file)
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return "HeaderTooSmall"
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            return "InvalidHeaderLength"
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return "InvalidHeaderDeserialization"
    if not isinstance(header, dict):
        return "InvalidHeaderDeserialization"
    item_size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = entry["data_offsets"]
            count = 1
            for n in entry["shape"]:
                count *= n
            width = item_size[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            return "InvalidHeaderDeserialization"
        if stop < start or stop - start != count * width:
            return "TensorInvalidInfo"
        end = max(end, stop)
    if end != size - 8 - length:
        return "MetadataIncompleteBuffer"
    return None


def added_tokens(path: str) -> bool:
    tokens_path = os.path.join(path, "added_tokens.json")
    if not os.path.isfile(tokens_path):
        return False
    with open(tokens_path, encoding="utf-8") as handle:
        return bool(json.load(handle))


def kt_nonexpert_cache_dir(path: str) -> str:
    """Where sglang-kt puts the non-expert half of a composite adapter (sglang-kt.md §1.7)."""
    digest = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
    base = os.environ.get("SGLANG_KT_LORA_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"sglang_kt_lora_cache_{getpass.getuser()}"
    )
    return os.path.join(base, digest, "nonexpert")


@dataclass(frozen=True)
class LoraSettings:
    enabled: bool
    initial: dict[str, str]
    max_loaded_loras: int | None = None
    max_loras_per_batch: int = 8
    max_lora_rank: int | None = None
    static_adapter: str | None = None


class LoraRegistry:
    """Registered adapters in LRU order (least recent first), plus every name ever loaded."""

    def __init__(self, settings: LoraSettings) -> None:
        self.settings = settings
        self._check_startup()
        self.reset()

    def _check_startup(self) -> None:
        settings = self.settings
        if settings.static_adapter is not None and list(settings.initial) != [settings.static_adapter]:
            raise ValueError("Only one merged KT composite LoRA adapter is supported; pass it alone in --lora-paths")
        if settings.max_loaded_loras is not None:
            if settings.max_loaded_loras < settings.max_loras_per_batch:
                raise ValueError("--max-loaded-loras must be >= --max-loras-per-batch (default 8)")
            if len(settings.initial) > settings.max_loaded_loras:
                raise ValueError("the number of --lora-paths must not exceed --max-loaded-loras")
        for name, path in settings.initial.items():
            error = adapter_dir_error(name, path, settings.max_lora_rank)
            if error is not None:
                raise ValueError(f"failed to load LoRA adapter {name} from {path}: {error}")

    def reset(self) -> None:
        self.loaded: OrderedDict[str, str] = OrderedDict(self.settings.initial)
        self.pinned: set[str] = set()
        self.ever_loaded: dict[str, str] = dict(self.settings.initial)
        self.loads = 0              # test-only counts (/_emulator/stats)
        self.implicit_reloads = 0

    # --- admin endpoints -------------------------------------------------------------------------

    def output(self, success: bool, error: str, loaded: bool) -> dict[str, Any]:
        """A `LoRAUpdateOutput` as orjson writes the dataclass (sglang-kt.md §1.1)."""
        return {
            "rid": None,
            "http_worker_ipc": None,
            "success": success,
            "error_message": error,
            "loaded_adapters": dict(self.loaded) if loaded else None,
        }

    def load(self, name: str, path: str, pinned: bool = False) -> tuple[int, dict[str, Any]]:
        settings = self.settings
        if settings.static_adapter is not None:
            return 400, self.output(False, STATIC_LOAD.format(name=settings.static_adapter), False)
        if not settings.enabled:
            return 400, self.output(False, NOT_ENABLED, False)
        if name in self.loaded:
            return 400, self.output(False, ALREADY_LOADED.format(name=name), True)
        error = adapter_dir_error(name, path, settings.max_lora_rank)
        if error is not None:
            return 400, self.output(False, error, True)
        if pinned and len(self.pinned) >= settings.max_loras_per_batch - 1:
            return 400, self.output(False, PIN_LIMIT.format(name=name), True)
        self.register(name, path, pinned)
        self.loads += 1
        if not self.evict_past_limit():
            return 400, self.output(False, EVICTION_FAILED, False)
        return 200, self.output(True, "", True)

    def unload(self, name: str) -> tuple[int, dict[str, Any]]:
        settings = self.settings
        if settings.static_adapter is not None:
            return 400, self.output(False, STATIC_UNLOAD.format(name=settings.static_adapter), False)
        if not settings.enabled:
            return 400, self.output(False, NOT_ENABLED, False)
        if name not in self.loaded:
            message = UNKNOWN_ON_UNLOAD.format(name=name, names=dict_keys_repr(self.loaded))
            return 400, self.output(False, message, False)
        del self.loaded[name]
        self.pinned.discard(name)
        return 200, self.output(True, "", True)

    def register(self, name: str, path: str, pinned: bool) -> None:
        self.loaded[name] = path
        self.loaded.move_to_end(name)
        self.ever_loaded[name] = path
        if pinned:
            self.pinned.add(name)

    def evict_past_limit(self) -> bool:
        """Unload least-recently-used unpinned adapters past `--max-loaded-loras`; False if stuck."""
        limit = self.settings.max_loaded_loras
        while limit is not None and len(self.loaded) > limit:
            victim = next((name for name in self.loaded if name not in self.pinned), None)
            if victim is None:
                return False
            del self.loaded[victim]
        return True

    # --- requests --------------------------------------------------------------------------------

    def check_enabled(self, adapter: str | None) -> None:
        """Serving-layer check, before any stream starts (ValueError -> 400)."""
        if adapter is not None and not self.settings.enabled:
            raise ValueError(REQUEST_NOT_ENABLED.format(name=adapter))

    def acquire(self, adapter: str | None) -> None:
        """Tokenizer-manager checks (ValueError; in a stream it becomes an error event): static
        mode, never-loaded names, and the implicit reload of an evicted or unloaded adapter."""
        static = self.settings.static_adapter
        if static is not None and adapter != static:
            raise ValueError(STATIC_REQUEST.format(name=static))
        if adapter is None:
            return
        if adapter in self.loaded:
            self.loaded.move_to_end(adapter)
            return
        if adapter not in self.ever_loaded:
            raise ValueError(NEVER_LOADED.format(name=adapter, names=dict_keys_repr(self.ever_loaded)))
        self.implicit_reloads += 1  # test-only count (/_emulator/stats): a request met an adapter not loaded
        self.register(adapter, self.ever_loaded[adapter], pinned=False)  # "Reloading evicted adapter"
        self.evict_past_limit()

    # --- /v1/models ------------------------------------------------------------------------------

    def root_of(self, name: str, path: str) -> str:
        return kt_nonexpert_cache_dir(path) if name == self.settings.static_adapter else path

    def model_cards(self, served_name: str, created: int) -> list[dict[str, Any]]:
        """One card per registered adapter; `root` leaks the server-side path (sglang-kt.md §1.4)."""
        if not self.settings.enabled:
            return []
        return [
            {"id": name, "object": "model", "created": created, "owned_by": "sglang",
             "root": self.root_of(name, path), "parent": served_name, "max_model_len": None}
            for name, path in self.loaded.items()
        ]


def requested_adapter(body: dict[str, Any]) -> str | None:
    """`model: "<anything>:<adapter>"` (split on the first ':') wins over `lora_path` (§1.3)."""
    model = body.get("model")
    if isinstance(model, str) and ":" in model:
        return model.split(":", 1)[1]
    lora_path = body.get("lora_path")
    if isinstance(lora_path, list):
        lora_path = lora_path[0] if lora_path else None
    return lora_path if isinstance(lora_path, str) else None
