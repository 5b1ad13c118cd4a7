"""SharedReasoningMemory: the reasoning memory of gateway/policies/reasoning_memory.py, written through to Redis
so that an agent's next turn finds its reasoning on any replica of a fleet.

Storage only: what is remembered, and how a history is restored, stays in ReasoningMemory. Each remembered
turn is kept locally (as before) and written to Redis off the request path; before a tool-using request is
restored, `prefetch` pulls the turns its history names from Redis into the local memory in one round trip.
In Redis each tenant (memory scope) has its own hash of turns with an expiry each, bounded in bytes
(`tenant_max_bytes`: the oldest turns go first) by one Lua script. Redis down: local memory only, counted.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from gateway.policies.reasoning_memory import ReasoningMemory, turn_key

if TYPE_CHECKING:
    from gateway.shared import RedisLink

log = logging.getLogger(__name__)
MAX_PENDING_WRITES = 1024   # past this, a write is dropped (counted) rather than queued without bound

# KEYS: values (hash field -> "expiry|reasoning"), expiries (zset), bytes (counter). ARGV: field, expiry, value,
# now, tenant_max_bytes, ttl_s. Expired turns go first, then the oldest until the tenant fits its bound.
REMEMBER = """
local function drop(field)
  local size = redis.call('HSTRLEN', KEYS[1], field)
  if size > 0 then
    redis.call('HDEL', KEYS[1], field)
    redis.call('DECRBY', KEYS[3], size)
  end
  redis.call('ZREM', KEYS[2], field)
end
for _, field in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])) do drop(field) end
drop(ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
local total = redis.call('INCRBY', KEYS[3], string.len(ARGV[3]))
while total > tonumber(ARGV[5]) do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  drop(oldest[1])
  total = tonumber(redis.call('GET', KEYS[3]) or '0')
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], math.ceil(tonumber(ARGV[6]))) end
return total
"""


class SharedReasoningMemory(ReasoningMemory):
    def __init__(self, link: RedisLink, *, tenant_max_bytes: int, max_entries: int, max_bytes: int,
                 ttl_s: float) -> None:
        super().__init__(max_entries=max_entries, max_bytes=max_bytes, ttl_s=ttl_s)
        self.link = link
        self.tenant_max_bytes = tenant_max_bytes
        self._remember = link.client.register_script(REMEMBER)
        self._pending: set[asyncio.Task] = set()

    def _keys(self, scope: str) -> list[str]:
        tenant = hashlib.blake2b(scope.encode(), digest_size=12).hexdigest()  # bounded, printable key names
        tag = f"{{{self.link.prefix}:rm:{tenant}}}"
        return [f"{tag}:turns", f"{tag}:expiry", f"{tag}:bytes"]

    def remember(self, scope: str, tool_calls: list, reasoning: str) -> bool:
        if not super().remember(scope, tool_calls, reasoning):
            return False
        if not self.link.usable():
            self.link.failed("memory", None)
        elif len(self._pending) >= MAX_PENDING_WRITES:
            self.link.failed("memory", None)   # overload: this turn stays on this replica only
        else:
            task = asyncio.get_running_loop().create_task(self._write(scope, turn_key(scope, tool_calls), reasoning))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        return True

    async def _write(self, scope: str, key: bytes, reasoning: str) -> None:
        now = time.time()
        expiry = now + self.ttl_s
        try:
            await self._remember(keys=self._keys(scope),
                                 args=[key.hex(), expiry, f"{expiry:.3f}|{reasoning}", now, self.tenant_max_bytes,
                                       self.ttl_s])
            self.link.succeeded()
        except (RedisError, OSError) as exc:
            self.link.failed("memory", exc)

    async def prefetch(self, scope: str, messages: list) -> None:
        """Bring the turns this history names (assistant turns with tool calls) from Redis into local memory."""
        wanted = []
        for message in messages:
            if isinstance(message, dict) and message.get("role") == "assistant" and \
                    isinstance(message.get("tool_calls"), list) and message["tool_calls"]:
                key = turn_key(scope, message["tool_calls"])
                if key is not None and self.recall(scope, message["tool_calls"]) is None:
                    wanted.append((key.hex(), message["tool_calls"]))
        if not wanted:
            return
        if not self.link.usable():
            self.link.failed("memory", None)
            return
        try:
            found = await self.link.client.hmget(self._keys(scope)[0], [field for field, _ in wanted])
            self.link.succeeded()
        except (RedisError, OSError) as exc:
            self.link.failed("memory", exc)
            return
        now = time.time()
        for (_, calls), raw in zip(wanted, found):
            if raw is None:
                continue
            expiry, _, reasoning = raw.decode().partition("|")
            if float(expiry) > now:
                ReasoningMemory.remember(self, scope, calls, reasoning)   # local only: it came from Redis
