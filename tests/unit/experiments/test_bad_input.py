"""Bad input to the control plane (run-time routes, experiments, feedback, adapter admin): every refusal has its
status, an OpenAI-shaped body naming the field or header, no traceback, and leaves the store as it was."""
from __future__ import annotations

import httpx
import orjson
import pytest

from adapters.store import StoreUnavailableError
from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.adapter_files import write_peft
from tests.app_client import running
from tests.emulators.fake_driver import FakeDriver
from tests.unit.experiments.helpers import ADMIN, TEAM, app, chat

JSON = {"content-type": "application/json"}
A = {**ADMIN, **JSON}
T = {**TEAM, **JSON}
ROUTE = b'{"name": "x", "targets": ["one"]}'
MEGABYTE = 1024 * 1024


def assert_error(response, status: int, fragment: str, param: str | None = None) -> dict:
    """The answer is the OpenAI error shape with `status`, `fragment` in its message and no traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"], error["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    if param is not None:
        assert error["param"] == param
    return error


BAD_BODIES = [
    # (method, path, body, headers, status, fragment, param)
    ("PUT", "/admin/routes/x", b"{not json", A, 400, "not valid JSON", None),
    ("PUT", "/admin/routes/x", b"[1, 2]", A, 400, "must be a JSON object, not an array", None),
    ("PUT", "/admin/routes/x", b'"x"', A, 400, "not a string", None),
    ("PUT", "/admin/routes/x", b"null", A, 400, "not null", None),
    ("PUT", "/admin/routes/x", b"\xff\xfe{}", A, 400, "not valid JSON", None),
    ("PUT", "/admin/routes/x", b"[" * 100_000, A, 400, "not valid JSON", None),
    ("PUT", "/admin/routes/x", b'{"name": "x", "experiment": {"variants": {"v1": 1, "v1": 2}}}', A, 400,
     "the key 'v1' twice", None),
    ("PUT", "/admin/routes/x", b'{"name": "x", "name": "x", "targets": ["one"]}', A, 400, "'name' twice", None),
    ("PUT", "/admin/routes/x", b'{"name": "x", "targets": ["one"], "timeout_s": NaN}', A, 400, "NaN", None),
    ("PUT", "/admin/routes/x", b'{"name": "x", "targets": ["one"], "timeout_s": Infinity}', A, 400, "Infinity", None),
    ("PUT", "/admin/routes/x", b"", A, 422, "the body is required", None),
    ("PUT", "/admin/routes/x", b'{"name": "x"}', A, 422, "exactly one of `targets` or `experiment`", None),
    ("PUT", "/admin/routes/x", b'{"name": "x", "targets": "one"}', A, 422, "targets:", "targets"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "targets": ["one"], "bogus": 1}', A, 422, "bogus: unknown key", "bogus"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "targets": ["nope"]}', A, 422, "'nope' is not a backend", "targets[0]"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "experiment": {"variants": {"v1": -1, "v2": 5}}}', A, 422,
     "experiment.variants.v1", "experiment.variants.v1"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "experiment": {"variants": {"v1": 0, "v2": 0}}}', A, 422,
     "sum to more than 0", "experiment.variants"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "experiment": {"variants": {"v1": 1' + b"0" * 400 + b"}}}", A, 422,
     "less than or equal to 1000000", "experiment.variants.v1"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "experiment": {"variants": {"v1": 1.5}}}', A, 422,
     "experiment.variants.v1", "experiment.variants.v1"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "experiment": {"variants": {}}}', A, 422, "experiment.variants",
     "experiment.variants"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "experiment": {"variants": {"x": 1}}}', A, 422,
     "'x' is this experiment itself", "experiment.variants"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "experiment": {"variants": {"legal": 1}}}', A, 422,
     "'legal' is not an adapter or a base route", "experiment.variants"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "experiment": {"variants": {"v1": 1}, "shadow": {"v2": 2}}}', A, 422,
     "shadow fraction", "experiment.shadow"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "targets": ["one"], "deadline_ms": 1' + b"0" * 400 + b"}", A, 422,
     "deadline_ms", "deadline_ms"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "targets": ["one"], "profile": "' + b"p" * 100_000 + b'"}', A, 422,
     "is not a sampling profile", "profile"),
    # The admin API reads numbers and booleans strictly: a string is not a number, 1 is not true, 50.0 not 50.
    ("PUT", "/admin/routes/x", b'{"name": "x", "targets": ["one"], "timeout_s": "30"}', A, 422,
     "timeout_s: Input should be a valid number", "timeout_s"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "targets": ["one"], "deadline_ms": "5000"}', A, 422,
     "deadline_ms: Input should be a valid integer", "deadline_ms"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "experiment": {"variants": {"v1": "50", "v2": 50}}}', A, 422,
     "experiment.variants.v1: Input should be a valid integer", "experiment.variants.v1"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "experiment": {"variants": {"v1": 50.0, "v2": 50}}}', A, 422,
     "experiment.variants.v1: Input should be a valid integer", "experiment.variants.v1"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "experiment": {"variants": {"v1": 1}, "shadow": {"v2": "0.5"}}}', A,
     422, "experiment.shadow.v2: Input should be a valid number", "experiment.shadow.v2"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "experiment": {"variants": {"v1": 1}, "guard": {"enabled": "no"}}}',
     A, 422, "experiment.guard.enabled: Input should be a valid boolean", "experiment.guard.enabled"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "experiment": {"variants": {"v1": 1}, "guard": {"min_requests": "9"}}}',
     A, 422, "experiment.guard.min_requests: Input should be a valid integer", "experiment.guard.min_requests"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "experiment": {"variants": {"v1": 1}, '
     b'"allocation": {"mode": "thompson", "floor": "0.1"}}}', A, 422,
     "experiment.allocation.floor: Input should be a valid number", "experiment.allocation.floor"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "targets": ["one"], "agent": {"strip_reasoning": 1}}', A, 422,
     "agent.strip_reasoning: Input should be a valid boolean", "agent.strip_reasoning"),
    ("PUT", "/admin/routes/%C3%A9", '{"name": "é", "targets": ["one"]}'.encode(), A, 422, "name: String should match",
     "name"),
    ("PUT", "/admin/routes/" + "a" * 300, b'{"name": "' + b"a" * 300 + b'", "targets": ["one"]}', A, 422, "name:",
     "name"),
    ("PUT", "/admin/routes/v1", b'{"name": "v1", "targets": ["one"]}', A, 422, "an adapter's own route", "name"),
    ("PUT", "/admin/routes/x", b'{"name": "y", "targets": ["one"]}', A, 400, "is not the path's", "name"),
    ("PUT", "/admin/routes/x", ROUTE, {**ADMIN, "content-type": "text/plain"}, 415, "application/json",
     "content-type"),
    ("PUT", "/admin/routes/x", ROUTE, {**ADMIN, "content-type": "application/x-www-form-urlencoded"}, 415,
     "with curl -d, add -H 'content-type: application/json'", "content-type"),
    ("PUT", "/admin/routes/x", ROUTE, ADMIN, 415, "got none", "content-type"),
    ("PUT", "/admin/routes/x", b'{"name": "x", "targets": ["one"], "profile": "' + b"p" * MEGABYTE + b'"}', A, 413,
     "exceeds the limit", None),
    ("POST", "/admin/experiments/legal/promote", b"[1]", A, 400, "not an array", None),
    ("POST", "/admin/experiments/legal/promote", b'{"variant": 5}', A, 422, "variant:", "variant"),
    ("POST", "/admin/experiments/legal/promote", b'{"x": 5}', A, 422, "x: unknown key", "x"),
    ("POST", "/v1/feedback", b"{bad", T, 400, "not valid JSON", None),
    ("POST", "/v1/feedback", b"[]", T, 400, "not an array", None),
    ("POST", "/v1/feedback", b'{"request_id": "r", "score": NaN}', T, 400, "NaN", None),
    ("POST", "/v1/feedback", b'{"request_id": "r", "score": 2}', T, 422, "score:", "score"),
    ("POST", "/v1/feedback", b'{"request_id": "r", "score": -0.1}', T, 422, "score:", "score"),
    ("POST", "/v1/feedback", b'{"request_id": "r", "score": "0.5"}', T, 422, "score:", "score"),
    ("POST", "/v1/feedback", b'{"request_id": "r", "label": "yes"}', T, 422, "label:", "label"),
    ("POST", "/v1/feedback", b'{"request_id": "r", "label": 1}', T, 422, "label:", "label"),
    ("POST", "/v1/feedback", b'{"request_id": "r"}', T, 422, "exactly one of `score`", None),
    ("POST", "/v1/feedback", b'{"request_id": "", "label": true}', T, 422, "request_id:", "request_id"),
    ("POST", "/v1/feedback", b'{"request_id": 5, "label": true}', T, 422, "request_id:", "request_id"),
    ("POST", "/v1/feedback", b'{"request_id": "r", "label": true, "metadata": [1]}', T, 422, "metadata:", "metadata"),
    ("POST", "/v1/feedback", b'{"request_id": "r", "label": true, "metadata": {"a": "' + b"x" * 5000 + b'"}}', T, 422,
     "metadata: over 4096 bytes", "metadata"),
    ("POST", "/v1/feedback", b'{"request_id": "r", "label": true, "metadata": {"n": -9223372036854775809}}', T, 422,
     "metadata: holds an integer outside the 64-bit range", "metadata"),
    ("POST", "/v1/feedback", b'{"request_id": "r", "label": true, "extra": 1}', T, 422, "extra: unknown key",
     "extra"),
    ("POST", "/v1/feedback", b'{"request_id": "r", "label": true}', {**TEAM, "content-type": "text/plain"}, 415,
     "application/json", "content-type"),
    ("POST", "/v1/feedback", b'{"request_id": "r", "label": true}' + b" " * MEGABYTE, T, 413, "exceeds the limit",
     None),
    ("POST", "/admin/adapters", b"{bad", A, 400, "not valid JSON", None),
    ("POST", "/admin/adapters", b"[]", A, 400, "not an array", None),
    ("POST", "/admin/adapters", b'{"name": "z"}', A, 422, "backends: required key is missing", "backends"),
    ("POST", "/admin/adapters", b'{"name": "z", "gguf": 5, "backends": ["one"]}', A, 422, "gguf:", "gguf"),
    ("POST", "/admin/adapters", b'{"name": "z", "gguf": "a.gguf", "backends": ["one"], "backends": ["two"]}', A, 400,
     "'backends' twice", None),
    ("POST", "/admin/adapters", b'{"name": "z/y", "gguf": "a.gguf", "backends": ["one"]}', A, 422, "name:", "name"),
    ("POST", "/admin/adapters/v1/swap", b"[]", A, 400, "not an array", None),
    ("POST", "/admin/adapters/v1/swap", b'{"gguf": "a.gguf", "rank": 4}', A, 422, "rank: unknown key", "rank"),
    ("POST", "/admin/adapters/v1/swap", b'{"gguf": "a.gguf"}', {**ADMIN, "content-type": "text/plain"}, 415,
     "application/json", "content-type"),
]


@pytest.mark.parametrize("method, path, body, headers, status, fragment, param", BAD_BODIES)
async def test_a_bad_body_gets_its_status_names_the_field_and_changes_nothing(config, method, path, body, headers,
                                                                              status, fragment, param):
    async with app(config) as client:
        before = await state_of(client)
        response = await client.request(method, path, content=body, headers=headers)
        assert_error(response, status, fragment, param)
        assert await state_of(client) == before


async def state_of(client) -> tuple:
    """What the admin API shows: the adapters, and the routes that an attack above could have written."""
    adapters = (await client.get("/admin/adapters", headers=ADMIN)).json()["data"]
    routes = [(await client.get(f"/admin/routes/{name}", headers=ADMIN)).text for name in ("legal", "x", "y")]
    return orjson.dumps(adapters, option=orjson.OPT_SORT_KEYS), routes


@pytest.mark.parametrize("headers", [
    JSON,                                                    # no key at all
    {"authorization": "Bearer wrong", **JSON},
    {"authorization": "Basic YWRtaW46YWRtaW4=", **JSON},
    {"authorization": "Bearer", **JSON},
    TEAM,                                                    # a client key, no content type: still 401 first
])
@pytest.mark.parametrize("body", [ROUTE, b"{not json", b"x" * (2 * MEGABYTE)])
async def test_the_admin_key_is_checked_before_the_body(config, headers, body):
    async with app(config) as client:
        response = await client.put("/admin/routes/x", content=body, headers=headers)
        assert_error(response, 401, "admin key")
        assert response.headers["connection"] == "close"   # the body was never read


async def test_feedback_checks_the_key_before_the_body(config):
    async with app(config) as client:
        response = await client.post("/v1/feedback", content=b"{not json", headers=JSON)
        assert_error(response, 401, "API key")


async def test_a_non_ascii_authorization_header_is_a_401(config):
    async with app(config) as client:
        response = await client.put("/admin/routes/x", content=ROUTE,
                                    headers=[("authorization", "Bearer \xe9t\xe9".encode("latin-1")),
                                             ("content-type", b"application/json")])
        assert_error(response, 401, "admin key")


@pytest.mark.parametrize("method, path, allowed", [
    ("POST", "/admin/routes/x", "DELETE, GET, HEAD, PUT"),
    ("PATCH", "/admin/routes/x", "DELETE, GET, HEAD, PUT"),
    ("GET", "/v1/feedback", "POST"),
    ("PUT", "/admin/adapters/v1", "DELETE, GET, HEAD"),
    ("GET", "/admin/experiments/legal/promote", "POST"),
    ("DELETE", "/admin/experiments/legal", "GET, HEAD"),
    ("GET", "/v1/chat/completions", "POST"),
    ("PUT", "/v1/completions", "POST"),
    ("POST", "/v1/models", "GET, HEAD"),
])
async def test_a_wrong_method_is_a_405_with_every_allowed_method(config, method, path, allowed):
    async with app(config) as client:
        response = await client.request(method, path, content=b"{}", headers=A)
        assert_error(response, 405, "Method Not Allowed")
        assert response.headers["allow"] == allowed and response.headers["x-request-id"]


@pytest.mark.parametrize("path", ["/admin/routes/", "/admin/routes/a%2Fb", "/admin/routes/a/b"])
async def test_a_route_name_that_is_not_one_path_segment_is_a_404(config, path):
    async with app(config) as client:
        response = await client.put(path, content=b'{"name": "a/b", "targets": ["one"]}', headers=A)
        assert_error(response, 404, "Not Found")


async def test_json_with_a_charset_and_a_json_suffix_type_is_taken(config):
    async with app(config) as client:
        for content_type in ("application/json; charset=utf-8", "Application/JSON", "application/merge-patch+json"):
            response = await client.put("/admin/routes/x", content=ROUTE,
                                        headers={**ADMIN, "content-type": content_type})
            assert response.status_code == 200, (content_type, response.text)


async def test_a_promote_without_a_body_still_works_without_a_content_type(config):
    async with app(config) as client:
        response = await client.post("/admin/experiments/legal/promote", headers=ADMIN)
        assert_error(response, 409, "")   # no winner yet: the experiment's answer, not a body error


async def test_a_feedback_score_may_be_a_json_integer(config):
    async with app(config) as client:
        request_id = (await chat(client, "alice")).headers["x-request-id"]
        made = await client.post("/v1/feedback", json={"request_id": request_id, "score": 1}, headers=TEAM)
        assert made.status_code == 201 and made.json()["value"] == 1


async def test_a_base_route_that_an_experiment_uses_cannot_be_removed_or_made_an_experiment(config):
    async with app(config) as client:
        assert (await client.put("/admin/routes/base", json={"name": "base", "targets": ["one"]},
                                 headers=ADMIN)).status_code == 200
        uses = {"name": "exp", "experiment": {"variants": {"base": 1, "v1": 1}}}
        assert (await client.put("/admin/routes/exp", json=uses, headers=ADMIN)).status_code == 200
        before = await client.get("/admin/routes/base", headers=ADMIN)
        assert_error(await client.delete("/admin/routes/base", headers=ADMIN), 409, "['exp']", "name")
        nested = {"name": "base", "experiment": {"variants": {"v1": 1}}}
        assert_error(await client.put("/admin/routes/base", json=nested, headers=ADMIN), 409, "['exp']", "name")
        assert (await client.get("/admin/routes/base", headers=ADMIN)).json() == before.json()
        for user in ("u1", "u2", "u3", "u4", "u5", "u6"):   # every pick is served by a base route or an adapter
            assert (await chat(client, user)).status_code == 200
            answer = await client.post("/v1/chat/completions", headers=TEAM, content=orjson.dumps(
                {"model": "exp", "user": user, "messages": [{"role": "user", "content": "hi"}]}))
            assert answer.status_code == 200, answer.text
        # once the experiment lets go of it, the base route may go
        assert (await client.put("/admin/routes/exp", json={"name": "exp", "experiment": {"variants": {"v1": 1}}},
                                 headers=ADMIN)).status_code == 200
        assert (await client.delete("/admin/routes/base", headers=ADMIN)).status_code == 204


async def test_a_swap_that_would_leave_a_backend_on_its_old_file_is_refused(config, tmp_path):
    """v1 is served by a llama.cpp backend from its `gguf`: a swap giving only a new `source` would keep it."""
    source = write_peft(tmp_path / "adapters" / "new-peft")
    async with app(config) as client:
        before = (await client.get("/admin/adapters/v1", headers=ADMIN)).json()
        response = await client.post("/admin/adapters/v1/swap", json={"source": str(source)}, headers=ADMIN)
        assert_error(response, 422, "Backend 'one' (llamacpp) loads the adapter's `gguf`", "gguf")
        assert (await client.get("/admin/adapters/v1", headers=ADMIN)).json() == before


async def test_promoting_a_winner_whose_files_the_control_cannot_take_is_refused(config, tmp_path):
    """The winner has only a PEFT dir (an SGLang backend's); the control is served from a GGUF by llama.cpp."""
    config["backends"] = [*config["backends"], {"name": "kt", "kind": "sglang", "url": "http://127.0.0.1:9"}]
    config["adapters"] = [*config["adapters"], {"name": "v3", "source": str(write_peft(tmp_path / "adapters" / "v3")),
                                                "backends": ["kt"]}]
    config["routes"] = [*config["routes"], {"name": "exp3", "experiment": {"variants": {"v1": 1, "v3": 1}}}]
    async with app(config, kt=FakeDriver("kt")) as client:
        before = [(await client.get(path, headers=ADMIN)).json() for path in ("/admin/adapters/v1", "/admin/routes/exp3")]
        response = await client.post("/admin/experiments/exp3/promote", json={"variant": "v3"}, headers=ADMIN)
        assert_error(response, 409, "The control 'v1' cannot take the winner's files: Backend 'one' (llamacpp)")
        assert [(await client.get(path, headers=ADMIN)).json()
                for path in ("/admin/adapters/v1", "/admin/routes/exp3")] == before


@pytest.mark.parametrize("fault, status, fragment", [
    (StoreUnavailableError("PostgreSQL is unreachable: connection refused"), 503, "database (adapter registry, "
                                                                               "experiments) is unreachable"),
    (RuntimeError("a bug at /srv/secret/path"), 500, "Internal error (request id"),
])
async def test_a_store_fault_behind_the_experiment_api_is_a_clean_5xx(config, fault, status, fragment):
    """Not Starlette's text/plain "Internal Server Error": the table's status, OpenAI-shaped, no exception text."""
    gateway = create_app(GatewayConfig.model_validate(config),
                         drivers={"one": FakeDriver("one"), "two": FakeDriver("two")})

    async def broken(*args, **kwargs):
        raise fault

    async with running(gateway):
        transport = httpx.ASGITransport(app=gateway, raise_app_exceptions=False)   # as a server: answer, then log
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            store = gateway.state.experiments.store
            store.put_route = store.delete_route = store.change_route = store.fact = broken
            for method, path, body in [("PUT", "/admin/routes/x", {"name": "x", "targets": ["one"]}),
                                       ("DELETE", "/admin/routes/legal", None),
                                       ("POST", "/v1/feedback", {"request_id": "r", "score": 1})]:
                response = await client.request(method, path, json=body, headers=ADMIN)
                error = assert_error(response, status, fragment)
                assert "secret" not in error["message"] and "refused" not in error["message"]
                assert response.headers["x-request-id"]
            assert (await client.get("/admin/routes/x", headers=ADMIN)).status_code == 404   # nothing was changed


@pytest.mark.parametrize("method, path", [
    ("GET", "/admin/adapters/{}"), ("DELETE", "/admin/adapters/{}"), ("GET", "/admin/routes/{}"),
    ("DELETE", "/admin/routes/{}"), ("GET", "/admin/experiments/{}"), ("POST", "/admin/experiments/{}/promote"),
])
async def test_a_20000_character_name_is_a_404_that_does_not_echo_it_whole(config, method, path):
    async with app(config) as client:
        response = await client.request(method, path.format("a" * 20000), headers=ADMIN)
        error = assert_error(response, 404, "(20000 characters)")
        assert len(error["message"]) < 200
