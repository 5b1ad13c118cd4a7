"""The drivers' pure translation functions, tested with dicts and bytes."""
import orjson
import pytest

from backends.base import BackendRequest
from backends.errors import (
    BackendAccountError,
    BackendProtocolError,
    BackendRateLimitedError,
    BackendRejectedError,
    BackendUnavailableError,
)
from backends.config import RetryConfig
from gateway.policies.retry import is_retryable
from backends.hosted import error_from_moonshot, to_moonshot_body
from backends.llamacpp import error_from_llamacpp, lora_scales, to_llamacpp_body
from backends.sglang import error_from_sglang, to_sglang_body

CHAT = "/v1/chat/completions"


def request(body=None, **fields) -> BackendRequest:
    values = dict(path=CHAT, body=body or {"model": "m", "messages": []}, model="m", route="m", adapter=None,
                  thinking=True, sampling={"temperature": 1.0, "top_p": 0.95, "min_p": 0.01})
    values.update(fields)
    return BackendRequest(**values)


def test_llamacpp_base_is_all_zero_scales_never_empty():
    body = to_llamacpp_body(request(), [0, 1], None)
    assert body["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]
    assert body["temperature"] == 1.0 and body["min_p"] == 0.01
    assert body["chat_template_kwargs"] == {"thinking": True}


def test_llamacpp_adapter_and_renamed_penalty():
    body = to_llamacpp_body(request({"repetition_penalty": 1.1}, thinking=False), [0, 1], 1)
    assert body["lora"] == lora_scales([0, 1], 1) == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]
    assert body["repeat_penalty"] == 1.1 and "repetition_penalty" not in body
    assert body["chat_template_kwargs"] == {"thinking": False}


def test_sglang_selects_adapter_in_model_and_thinking_in_kwargs():
    body = to_sglang_body(request({"model": "legal", "lora_path": "x"}, adapter="legal", thinking=False), "kimi")
    assert body["model"] == "kimi:legal" and "lora_path" not in body
    assert body["chat_template_kwargs"] == {"thinking": False}
    assert to_sglang_body(request(), "kimi")["model"] == "kimi"


def test_moonshot_strips_fixed_sampling_and_sets_thinking():
    body = to_moonshot_body(request({"model": "kimi-k2.5", "temperature": 0.3, "top_p": 0.5, "n": 1,
                                     "chat_template_kwargs": {}}, thinking=False), "kimi-k2.6")
    assert body == {"model": "kimi-k2.6", "thinking": {"type": "disabled"}}


def test_sglang_flat_error_becomes_rejected_with_its_message():
    raw = orjson.dumps({"object": "error", "message": "bad thing", "type": "BadRequest", "param": None, "code": 400})
    error = error_from_sglang(400, {}, raw, "kt")
    assert isinstance(error, BackendRejectedError) and error.status == 400 and error.message == "bad thing"


def test_sglang_500_hides_the_python_exception():
    raw = orjson.dumps({"object": "error", "message": "Internal server error: KeyError /srv/x.py", "code": 500})
    error = error_from_sglang(500, {}, raw, "kt")
    assert error.status == 502 and "/srv" not in error.message


def hosted(error_type: str, message: str = "m") -> dict:
    return {"error": {"type": error_type, "message": message}}


RPM = "Your account o<k> request reached organization max RPM: 3, please try again after 7 seconds"
TPM = "Your account o<k> request reached organization TPM rate limit, current:9, limit:5"
TPD = "Your account o<k> request reached organization TPD rate limit, current:9, limit:5"


@pytest.mark.parametrize("status, body, headers, kind, retry_after, retried", [
    (429, hosted("engine_overloaded_error"), {"retry-after": "2"}, BackendRateLimitedError, 2.0, True),
    (429, hosted("engine_overloaded_error"), {}, BackendRateLimitedError, None, True),  # backoff
    (429, hosted("rate_limit_reached_error", RPM), {}, BackendRateLimitedError, 7.0, False),  # 7 s > max 5 s
    (429, hosted("rate_limit_reached_error", TPM), {}, BackendRateLimitedError, None, True),
    (429, hosted("rate_limit_reached_error", TPD), {}, BackendAccountError, None, False),
    (429, hosted("exceeded_current_quota_error", "suspended"), {}, BackendAccountError, None, False),
    (429, hosted("some_new_error"), {}, BackendAccountError, None, False),  # never on 429 alone
    (429, b"<html>Too Many Requests</html>", {}, BackendAccountError, None, False),
    (401, hosted("invalid_authentication_error"), {}, BackendAccountError, None, False),
    (401, hosted("incorrect_api_key_error"), {}, BackendAccountError, None, False),
    (403, hosted("permission_denied_error"), {}, BackendAccountError, None, False),
    (404, hosted("resource_not_found_error", "Not found the model kimi-k2.5"), {}, BackendAccountError, None, False),
    (400, hosted("invalid_request_error", "bad"), {}, BackendRejectedError, None, False),
    (400, hosted("content_filter", "high risk"), {}, BackendRejectedError, None, False),
    (400, b"<html><h1>400 Bad Request</h1></html>", {}, BackendProtocolError, None, True),
    (500, hosted("server_error"), {}, BackendUnavailableError, None, True),
    (503, hosted("server_unavailable"), {}, BackendUnavailableError, None, True),
    (504, b"<html><h1>504 Gateway Time-out</h1></html>", {}, BackendUnavailableError, None, True),
])
def test_moonshot_errors(status, body, headers, kind, retry_after, retried):
    """Retry what the reference allows (moonshot-api.md §4, §6.4), by error.type, never by status alone."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    error = error_from_moonshot(status, headers, raw, "hosted")
    assert type(error) is kind
    if kind is BackendRateLimitedError:
        assert error.retry_after_s == retry_after
    assert is_retryable(error, RetryConfig(attempts=2, max_retry_after_s=5)) is retried


@pytest.mark.parametrize("convert", [error_from_sglang, error_from_llamacpp])
def test_self_hosted_proxy_pages_and_refused_keys(convert):
    page = b"<html><body><h1>413 Request Entity Too Large</h1></body></html>"
    assert isinstance(convert(413, {}, page, "b"), BackendProtocolError)  # not the client's 413
    assert isinstance(convert(401, {}, b'{"error":"Unauthorized"}', "b"), BackendAccountError)


def test_llamacpp_errors():
    raw = orjson.dumps({"error": {"code": 400, "message": "request exceeds the available context size",
                                  "type": "exceed_context_size_error"}})
    error = error_from_llamacpp(400, {}, raw, "gguf")
    assert isinstance(error, BackendRejectedError) and "context size" in error.message
    assert isinstance(error_from_llamacpp(503, {}, b'{"error":{"message":"Loading model"}}', "gguf"),
                      BackendUnavailableError)
