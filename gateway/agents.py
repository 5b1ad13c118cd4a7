"""AgentSupport: what the data plane does for tool-using requests, and only for them: put remembered
reasoning back into the history, and watch the reply so that its reasoning can be put back next turn.
The memory is scoped per client key, or per `user` on an open gateway (memory_scope); where it lives (this
process, or Redis for a fleet) is gateway/shared.py's choice."""
from __future__ import annotations

from gateway.config import ReasoningMemoryConfig
from gateway.policies.reasoning_memory import ReasoningCapture, ReasoningMemory

_BUILD = object()


def memory_scope(key_name: str, doc: dict) -> str | None:
    """Whose reasoning a request may read and write: its client key's; on an open gateway (no keys) its
    `user`'s, and without a `user` nobody's (no memory), so that no client ever reads another's reasoning."""
    if key_name:
        return f"key:{key_name}"
    user = doc.get("user")
    return f"user:{user}" if isinstance(user, str) and user else None


class AgentSupport:
    def __init__(self, config: ReasoningMemoryConfig, memory: ReasoningMemory | None = _BUILD) -> None:
        # _BUILD: the in-process memory, from config
        if memory is _BUILD:
            memory = ReasoningMemory(max_entries=config.max_entries, max_bytes=config.max_bytes,
                                     ttl_s=config.ttl_s) if config.enabled else None
        self.memory = memory
        self.shared = getattr(memory, "prefetch", None) is not None   # a fleet's memory: fetch before restoring

    async def prefetch(self, doc: dict, key_name: str) -> None:
        """A fleet's memory: the turns this history names, from Redis, before `prepare` restores them."""
        scope = memory_scope(key_name, doc)
        if scope is not None and isinstance(doc.get("messages"), list):
            await self.memory.prefetch(scope, doc["messages"])

    def prepare(self, doc: dict, key_name: str, recorder) -> ReasoningCapture | None:
        """Restore reasoning in `doc["messages"]` (counted through the request's recorder) and return the
        observer for the reply."""
        scope = memory_scope(key_name, doc)
        if self.memory is None or scope is None:
            return None
        restored, missed = self.memory.restore(scope, doc.get("messages") or [])
        recorder.reasoning_memory(restored, missed)
        return ReasoningCapture(self.memory, scope)
