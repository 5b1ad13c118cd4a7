"""RedisRateLimiter: the rpm/tpm token buckets of gateway/policies/ratelimit.py kept in Redis, so that every
replica of a fleet draws on one budget per key. One Lua script checks and takes both buckets atomically (Redis
runs a script alone), on Redis's clock. Redis down: each replica enforces its share of the limit (limit / alive
replicas) in process, counted (gateway/shared.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from gateway.auth import Principal
from gateway.errors import RateLimitedError
from gateway.policies.ratelimit import BYTES_PER_TOKEN, DEFAULT_COMPLETION_CHARGE, RateLimiter

if TYPE_CHECKING:
    from gateway.shared import RedisLink

# KEYS: the buckets; ARGV: per bucket its capacity and the amount asked. Returns 0 (taken) or the number of the
# bucket that refused, with the seconds until the amount fits. Levels refill at capacity per minute.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local levels = {}
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[2 * i - 1])
  local amount = math.min(tonumber(ARGV[2 * i]), capacity)
  local state = redis.call('HMGET', key, 'level', 'stamp')
  local level = tonumber(state[1]) or capacity
  local stamp = tonumber(state[2]) or now
  level = math.min(capacity, level + math.max(0, now - stamp) * capacity / 60)
  if level < amount then
    return {i, tostring((amount - level) * 60 / capacity)}
  end
  levels[i] = level - amount
end
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 'level', tostring(levels[i]), 'stamp', tostring(now))
  redis.call('EXPIRE', key, 120)
end
return {0, '0'}
"""
KINDS = ("requests", "tokens")


class RedisRateLimiter:
    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self._take = link.client.register_script(TAKE)
        self.local = RateLimiter(share=lambda: link.replicas)   # the fallback: this replica's share

    async def admit(self, principal: Principal, body_bytes: int, max_tokens: int | None) -> None:
        if principal.rpm is None and principal.tpm is None:
            return
        if not self.link.usable():
            self.link.failed("ratelimit", None)
            return await self.local.admit(principal, body_bytes, max_tokens)
        tokens = body_bytes // BYTES_PER_TOKEN + (max_tokens or DEFAULT_COMPLETION_CHARGE)
        keys, args, kinds = [], [], []
        tag = f"{{{self.link.prefix}:rl:{principal.name}}}"   # one hash slot per key: a cluster runs it too
        for kind, limit, amount in (("requests", principal.rpm, 1), ("tokens", principal.tpm, tokens)):
            if limit:
                keys.append(f"{tag}:{kind}")
                args += [limit, amount]
                kinds.append(kind)
        try:
            refused, wait = await self._take(keys=keys, args=args)
        except (RedisError, OSError) as exc:   # refused, reset, timed out: serve on, degraded
            self.link.failed("ratelimit", exc)
            return await self.local.admit(principal, body_bytes, max_tokens)
        self.link.succeeded()
        if refused:
            raise RateLimitedError(kinds[int(refused) - 1], float(wait))
