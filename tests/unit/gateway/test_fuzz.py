"""Property and fuzz tests in process: every response to anything is a success or an OpenAI-shaped error.

schemathesis drives the gateway's own OpenAPI schema (data plane included); hypothesis throws malformed
and adversarial bodies at the data plane. Backends are scripted fakes; the live fuzz run against a real
llama-server is in tests/integration/test_fuzz_live.py.
"""
from __future__ import annotations

import json
import tempfile

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.emulators.fake_driver import FakeDriver

CONFIG = {
    "backends": [{"name": "one", "kind": "llamacpp", "url": "http://127.0.0.1:9"}],
    "routes": [{"name": "kimi", "targets": ["one"]}],
    "limits": {"max_tokens": 64, "max_messages": 32, "max_body_bytes": 65536},
    "exposure": {"openapi": "public"},  # schemathesis reads the schema without a key
}


def make_app():
    state_dir = tempfile.mkdtemp(prefix="kimi-fuzz-state-")
    return create_app(GatewayConfig.model_validate({**CONFIG, "state_dir": state_dir}),
                      drivers={"one": FakeDriver("one")})


APP = make_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.exclude(path="/readyz").parametrize()  # its 503 (not ready / draining) is the contract
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_schema_never_a_server_error(case):
    case.call_and_validate(checks=[not_a_server_error])


def assert_openai_shaped(response: httpx.Response) -> None:
    assert response.status_code in (200, 400, 401, 403, 404, 413, 422, 429), response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
        assert response.headers["x-request-id"]


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False,
                    allow_infinity=False) | st.text(), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
UNICODE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["\u202e\u0000\ufeff", "🦙" * 50, "\u200b" * 10, "A\u0301\u0308", "\U0010ffff"])
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "audio", 7, None])},
                             optional={"text": JSON | UNICODE, "image_url": JSON})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "nobody", 3])},
                                optional={"content": UNICODE | st.lists(PART, max_size=3) | JSON})
FIELD_VALUES = {"model": st.sampled_from(["kimi", "ada", "nope", ""]) | JSON, "messages": st.lists(MESSAGE, max_size=4) | JSON,
                "stream": st.booleans() | JSON, "max_tokens": st.integers(-5, 10**9) | JSON,
                "temperature": st.floats(-1e308, 1e308) | JSON, "thinking": JSON,
                "chat_template_kwargs": JSON, "stop": JSON, "user": UNICODE}
REQUEST = st.fixed_dictionaries({}, optional=FIELD_VALUES) | st.dictionaries(UNICODE, JSON, max_size=5) | JSON


def body_bytes() -> st.SearchStrategy[bytes]:
    # The stdlib encoder: it writes integers beyond 64 bits too, which a client may send.
    encoded = REQUEST.map(lambda doc: json.dumps(doc, ensure_ascii=False).encode())
    truncated = st.tuples(encoded, st.integers(0, 200)).map(lambda pair: pair[0][: pair[1]])
    return encoded | truncated | st.binary(max_size=64)


@given(body=body_bytes(), path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
async def test_adversarial_bodies_get_success_or_openai_error(body, path):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=APP), base_url="http://gateway") as client:
        response = await client.post(path, content=body)
    assert_openai_shaped(response)


@pytest.mark.parametrize("body", [b"", b"null", b"[]", b'"x"', b"{}", b'{"model": null}', b"\xff\xfe",
                                  b'{"model":"kimi","messages":[{"role":"user","content":"\\ud800"}]}'])
async def test_edge_bodies(body):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=APP), base_url="http://gateway") as client:
        response = await client.post("/v1/chat/completions", content=body)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
