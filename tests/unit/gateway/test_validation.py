"""check_request: OpenAI's parameter ranges, with OpenAI's own 400 texts and codes, and what passes."""
import pytest

from backends.protocol import CHAT_PATH, COMPLETIONS_PATH
from gateway.errors import InvalidRequestError
from gateway.validation import check_request

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


def refusal(path: str, **fields) -> InvalidRequestError:
    base = CHAT if path == CHAT_PATH else COMPLETION
    with pytest.raises(InvalidRequestError) as failure:
        check_request({**base, **fields}, path, None)
    return failure.value


@pytest.mark.parametrize("path, fields, message, param, code", [
    (CHAT_PATH, {"temperature": 3}, "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, "
     "but got 3 instead.", "temperature", "decimal_above_max_value"),
    (CHAT_PATH, {"temperature": -0.5}, "Invalid 'temperature': decimal below minimum value. Expected a value >= 0, "
     "but got -0.5 instead.", "temperature", "decimal_below_min_value"),
    (COMPLETIONS_PATH, {"top_p": 1.5}, "Invalid 'top_p': decimal above maximum value. Expected a value <= 1, "
     "but got 1.5 instead.", "top_p", "decimal_above_max_value"),
    (CHAT_PATH, {"n": 0}, "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead.",
     "n", "integer_below_min_value"),
    (CHAT_PATH, {"n": 129}, "Invalid 'n': integer above maximum value. Expected a value <= 128, but got 129 instead.",
     "n", "integer_above_max_value"),
    (CHAT_PATH, {"presence_penalty": 2.5}, "Invalid 'presence_penalty': decimal above maximum value. Expected a "
     "value <= 2, but got 2.5 instead.", "presence_penalty", "decimal_above_max_value"),
    (COMPLETIONS_PATH, {"frequency_penalty": -3}, "Invalid 'frequency_penalty': decimal below minimum value. "
     "Expected a value >= -2, but got -3 instead.", "frequency_penalty", "decimal_below_min_value"),
    (CHAT_PATH, {"top_logprobs": 21}, "Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, "
     "but got 21 instead.", "top_logprobs", "integer_above_max_value"),
    (COMPLETIONS_PATH, {"logprobs": 6}, "Invalid 'logprobs': integer above maximum value. Expected a value <= 5, "
     "but got 6 instead.", "logprobs", "integer_above_max_value"),
    (COMPLETIONS_PATH, {"best_of": 21}, "Invalid 'best_of': integer above maximum value. Expected a value <= 20, "
     "but got 21 instead.", "best_of", "integer_above_max_value"),
    (COMPLETIONS_PATH, {"n": 3, "best_of": 2}, "best_of must be greater than or equal to n.", "best_of", None),
    (CHAT_PATH, {"logit_bias": {"50256": 101}}, "Invalid 'logit_bias.50256': integer above maximum value. Expected "
     "a value <= 100, but got 101 instead.", "logit_bias", "integer_above_max_value"),
    (CHAT_PATH, {"logit_bias": {"7": -100.5}}, "Invalid 'logit_bias.7': decimal below minimum value. Expected "
     "a value >= -100, but got -100.5 instead.", "logit_bias", "decimal_below_min_value"),
    (CHAT_PATH, {"logit_bias": {"AI": 10}}, "Invalid key in 'logit_bias': AI. You should only be submitting "
     "non-negative integers.", "logit_bias", None),
    (CHAT_PATH, {"logit_bias": {str(i): 1 for i in range(1025)}}, "Invalid 'logit_bias': too many properties. "
     "Expected an object with at most 1024 properties, but got an object with 1025 properties instead.",
     "logit_bias", "object_above_max_properties"),
    (CHAT_PATH, {"n": 1.5}, "Invalid type for 'n': expected an integer, but got a decimal number instead.", "n",
     "invalid_type"),
    (CHAT_PATH, {"temperature": "hot"}, "Invalid type for 'temperature': expected a decimal, but got a string "
     "instead.", "temperature", "invalid_type"),
    (CHAT_PATH, {"logprobs": 1}, "Invalid type for 'logprobs': expected a boolean, but got an integer instead.",
     "logprobs", "invalid_type"),
    (CHAT_PATH, {"max_tokens": 0}, "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, "
     "but got 0 instead.", "max_tokens", "integer_below_min_value"),
])
def test_out_of_range_is_refused_as_openai_refuses_it(path, fields, message, param, code):
    error = refusal(path, **fields)
    assert (error.message, error.param, error.code, error.status_code) == (message, param, code, 400)


@pytest.mark.parametrize("path, fields", [
    (CHAT_PATH, {"temperature": 2, "top_p": 0, "n": 128, "presence_penalty": -2, "frequency_penalty": 2,
                 "top_logprobs": 20, "logprobs": True, "logit_bias": {"0": -100, "50256": 100}}),
    (CHAT_PATH, {"temperature": None, "n": None, "logprobs": None, "top_logprobs": None, "logit_bias": None}),
    (COMPLETIONS_PATH, {"n": 2, "best_of": 2, "logprobs": 5, "temperature": 0.0}),
    (COMPLETIONS_PATH, {"best_of": 1}),
])
def test_openai_edge_values_pass(path, fields):
    base = CHAT if path == CHAT_PATH else COMPLETION
    check_request({**base, **fields}, path, None)
