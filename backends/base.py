"""The BackendDriver contract: what the gateway hands a driver, and what it gets back.

Lifecycle: the app's lifespan calls `start()` once (open transports, discover the server), then the data
plane calls `check()` and then `send()` per request (send() does not check again: a request that check()
refused is never sent), and the lifespan calls `aclose()` on shutdown.

Adapters: the adapter lifecycle (adapters/lifecycle.py) owns every load and unload. It asks each replica
what it has (`list_adapters`), loads and unloads there (never on the request path), probes a version
(`probe`), and then tells the driver which versions it may forward to that replica (`serve`). A driver
never forwards an adapter it was not told to serve on the replica it picked; when it sees a replica that
lost its adapters (a restart), it raises `AdapterMissingError` and calls `on_replica_change(replica)`.
`send()` raises a `backends.errors.BackendError` for anything that fails before the reply's first event;
the caller owns the returned `BackendReply` and must `aclose()` it (a client hang-up closes it early,
which aborts the upstream request).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Mapping, Protocol


@dataclass(frozen=True, slots=True)
class AgentRules:
    """A route's answers to the hosted API's thinking-mode rules (reference/moonshot-api.md §2.2, §3)."""
    forced_tool_choice: str = "downgrade"   # thinking + tool_choice required/named: downgrade | instant | reject
    missing_reasoning: str = "instant"      # thinking + a tool-call turn without reasoning: instant | reject | forward
                                            # | placeholder (targets that always think use it instead of instant)
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
    effort: str | None = None       # the client's reasoning effort (K3 targets take it; backends/generations.py)
    traceparent: str | None = None  # W3C trace context for the backend (gateway/tracing.py)
    lease: object | None = None     # a slot the admission queue reserved (backends/balancer.py Lease); send() takes it
    avoid: list[int] = field(default_factory=list)  # replicas of the current target that failed this request
    tenant: str = ""                # the client key's name: fair share in the admission queue
    priority: int = 1               # admission class: 0 high, 1 normal, 2 low
    deadline: float | None = None   # event-loop time by which the whole request must be done


_new_request = object.__new__


def forwarded_request(path: str, body: dict, model: str, route: str, adapter: str | None, thinking: bool, *,
                      sampling: Mapping, stream: bool, has_images: bool, request_id: str, rules: AgentRules,
                      hide_usage_chunk: bool, observer: object | None, effort: str | None,
                      traceparent: str | None, tenant: str, priority: int, deadline: float | None) -> BackendRequest:
    """BackendRequest(...) as the data plane builds one per request, every field given. A class called with
    keywords goes through a dict of them (about 10k instructions for this one); a function called with as
    many keywords does not, and the slots are set directly (tests/unit/backends/test_base.py checks that
    every field is set, as the dataclass would set it)."""
    request = _new_request(BackendRequest)
    request.path, request.body, request.model, request.route = path, body, model, route
    request.adapter, request.thinking, request.sampling, request.stream = adapter, thinking, sampling, stream
    request.has_images, request.request_id, request.rules, request.adjustments = has_images, request_id, rules, []
    request.hide_usage_chunk, request.observer, request.effort = hide_usage_chunk, observer, effort
    request.traceparent, request.lease, request.avoid, request.tenant = traceparent, None, [], tenant
    request.priority, request.deadline = priority, deadline
    return request


@dataclass(frozen=True, slots=True)
class AdapterFiles:
    """Where an adapter planned on a backend lives: a PEFT dir (SGLang) and/or a GGUF file (llama.cpp)."""
    source: str | None
    gguf: str | None


@dataclass(frozen=True, slots=True)
class LoadedAdapter:
    """One adapter a replica reports as loaded: SGLang by name, llama.cpp by path and id."""
    name: str | None
    path: str
    id: int | None = None


class BackendReply(Protocol):
    status: int
    usage: dict | None              # filled in once the backend reported token usage

    async def read(self) -> bytes: ...          # non-stream: the whole OpenAI body, `model` rewritten
    def events(self) -> AsyncIterator[bytes]: ... # stream: SSE bytes up to and including `data: [DONE]`
    async def aclose(self) -> None: ...


class BackendDriver(Protocol):
    name: str
    kind: str
    replicas: tuple[str, ...]          # the servers' base URLs; `replica` arguments index this
    dynamic_adapters: bool             # adapters load and unload at run time (else: fixed at server start)
    expert_adapter: str | None         # the one adapter a server was launched with (SGLang + KT expert LoRA)
    on_replica_change: Callable[[int], None] | None   # set by the lifecycle: a replica lost or changed adapters

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    def check(self, request: BackendRequest) -> None: ...   # raises UnsupportedFeatureError, no I/O
    async def send(self, request: BackendRequest) -> BackendReply: ...
    async def health(self) -> bool: ...                      # any replica up; per replica: replica_up()
    def replica_up(self) -> list[bool]: ...
    def set_replica_up(self, replica: int, up: bool) -> None: ...   # a supervisor saw its process die or return
    async def list_adapters(self, replica: int) -> list[LoadedAdapter]: ...
    async def load_adapter(self, replica: int, name: str, files: AdapterFiles, pinned: bool = False) -> None: ...
    async def unload_adapter(self, replica: int, name: str) -> None: ...      # "already loaded"/"unknown" are fine
    async def probe(self, replica: int, adapter: str | None, files: AdapterFiles | None = None) -> str: ...
    def serve(self, replica: int, adapters: Mapping[str, AdapterFiles]) -> None: ...  # what may be forwarded there
    def expect(self, adapter: str) -> None: ...              # requests for it wait (bounded) for its first load
    def lost(self, replica: int, adapter: str) -> None: ...  # the replica no longer has it
    def forget(self, adapter: str) -> None: ...              # retired: nobody waits for it
    def hold(self, replica: int) -> None: ...                # drained restart: new requests wait or go elsewhere
    def release(self, replica: int) -> None: ...
    def disconnect(self, replica: int) -> None: ...          # drop idle connections before a restart
    def in_flight(self) -> list[int]: ...                    # requests in flight per replica
    def replica_traffic(self) -> list[dict]: ...             # per replica: {"slots", "ejected"}
    def reserve(self, adapter: str | None) -> object | None: ...  # a slot's Lease, or None: full, queue the request
    def has_room(self) -> bool: ...                          # some replica that is up has a free slot
    on_capacity: Callable[[], None] | None             # set by the gateway: a slot or a replica came free
    retry_budget: object | None                        # backends/retry_budget.py RetryBudget, or None
    def adapter_in_flight(self, adapter: str) -> int: ...
    def retirements(self) -> list[tuple[str, int]]: ...     # (served model id, days to its retirement) if known
    def adapter_requests(self, adapter: str) -> int: ...     # requests so far: demand for adapter placement
