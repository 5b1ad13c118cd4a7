"""check_request(): the checks routing and policy need, on the parsed dict, before anything is forwarded.

Deliberately not a pydantic model: the request stays a dict on the hot path (STYLE.md convention 6).
"""
from __future__ import annotations

from backends.protocol import CHAT_PATH
from gateway.errors import InvalidRequestError

NUMERIC_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
POSITIVE_INT_FIELDS = ("max_tokens", "max_completion_tokens", "n", "top_k")
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _type_error(field: str, expected: str) -> InvalidRequestError:
    return InvalidRequestError(f"Invalid type for '{field}': expected {expected}.", param=field)


def check_request(doc: object, path: str, allowed: frozenset[str] | None) -> bool:
    """Raise InvalidRequestError for a body no backend should see; return whether it carries images.
    `allowed` is the set of top-level fields accepted (None: forward unknown fields)."""
    if not isinstance(doc, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    unknown = doc.keys() - allowed if allowed is not None else ()
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidRequestError(f"Unrecognized request argument supplied: {name}", param=name)
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("you must provide a model parameter", param="model")
    if not isinstance(doc.get("stream", False), bool):
        raise _type_error("stream", "a boolean")
    for field in NUMERIC_FIELDS:
        value = doc.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise _type_error(field, "a number")
    for field in POSITIVE_INT_FIELDS:
        value = doc.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (0 if field == "top_k" else 1)):
            raise _type_error(field, "a positive integer")
    if path == CHAT_PATH:
        return _check_messages(doc.get("messages"))
    prompt = doc.get("prompt")
    if not isinstance(prompt, (str, list)) or not prompt:
        raise InvalidRequestError("'prompt' must be a non-empty string or list.", param="prompt")
    return False


def _check_messages(messages: object) -> bool:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty array.", param="messages")
    has_images = False
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
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
