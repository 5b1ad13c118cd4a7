"""The PostgreSQL and Redis this machine runs (127.0.0.1:5432 trust auth, 127.0.0.1:6379), for tests: each test
gets a database or key prefix of its own and drops it after. Unreachable services fail the test with how to get
them, never skip it."""
from __future__ import annotations

import asyncio
import os
import uuid
from contextlib import contextmanager
from typing import Iterator

import asyncpg
import pytest

ADMIN_DSN = os.environ.get("KIMI_GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("KIMI_GATEWAY_TEST_REDIS", "redis://127.0.0.1:6379/0")
HOW = ("tests need PostgreSQL at {dsn} (trust auth; a role that may CREATE DATABASE) and Redis at {redis}: "
       "start them (apt-get install postgresql redis-server), or point KIMI_GATEWAY_TEST_PG / KIMI_GATEWAY_TEST_REDIS "
       "at others").format(dsn=ADMIN_DSN, redis=REDIS_URL)


def dsn_of(database: str) -> str:
    return ADMIN_DSN.rsplit("/", 1)[0] + "/" + database


async def _admin(statement: str) -> None:
    try:
        conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"{HOW}: {exc}")
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty database; its DSN. Dropped (connections and all) afterwards."""
    name = f"kgw_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f"CREATE DATABASE {name}"))
    try:
        yield dsn_of(name)
    finally:
        asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def fresh_prefix() -> str:
    return f"kgw-test-{uuid.uuid4().hex[:12]}"


def drop_prefix(prefix: str) -> None:
    """Every key under `prefix` (hash-tagged keys included) is deleted."""
    import redis
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.ConnectionError as exc:
        pytest.fail(f"{HOW}: {exc}")
    finally:
        client.close()
