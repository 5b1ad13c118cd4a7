"""Config for a fleet: `store` and `shared` fail fast, naming the key, and pick the implementations."""
import pytest

from adapters.lease import StoreLeases
from adapters.store import SqliteStore
from adapters.store_postgres import PostgresStore
from gateway.config import ConfigError, load_config
from gateway.policies.ratelimit import RateLimiter
from gateway.policies.ratelimit_redis import RedisRateLimiter
from gateway.state import build_state

BASE = "backends: [{name: llama, kind: llamacpp, url: 'http://127.0.0.1:1'}]\nroutes: [{name: m, targets: [llama]}]\n"


def config(tmp_path, text: str):
    path = tmp_path / "gateway.yaml"
    path.write_text(BASE + f"state_dir: {tmp_path}\n" + text)
    return load_config(path)


@pytest.mark.parametrize("text, message", [
    ("store: {kind: postgres}\n", "store: a postgres store needs `dsn_env`"),
    ("store: {kind: sqlite, dsn_env: DSN}\n", "store: `dsn_env` is for kind: postgres"),
    ("store: {kind: mysql, dsn_env: DSN}\n", "store.kind"),
    ("store: {kind: postgres, dsn_env: 'postgresql://u:pw@h/db'}\n", "store.dsn_env"),
    ("shared: {kind: redis}\n", "shared: a redis `shared` needs `url_env`"),
    ("shared: {kind: redis, url_env: R, key_prefix: 'a b'}\n", "shared.key_prefix"),
    ("shared: {kind: memcached}\n", "shared.kind"),
])
def test_bad_fleet_config_is_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("`", ".").replace("(", r"\(")):
        config(tmp_path, text)


def test_an_unset_dsn_or_url_variable_fails_at_start_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FLEET_DSN", raising=False)
    with pytest.raises(ConfigError, match="store.dsn_env: the environment variable FLEET_DSN"):
        build_state(config(tmp_path, "store: {kind: postgres, dsn_env: FLEET_DSN}\n"))
    monkeypatch.delenv("FLEET_REDIS", raising=False)
    with pytest.raises(ConfigError, match="shared.url_env: the environment variable FLEET_REDIS"):
        build_state(config(tmp_path, "shared: {kind: redis, url_env: FLEET_REDIS}\n"))


def test_the_config_picks_the_implementations(tmp_path, monkeypatch):
    alone = build_state(config(tmp_path, ""))
    assert isinstance(alone.lifecycle.store, SqliteStore) and not alone.lifecycle.fleet
    assert isinstance(alone.shared.limiter, RateLimiter) and alone.shared.link is None
    monkeypatch.setenv("FLEET_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    monkeypatch.setenv("FLEET_REDIS", "redis://127.0.0.1:6379/0")
    fleet = build_state(config(tmp_path, "store: {kind: postgres, dsn_env: FLEET_DSN}\n"
                                         "shared: {kind: redis, url_env: FLEET_REDIS}\n"))
    assert isinstance(fleet.lifecycle.store, PostgresStore) and isinstance(fleet.lifecycle.leases, StoreLeases)
    assert isinstance(fleet.shared.limiter, RedisRateLimiter)
