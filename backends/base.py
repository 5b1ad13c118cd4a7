"""The BackendDriver contract: what the gateway hands a driver, and what it gets back.

Lifecycle: the app's lifespan calls `start()` once (open transports, discover adapter ids), then the data
plane calls `check()` and `send()` per request, and the lifespan calls `aclose()` on shutdown.
`send()` raises a `backends.errors.BackendError` for anything that fails before the reply's first event;
the caller owns the returned `BackendReply` and must `aclose()` it (a client hang-up closes it early,
which aborts the upstream request).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Mapping, Protocol


@dataclass(frozen=True, slots=True)
class AgentRules:
    """A route's answers to the hosted API's thinking-mode rules (reference/moonshot-api.md §2.2, §3)."""
    forced_tool_choice: str = "downgrade"   # thinking + tool_choice required/named: downgrade | instant | reject
    missing_reasoning: str = "instant"      # thinking + a tool-call turn without reasoning: instant | reject | forward
    strip_reasoning: bool = False           # remove reasoning_content from replies (clients that choke on it)


DEFAULT_RULES = AgentRules()


@dataclass(slots=True)
class BackendRequest:
    path: str                       # protocol.CHAT_PATH or protocol.COMPLETIONS_PATH
    body: dict                      # the client's OpenAI body, thinking switches already removed
    model: str                      # the name the client asked for: every reply says this
    route: str                      # the base route or adapter route that served it (hosted model mapping)
    adapter: str | None             # registry adapter name, None for the base model
    thinking: bool                  # the resolved mode; each driver writes its own form
    sampling: Mapping = field(default_factory=dict)  # profile values to set (temperature, top_p, min_p); read-only
    stream: bool = False
    has_images: bool = False
    request_id: str = ""
    rules: AgentRules = DEFAULT_RULES
    adjustments: list[str] = field(default_factory=list)  # what a driver changed, for x-kimi-adjusted
    hide_usage_chunk: bool = False  # the gateway asked for stream usage for its metrics, not the client
    observer: object | None = None  # sees replies of tool-using requests (gateway/agents.py)


@dataclass(frozen=True, slots=True)
class AdapterFiles:
    """Where an adapter planned on a backend lives: a PEFT dir (SGLang) and/or a GGUF file (llama.cpp)."""
    source: str | None
    gguf: str | None


class BackendReply(Protocol):
    status: int
    usage: dict | None              # filled in once the backend reported token usage

    async def read(self) -> bytes: ...          # non-stream: the whole OpenAI body, `model` rewritten
    def events(self) -> AsyncIterator[bytes]: ... # stream: SSE bytes up to and including `data: [DONE]`
    async def aclose(self) -> None: ...


class BackendDriver(Protocol):
    name: str
    kind: str

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    def check(self, request: BackendRequest) -> None: ...   # raises UnsupportedFeatureError, no I/O
    async def send(self, request: BackendRequest) -> BackendReply: ...
    async def health(self) -> bool: ...
    def adapters(self) -> dict[str, bool]: ...               # adapter name -> loaded/usable here
    def plan(self, adapters: dict[str, AdapterFiles]) -> None: ...  # the adapters this backend should serve
