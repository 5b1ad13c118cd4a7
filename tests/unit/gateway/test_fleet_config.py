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


def test_a_state_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="state_dir: .*afile is not a directory"):
        build_state(config(tmp_path, "").model_copy(update={"state_dir": str(tmp_path / "afile")}))


def test_an_unset_tracing_headers_variable_fails_at_start_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv("OTEL_AUTH", raising=False)
    tracing = "tracing: {endpoint: 'http://127.0.0.1:1/v1/traces', headers_env: OTEL_AUTH}\n"
    with pytest.raises(ConfigError, match="tracing.headers_env: the environment variable OTEL_AUTH"):
        build_state(config(tmp_path, tracing))
    monkeypatch.setenv("OTEL_AUTH", "no pair here")
    with pytest.raises(ConfigError, match="tracing.headers_env: OTEL_AUTH holds no `Name=value` header"):
        build_state(config(tmp_path, tracing))


@pytest.mark.parametrize("entries, message", [
    ("[\n", "the key file is not valid YAML at line 2"),
    ("- {sha256: " + "a" * 64 + ", models: gpt}\n", r"\[0\].models: expected a list of model names"),
    ("- {sha256: " + "a" * 64 + ", rpm: ten}\n", r"\[0\].rpm: expected a whole number"),
    ("- {sha256: " + "a" * 64 + ", tpm: 0}\n", r"\[0\].tpm: expected a whole number"),
    ("- {sha256: " + "a" * 64 + ", sha256: " + "b" * 64 + "}\n", "the key 'sha256' is given twice"),
])
def test_a_bad_key_file_is_named(tmp_path, entries, message):
    keys = tmp_path / "keys.yaml"
    keys.write_text(entries)
    with pytest.raises(ConfigError, match=message):
        build_state(config(tmp_path, f"auth: {{key_file: '{keys}'}}\n"))


@pytest.mark.parametrize("dsn, fragment", [
    ("not a dsn", "cannot start: the PostgreSQL DSN is not valid"),
    ("postgresql://postgres@127.0.0.1:5432/kgw_no_such_database", "cannot start: PostgreSQL refused the connection"),
])
async def test_a_failed_start_tells_the_server_one_line(tmp_path, monkeypatch, dsn, fragment):
    """What the ASGI server logs when the lifespan fails (uvicorn logs the message): one line, no traceback."""
    from gateway.app import create_app

    monkeypatch.setenv("FLEET_DSN", dsn)
    app = create_app(config(tmp_path, "store: {kind: postgres, dsn_env: FLEET_DSN}\n"))
    sent, inbox = [], [{"type": "lifespan.startup"}]

    async def receive():
        return inbox.pop(0)

    async def send(message):
        sent.append(message)

    with pytest.raises(Exception):
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert sent[-1]["type"] == "lifespan.startup.failed"
    assert sent[-1]["message"].startswith(fragment) and "\n" not in sent[-1]["message"]


def test_an_unset_backend_key_is_said_at_start_and_not_fatal(tmp_path, monkeypatch, caplog):
    """deploy/docker-compose.yml leaves MOONSHOT_API_KEY optional: the gateway starts, and says so once."""
    monkeypatch.delenv("KGW_HOSTED_KEY", raising=False)
    path = tmp_path / "gateway.yaml"
    path.write_text(f"state_dir: {tmp_path}\nbackends:\n"
                    "  - {name: llama, kind: llamacpp, url: 'http://127.0.0.1:1'}\n"
                    "  - {name: hosted, kind: moonshot, url: 'https://api.moonshot.ai/v1', api_key_env: KGW_HOSTED_KEY}\n")
    build_state(load_config(path))
    assert caplog.text.count("backends[1].api_key_env: the environment variable KGW_HOSTED_KEY is not set") == 1
