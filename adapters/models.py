"""Adapters as data: AdapterSpec (a config `adapters:` entry, the admin POST body), and what the registry keeps:
AdapterRecord (the adapter and its active version), AdapterVersion (one content hash of its files) and
ReplicaState (one version on one backend replica)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from backends.base import AdapterFiles
from backends.config import Name


class AdapterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    source: str | None = None                     # PEFT dir (adapter_config.json + adapter_model.safetensors)
    gguf: str | None = None                       # GGUF LoRA for llama.cpp backends
    profile: str | None = None
    backends: tuple[Name, ...] = Field(min_length=1)


class SwapSpec(BaseModel):
    """The admin swap body: the new version's files (at least one)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str | None = None
    gguf: str | None = None


class ReplicaPhase(StrEnum):
    """One version on one backend replica (issue 13). Only `ready` is ever forwarded to."""
    PENDING = "pending"
    CONVERTING = "converting"
    LOADING = "loading"
    VERIFYING = "verifying"
    READY = "ready"
    DRAINING = "draining"
    UNLOADED = "unloaded"
    FAILED = "failed"
    RESTART_NEEDED = "restart_needed"


class VersionStatus(StrEnum):
    CANDIDATE = "candidate"    # being placed and verified; takes no traffic
    ACTIVE = "active"          # the version the adapter's route points at
    RETIRING = "retiring"      # flipped away from; draining, then unloaded
    RETIRED = "retired"
    FAILED = "failed"          # never took traffic (validation, load or verification failed)


@dataclass(frozen=True)
class AdapterVersion:
    adapter: str
    version: str               # sha256 (hex) over the adapter's files: the content identity
    source: str | None
    gguf: str | None
    adapter_class: str         # attention | experts | gguf
    rank: int | None
    status: VersionStatus
    created_at: float
    reason: str | None = None
    # What conversion made from source (adapters/conversion.py): the files backends are given instead. Not
    # stored: re-derived from the conversion cache, so the stored spec and version keep the user's inputs.
    converted_source: str | None = None
    converted_gguf: str | None = None

    @property
    def short(self) -> str:
        return self.version[:8]

    @property
    def label(self) -> str:
        """`name@hash8`: what x-kimi-adapter says, and the name the version is loaded under on SGLang."""
        return f"{self.adapter}@{self.short}"

    @property
    def files(self) -> AdapterFiles:
        """What the backends load: the converted artifacts where there are any, else the given files."""
        return AdapterFiles(self.converted_source or self.source, self.converted_gguf or self.gguf)

    def with_status(self, status: VersionStatus, reason: str | None = None) -> AdapterVersion:
        return replace(self, status=status, reason=reason)


@dataclass(frozen=True)
class AdapterRecord:
    spec: AdapterSpec
    origin: str                # "config" (seeded from the file) or "admin" (registered at run time)
    active: str | None         # the active version's hash, None until one took traffic
    updated_at: float


@dataclass(frozen=True)
class ReplicaState:
    adapter: str
    version: str
    backend: str
    replica: str               # the replica's URL
    state: ReplicaPhase
    reason: str | None
    updated_at: float
