"""The drivers' pure translation functions, tested with dicts and bytes."""
import orjson
import pytest

from backends.base import BackendRequest
from backends.errors import BackendRateLimitedError, BackendRejectedError, BackendUnavailableError
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


@pytest.mark.parametrize("status, body, headers, kind, retry_after", [
    (429, {"error": {"type": "engine_overloaded_error", "message": "overloaded"}}, {"retry-after": "2"},
     BackendRateLimitedError, 2.0),
    (429, {"error": {"type": "rate_limit_reached_error", "message": "max RPM: 3, please try again after 7 seconds"}},
     {}, BackendRateLimitedError, 7.0),
    (429, {"error": {"type": "exceeded_current_quota_error", "message": "suspended"}}, {}, BackendUnavailableError, None),
    (404, {"error": {"type": "resource_not_found_error", "message": "Not found the model kimi-k2.5"}}, {},
     BackendUnavailableError, None),
    (400, {"error": {"type": "invalid_request_error", "message": "bad"}}, {}, BackendRejectedError, None),
])
def test_moonshot_errors(status, body, headers, kind, retry_after):
    error = error_from_moonshot(status, headers, orjson.dumps(body), "hosted")
    assert type(error) is kind
    if retry_after is not None:
        assert error.retry_after_s == retry_after


def test_llamacpp_errors():
    raw = orjson.dumps({"error": {"code": 400, "message": "request exceeds the available context size",
                                  "type": "exceed_context_size_error"}})
    error = error_from_llamacpp(400, {}, raw, "gguf")
    assert isinstance(error, BackendRejectedError) and "context size" in error.message
    assert isinstance(error_from_llamacpp(503, {}, b'{"error":{"message":"Loading model"}}', "gguf"),
                      BackendUnavailableError)
