"""FakeDriver: a scripted BackendDriver for app-level tests (faults before and after the first byte)."""
from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from backends.balancer import ANY_REPLICA
from backends.base import BackendRequest, LoadedAdapter
from backends.errors import AdapterNotReadyError, BackendError, UnsupportedFeatureError


def chunk(text: str, model: str = "upstream-model") -> bytes:
    doc = {"object": "chat.completion.chunk", "model": model, "choices": [{"index": 0, "delta": {"content": text}}]}
    return b"data: " + orjson.dumps(doc) + b"\n\n"


@dataclass
class Step:
    """One send(): raise `error`, or answer `text` (non-stream) / `events` (stream) and maybe fail after."""
    error: BackendError | None = None
    text: str = "hello"
    events: list[bytes] = field(default_factory=lambda: [chunk("hel"), chunk("lo"), b"data: [DONE]\n\n"])
    fail_after: int | None = None   # stream: raise `error_after` after this many events
    error_after: BackendError | None = None


class FakeReply:
    def __init__(self, step: Step, model: str) -> None:
        self.step, self.model, self.status, self.usage, self.closed = step, model, 200, None, False

    async def read(self) -> bytes:
        self.usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        return orjson.dumps({"object": "chat.completion", "model": self.model, "usage": self.usage,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": self.step.text},
                                          "finish_reason": "stop"}]})

    async def events(self):
        for index, event in enumerate(self.step.events):
            if self.step.fail_after is not None and index == self.step.fail_after:
                raise self.step.error_after or BackendError("boom", backend="fake")
            yield event.replace(b'"upstream-model"', b'"' + self.model.encode() + b'"')

    async def aclose(self) -> None:
        self.closed = True


class FakeDriver:
    """One replica that loads adapters at run time (by label) and answers probes with the adapter's name, so
    the lifecycle verifies them; it refuses to forward an adapter it was not told to serve, as drivers must."""

    kind = "fake"
    replicas = ("fake://0",)
    dynamic_adapters = True
    expert_adapter = None
    on_replica_change = None

    def __init__(self, name: str, steps: list[Step] | None = None, *, vision: bool = True) -> None:
        self.name, self.vision = name, vision
        self.steps = list(steps or [])
        self.requests: list[BackendRequest] = []
        self.replies: list[FakeReply] = []
        self.loaded: dict[str, object] = {}
        self.serving: dict[str, object] = {}

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    async def health(self) -> bool:
        return True

    def replica_up(self) -> list[bool]:
        return [True]

    def set_replica_up(self, replica: int, up: bool) -> None:
        pass

    async def list_adapters(self, replica: int) -> list:
        return [LoadedAdapter(name, "") for name in self.loaded]

    async def load_adapter(self, replica: int, name: str, files, pinned: bool = False) -> None:
        self.loaded[name] = files

    async def unload_adapter(self, replica: int, name: str) -> None:
        self.loaded.pop(name, None)

    async def probe(self, replica: int, adapter, files=None) -> str:
        return f"probe {adapter}"

    def serve(self, replica: int, adapters) -> None:
        self.serving = dict(adapters)

    def expect(self, adapter: str) -> None: ...
    def lost(self, replica: int, adapter: str) -> None: ...
    def forget(self, adapter: str) -> None: ...
    def hold(self, replica: int) -> None: ...
    def release(self, replica: int) -> None: ...
    def disconnect(self, replica: int) -> None: ...

    def in_flight(self) -> list[int]:
        return [0]

    def retirements(self) -> list[tuple[str, int]]:
        return []

    def replica_traffic(self) -> list[dict]:
        return [{"slots": None, "ejected": False}]

    on_capacity = None
    retry_budget = None

    def reserve(self, adapter: str | None):
        return ANY_REPLICA  # unbounded: no slots counted

    def has_room(self) -> bool:
        return True

    def adapter_in_flight(self, adapter: str) -> int:
        return 0

    def adapter_requests(self, adapter: str) -> int:
        return 0

    def check(self, request: BackendRequest) -> None:
        if request.has_images and not self.vision:
            raise UnsupportedFeatureError(f"backend '{self.name}' has no vision", backend=self.name, param="messages")

    async def send(self, request: BackendRequest) -> FakeReply:
        if request.adapter is not None and request.adapter not in self.serving:
            raise AdapterNotReadyError(f"{request.adapter} is not served", backend=self.name)
        self.requests.append(request)
        step = self.steps.pop(0) if self.steps else Step()
        if step.error is not None:
            raise step.error
        reply = FakeReply(step, request.model)
        self.replies.append(reply)
        return reply
