"""check_request(): the checks routing and policy need, on the parsed dict, before anything is forwarded.

Deliberately not a pydantic model: the request stays a dict on the hot path (STYLE.md convention 6). The
parameter ranges are OpenAI's (its OpenAPI spec's minimum/maximum), refused with OpenAI's own 400 texts
and codes: `Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 instead.`
(`decimal_above_max_value`), `Invalid type for 'n': expected an integer, but got a string instead.`
(`invalid_type`). A null value means "not set", as on OpenAI.
"""
from __future__ import annotations

from backends.protocol import CHAT_PATH
from gateway.config import LimitsConfig
from gateway.errors import InvalidRequestError
from gateway.policies.content import MessageLimits, check_limits
from gateway.policies.tools import AGENT_FIELDS, check_agent_fields

DECIMAL, INTEGER, BOOLEAN, LOGIT_BIAS = "decimal", "integer", "boolean", "logit_bias"
# field -> (kind, minimum, maximum): OpenAI's ranges; None = unbounded. Looked up per field the request has.
COMMON_CHECKS = {
    "temperature": (DECIMAL, 0, 2), "top_p": (DECIMAL, 0, 1),
    "presence_penalty": (DECIMAL, -2, 2), "frequency_penalty": (DECIMAL, -2, 2),
    "n": (INTEGER, 1, 128), "max_tokens": (INTEGER, 1, None), "logit_bias": (LOGIT_BIAS, None, None),
    "min_p": (DECIMAL, None, None), "repetition_penalty": (DECIMAL, None, None), "top_k": (INTEGER, 0, None),
}
CHECKS = {
    CHAT_PATH: {**COMMON_CHECKS, "max_completion_tokens": (INTEGER, 1, None), "top_logprobs": (INTEGER, 0, 20),
                "logprobs": (BOOLEAN, None, None)},
    "completions": {**COMMON_CHECKS, "best_of": (INTEGER, 0, 20), "logprobs": (INTEGER, 0, 5)},
}
CHAT_CHECKS, COMPLETION_CHECKS = CHECKS[CHAT_PATH], CHECKS["completions"]
LOGIT_BIAS_MAX_ENTRIES = 1024
LOGIT_BIAS_LIMIT = 100
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def json_type(value: object) -> str:
    """OpenAI's words for a JSON value's type in its "got X instead" messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _type_error(field: str, expected: str, value: object = None) -> InvalidRequestError:
    got = "" if value is None else f", but got {json_type(value)} instead"
    return InvalidRequestError(f"Invalid type for '{field}': expected {expected}{got}.", param=field, code="invalid_type")


def _range_error(field: str, kind: str, value, bound, above: bool) -> InvalidRequestError:
    side, sign, code = ("above maximum", "<=", "above_max") if above else ("below minimum", ">=", "below_min")
    return InvalidRequestError(f"Invalid '{field}': {kind} {side} value. Expected a value {sign} {bound}, "
                               f"but got {value} instead.", param=field.split(".")[0], code=f"{kind}_{code}_value")


def check_field(field: str, value, kind: str, low, high) -> None:
    if kind == BOOLEAN:
        if not isinstance(value, bool):
            raise _type_error(field, "a boolean", value)
    elif kind == LOGIT_BIAS:
        _check_logit_bias(value)
    else:
        check_range(field, value, kind, low, high)


def check_range(field: str, value, kind: str, low, high) -> None:
    if isinstance(value, bool) or not isinstance(value, int if kind == INTEGER else (int, float)):
        raise _type_error(field, "an integer" if kind == INTEGER else "a decimal", value)
    if low is not None and value < low:
        raise _range_error(field, kind, value, low, above=False)
    if high is not None and value > high:
        raise _range_error(field, kind, value, high, above=True)


def check_request(doc: object, path: str, allowed: frozenset[str] | None,
                  limits: LimitsConfig | MessageLimits | None = None) -> bool:
    """Raise InvalidRequestError for a body no backend should see; return whether it carries images.
    `allowed` is the set of top-level fields accepted (None: forward unknown fields). With `limits`, also
    check_limits() and then check_agent_fields() (only when the body has one of their fields): one walk
    over the body for everything the data plane checks before routing, each refusal the same as alone."""
    if not isinstance(doc, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    if allowed is not None and not allowed.issuperset(doc):
        name = sorted(doc.keys() - allowed)[0]
        raise InvalidRequestError(f"Unrecognized request argument supplied: {name}", param=name)
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("you must provide a model parameter", param="model")
    stream = doc.get("stream", False)
    if stream is not False and stream is not True:
        raise _type_error("stream", "a boolean", stream)
    chat = path == CHAT_PATH
    checks = CHAT_CHECKS if chat else COMPLETION_CHECKS
    for field, value in doc.items():  # a request has a few fields: cheaper than a lookup per check
        spec = checks.get(field)
        if spec is None or value is None:
            continue
        kind = spec[0]
        # the common case inline: a number of the right type within range (anything else: check_field)
        if type(value) is int and (kind is INTEGER or kind is DECIMAL) or type(value) is float and kind is DECIMAL:
            low, high = spec[1], spec[2]
            if (low is None or value >= low) and (high is None or value <= high):
                continue
        check_field(field, value, *spec)
    if chat:
        has_images = _check_messages(doc.get("messages"))
    else:
        best_of = doc.get("best_of")
        if best_of is not None and best_of < (doc.get("n") or 1):
            raise InvalidRequestError("best_of must be greater than or equal to n.", param="best_of")
        prompt = doc.get("prompt")
        if not isinstance(prompt, (str, list)) or not prompt:
            raise InvalidRequestError("'prompt' must be a non-empty string or list.", param="prompt")
        has_images = False
    if limits is not None:
        check_limits(doc, limits)
        if not AGENT_FIELDS.isdisjoint(doc):
            check_agent_fields(doc)
    return has_images


def _check_logit_bias(bias: object) -> None:
    """Token ids (non-negative integers, as strings) to biases in [-100, 100], at most 1024 of them."""
    if not isinstance(bias, dict):
        raise _type_error("logit_bias", "an object", bias)
    if len(bias) > LOGIT_BIAS_MAX_ENTRIES:
        raise InvalidRequestError(f"Invalid 'logit_bias': too many properties. Expected an object with at most "
                                  f"{LOGIT_BIAS_MAX_ENTRIES} properties, but got an object with {len(bias)} "
                                  "properties instead.", param="logit_bias", code="object_above_max_properties")
    for token, value in bias.items():
        if not token.isdigit() or not token.isascii():
            raise InvalidRequestError(f"Invalid key in 'logit_bias': {token}. You should only be submitting "
                                      "non-negative integers.", param="logit_bias")
        kind = INTEGER if isinstance(value, int) and not isinstance(value, bool) else DECIMAL
        check_range(f"logit_bias.{token}", value, kind, -LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT)


def _check_messages(messages: object) -> bool:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty array.", param="messages")
    has_images = False
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in ROLES:  # a list or dict role is unhashable: check the type first
            raise InvalidRequestError(f"Invalid message at messages[{index}]: expected an object with a valid 'role'.",
                                      param=f"messages[{index}]")
        content = message.get("content")
        if isinstance(content, list):
            has_images |= _check_parts(content, index)
        elif content is not None and not isinstance(content, str):
            raise _type_error(f"messages[{index}].content", "a string or an array of content parts")
    return has_images


def _check_parts(parts: list, index: int) -> bool:
    has_images = False
    for position, part in enumerate(parts):
        where = f"messages[{index}].content[{position}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _type_error(f"{where}.text", "a string")
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str) or not url:
                raise InvalidRequestError(f"{where}.image_url.url must be a non-empty string.", param=f"{where}.image_url")
            has_images = True
        else:
            raise InvalidRequestError(f"Invalid content part at {where}: unsupported type {kind!r}.", param=where)
    return has_images
