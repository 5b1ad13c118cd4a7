"""FakeDriver: a scripted BackendDriver for app-level tests (faults before and after the first byte)."""
from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from backends.base import BackendRequest
from backends.errors import BackendError, UnsupportedFeatureError


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
    kind = "fake"

    def __init__(self, name: str, steps: list[Step] | None = None, *, vision: bool = True) -> None:
        self.name, self.vision = name, vision
        self.steps = list(steps or [])
        self.requests: list[BackendRequest] = []
        self.replies: list[FakeReply] = []

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    async def health(self) -> bool:
        return True

    def adapters(self) -> dict[str, bool]:
        return {}

    def plan(self, adapters) -> None:
        self.planned = dict(adapters)

    def check(self, request: BackendRequest) -> None:
        if request.has_images and not self.vision:
            raise UnsupportedFeatureError(f"backend '{self.name}' has no vision", backend=self.name, param="messages")

    async def send(self, request: BackendRequest) -> FakeReply:
        self.requests.append(request)
        step = self.steps.pop(0) if self.steps else Step()
        if step.error is not None:
            raise step.error
        reply = FakeReply(step, request.model)
        self.replies.append(reply)
        return reply
