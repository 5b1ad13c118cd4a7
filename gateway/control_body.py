"""The control plane's request bodies, checked before FastAPI parses them (admin API, `/v1/feedback`).

A body that a handler will parse must be: declared JSON (`content-type: application/json` or `*+json`,
else 415), at most MAX_CONTROL_BODY bytes (else 413, read no further), and strict JSON: parseable, an object
at the top, no key twice in one object, no NaN/Infinity (else 400, saying where). FastAPI alone would take
the last of two duplicate keys, read NaN as a number and buffer any size. Only requests that FastAPI routes
to a handler are checked, so an unknown path stays a 404 and a wrong method a 405; and the caller's key is
checked first (`authorize`), so a client without one gets its 401 and nothing of its body is read.

Then each admin handler's body is read as its model in pydantic's strict JSON mode (`strict_body`): a number
is a JSON number and a boolean a JSON boolean (`"timeout_s": "30"`, `"enabled": "no"` and `"weight": 50.0` for
an integer are 422s naming the key path). The YAML config stays lax (gateway/config.py says why).
"""
from __future__ import annotations

import json
from typing import Callable

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.routing import Match

from gateway.dataplane import CLOSE, ClientGone, read_body, send_error
from gateway.errors import GatewayError, InvalidRequestError, UnsupportedMediaTypeError

MAX_CONTROL_BODY = 1024 * 1024
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
CURL_DEFAULTS = (b"", b"application/x-www-form-urlencoded")   # what `curl -d` sends without -H


class DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKeyError(key)
        seen[key] = value
    return seen


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def check_json_object(body: bytes) -> None:
    """400 unless `body` is one strict JSON object (see the module doc)."""
    try:
        doc = json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except DuplicateKeyError as exc:
        raise InvalidRequestError(f"The body has the key '{str(exc)[:64]}' twice in one object; give each key "
                                  "once.") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"The body is not valid JSON: {exc.msg} (line {exc.lineno}, column "
                                  f"{exc.colno}).") from None
    except UnicodeDecodeError:
        raise InvalidRequestError("The body is not valid JSON: it is not UTF-8 text.") from None
    except RecursionError:
        raise InvalidRequestError("The body is not valid JSON for this API: it is nested too deeply.") from None
    except ValueError as exc:   # NaN/Infinity, an integer of thousands of digits
        raise InvalidRequestError(f"The body is not valid JSON: {str(exc)[:100]}.") from None
    if not isinstance(doc, dict):
        raise InvalidRequestError(f"The body must be a JSON object, not {json_kind(doc)}.")


def json_kind(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def check_content_type(headers: list[tuple[bytes, bytes]]) -> None:
    value = next((v for k, v in headers if k == b"content-type"), None)
    media = (value or b"").split(b";", 1)[0].strip().lower()
    if media != b"application/json" and not (media.startswith(b"application/") and media.endswith(b"+json")):
        shown = media.decode("latin-1")[:64] if media else "none"
        hint = "; with curl -d, add -H 'content-type: application/json'" if media in CURL_DEFAULTS else ""
        raise UnsupportedMediaTypeError(f"The body must be JSON with Content-Type: application/json (got {shown}"
                                        f"{hint}).", param="content-type")


class ControlBodyCheck:
    """ASGI wrapper around the control plane's FastAPI app: checks a routed request's body, then replays it."""

    def __init__(self, app, authorize: Callable[[dict], None]) -> None:
        self.app = app
        self.authorize = authorize   # raises the GatewayError (401, 403) of a caller the handler would refuse

    def _routed(self, scope) -> bool:
        return any(route.matches(scope)[0] is Match.FULL for route in self.app.router.routes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS or not self._routed(scope):
            return await self.app(scope, receive, send)
        body = None
        try:
            self.authorize(scope)
            body = await read_body(receive, MAX_CONTROL_BODY)
            if body:      # an empty body is the handler's to judge (a promote needs none)
                check_content_type(scope["headers"])
                check_json_object(body)
        except ClientGone:
            return
        except GatewayError as exc:   # a 401 or a 413 leaves the body unread: the connection cannot be reused
            await send_error(send, exc, [] if body is not None else [CLOSE])
            return
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()   # after the body: the client's disconnect, when it comes

        await self.app(scope, replay, send)


def strict_body(model: type[BaseModel]):
    """A handler's dependency: 422 unless its JSON body is `model` read strictly (no "30" for 30, no 1 for true),
    through the app's one RequestValidationError handler (the key path in `message` and `param`). It runs before
    FastAPI's own (lax) reading of the body, which then gives the same values. An empty body is FastAPI's to
    judge (required, or a promote's optional body)."""
    async def check(request: Request) -> None:
        body = await request.body()
        if not body:
            return
        try:
            model.model_validate_json(body, strict=True)
        except ValidationError as exc:
            raise RequestValidationError([{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]) \
                from None
    return Depends(check)
