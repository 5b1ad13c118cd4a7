"""scrub(): what of a backend's error text reaches clients. Secrets and paths go; ordinary text stays as it was."""
import pytest

from gateway.errors import scrub


@pytest.mark.parametrize("text, secret, kept", [
    # absolute and relative paths
    ("cannot open /srv/models/kimi.gguf: no such file", "/srv/models", "cannot open <path>"),
    ("failed to load models/x.gguf", "models/x.gguf", "failed to load <path>"),
    ("adapter dir ./adapters/a is missing", "./adapters/a", "adapter dir <path> is missing"),
    ("see ../secrets/keys.yaml for details", "../secrets", "see <path> for details"),
    ("home ~/loras/team-a not readable", "~/loras", "home <path> not readable"),
    ("weights adapters/legal-v2/adapter_model.safetensors are truncated", "adapters/legal-v2", "weights <path> are"),
    # Basic and Bearer credentials, bare or as a header
    ("upstream said Authorization: Basic dXNlcjpwYXNz was refused", "dXNlcjpwYXNz", "was refused"),
    ("credentials Basic dXNlcjpwYXNz rejected", "dXNlcjpwYXNz", "rejected"),
    ("header authorization: basic dXNlcjpwYXNz", "dXNlcjpwYXNz", "header"),
    ("Authorization: Bearer abc.def.ghi expired", "abc.def.ghi", "expired"),
    ("Authorization: Token 0123456789abcdef refused", "0123456789abcdef", "refused"),
    ("key sk-live-0123456789 is wrong", "sk-live-0123456789", "is wrong"),
    # key=, api_key=, token= parameters
    ("GET https://api.example.com/v1/models?key=s3cr3t-value&limit=2 failed", "s3cr3t-value", "limit=2 failed"),
    ("bad request: api_key=AbCdEf123456 in query", "AbCdEf123456", "in query"),
    ("refused token=xyz789secret", "xyz789secret", "refused"),
    ("url ...?access_token=qwerty12345#frag", "qwerty12345", "url"),
    ("form apiKey=hunter2hunter2; retry", "hunter2hunter2", "retry"),
    # URLs with userinfo
    ("cannot reach http://admin:hunter2@10.0.0.5:8080/v1", "hunter2", "cannot reach http://"),
    ("proxy https://user@proxy.internal failed", "user@", "failed"),
    ("redis://:p4ssw0rd@cache:6379 down", "p4ssw0rd", "down"),
    # tracebacks
    ("boom\nTraceback (most recent call last):\n  File \"/app/x.py\", line 1", "Traceback", "boom"),
])
def test_secrets_and_paths_are_removed(text, secret, kept):
    scrubbed = scrub(text)
    assert secret not in scrubbed, scrubbed
    assert kept in scrubbed, scrubbed


@pytest.mark.parametrize("text", [
    "The model 'kimi-k2.5' does not exist.",
    "temperature must be in [0.0, 2.0]; got 1.0/0.95 as a ratio",
    "top_p 0.95 and min_p 0.01 are fixed for kimi-k2.6",
    "Use moonshotai/Kimi-K2.5 or Qwen/Qwen2.5-7B-Instruct as the base model.",
    "Basic usage: set max_tokens to 16 and/or stream to true.",
    "Basic authentication is not supported here.",
    "the key is missing from the request",
    "expected content-type application/json or text/event-stream",
    "tokens=32 and max_tokens=64 exceed the context of 4096",
    "monkey=3 is not a field",
    "see https://platform.moonshot.ai/docs/api/chat for the field list",
    "e.g. 3/4 of the context; ratio 16/9",
    "Rate limit reached: retry after 1.5 s.",
    "Invalid value for 'response_format.json_schema': expected an object.",
    "Bearer",
])
def test_ordinary_text_is_left_alone(text):
    assert scrub(text) == text


def test_empty_result_has_a_fallback_and_long_text_is_cut():
    assert scrub("Traceback (most recent call last): x") == "The backend refused the request."
    assert len(scrub("word " * 400)) == 500


@pytest.mark.parametrize("hostile", ["a-" * 32000 + "/x", "/" + "a." * 32000, "a/" + "b" * 64000 + ".", "a/" * 32000])
def test_hostile_text_is_scrubbed_quickly(hostile):
    """Backends echo client input in their errors: the scrubber's cost must not grow with it."""
    import time
    started = time.process_time()
    scrub(hostile)
    assert time.process_time() - started < 0.1


def test_a_failed_conversion_is_a_422_with_the_tools_error_and_no_traceback_frames():
    """The admin sees what the converter said went wrong, not its stack (gateway/errors.py's table)."""
    from adapters.conversion import ConversionError
    from gateway.errors import to_gateway_error

    message = ("legal@1234abcd: convert_kt_to_sglang_adapter.py failed (exit 1) after 0.3 s; its last lines:\n"
               "Loading checkpoint\nTraceback (most recent call last):\n"
               '  File "/opt/kt/convert.py", line 10, in <module>\n    main()\n    ^^^^^^\n'
               '  File "/opt/kt/convert.py", line 5, in main\n    raise ValueError("Inconsistent LoRA ranks")\n'
               "ValueError: Inconsistent LoRA ranks")
    error = to_gateway_error(ConversionError(message))
    assert error.status_code == 422 and error.error_type == "invalid_request_error"
    assert error.message == ("legal@1234abcd: convert_kt_to_sglang_adapter.py failed (exit 1) after 0.3 s; its last "
                             "lines:\nLoading checkpoint\nValueError: Inconsistent LoRA ranks")
