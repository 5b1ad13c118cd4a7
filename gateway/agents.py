"""AgentSupport: what the data plane does for tool-using requests, and only for them: put remembered
reasoning back into the history, and watch the reply so that its reasoning can be put back next turn."""
from __future__ import annotations

from gateway.config import ReasoningMemoryConfig
from gateway.metrics import Metrics
from gateway.policies.reasoning_memory import ReasoningCapture, ReasoningMemory


class AgentSupport:
    def __init__(self, config: ReasoningMemoryConfig, metrics: Metrics) -> None:
        self.metrics = metrics
        self.memory = ReasoningMemory(max_entries=config.max_entries, max_bytes=config.max_bytes,
                                      ttl_s=config.ttl_s) if config.enabled else None

    def prepare(self, doc: dict, scope: str, route: str) -> ReasoningCapture | None:
        """Restore reasoning in `doc["messages"]` (counted) and return the observer for the reply."""
        if self.memory is None:
            return None
        restored, missed = self.memory.restore(scope, doc.get("messages") or [])
        if restored:
            self.metrics.reasoning_memory.labels(route, "restored").inc(restored)
        if missed:
            self.metrics.reasoning_memory.labels(route, "missed").inc(missed)
        return ReasoningCapture(self.memory, scope)
