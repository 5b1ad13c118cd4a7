"""The GatewayError tree, the HTTP status of each, and the one OpenAI-shaped error body.

Only GatewayError text reaches clients; anything else becomes a generic 500 with the request id.
"""
from __future__ import annotations

import base64
import math
import re
from typing import Callable

import orjson

from adapters.conversion import ConversionError
from adapters.errors import (
    AdapterExistsError,
    AdapterInUseError,
    AdapterNotFoundError,
    AdapterPlacementError,
    AdapterValidationError,
    RestartNeededError,
)
from adapters.lease import LeaseBusyError
from adapters.store import StoreUnavailableError
from backends.errors import (
    AdapterNotReadyError,
    BackendError,
    BackendProtocolError,
    BackendRateLimitedError,
    BackendRejectedError,
    BackendTimeoutError,
    ModelRetiredError,
    UnsupportedFeatureError,
)



class GatewayError(Exception):
    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.error_type, self.param, self.code)


class InvalidRequestError(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(GatewayError):
    status_code = 401
    error_type = "invalid_request_error"

    def __init__(self, message: str = "Incorrect API key provided.") -> None:
        super().__init__(message, code="invalid_api_key")


class PermissionDeniedError(GatewayError):
    status_code = 403
    error_type = "permission_denied_error"


class ModelNotFoundError(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist or you do not have access to it.",
                         param="model", code="model_not_found")


class ModelRetiredGatewayError(GatewayError):
    """A hosted model id past its retirement with no successor mapped (backends/hosted_models.py)."""
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model", code="model_retired")


class NotFoundError(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"


class MethodNotAllowedError(GatewayError):
    status_code = 405
    error_type = "invalid_request_error"

    def __init__(self, allowed: str) -> None:
        super().__init__(f"Method Not Allowed: this path takes {allowed}.", headers={"allow": allowed})


class ConflictError(GatewayError):
    status_code = 409
    error_type = "invalid_request_error"


class UnprocessableEntityError(GatewayError):
    """A well-formed JSON body whose fields are wrong (a type, a range, a missing or unknown key)."""
    status_code = 422
    error_type = "invalid_request_error"


class UnprocessableAdapterError(UnprocessableEntityError):
    pass


class UnsupportedMediaTypeError(GatewayError):
    status_code = 415
    error_type = "invalid_request_error"


class PayloadTooLargeError(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"


class RateLimitedError(GatewayError):
    """The client's own key ran out of its rpm/tpm budget."""
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, what: str, retry_after_s: float) -> None:
        seconds = max(1, math.ceil(retry_after_s))
        super().__init__(f"Rate limit reached for this API key ({what} per minute); retry in {seconds} s.",
                         code="rate_limit_exceeded", headers={"retry-after": str(seconds)})


class OverloadedError(GatewayError):
    """The gateway's own queue for a backend is full, or the request's deadline passed while it waited."""
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, code="queue_exceeded", headers={"retry-after": str(max(1, retry_after_s))})


class DrainingError(GatewayError):
    """The gateway is shutting down (SIGTERM) and its load balancer has had time to notice."""
    status_code = 503
    error_type = "server_error"

    def __init__(self, retry_after_s: int = 1) -> None:
        super().__init__("This gateway is shutting down; retry on another one.", code="shutting_down",
                         headers={"retry-after": str(max(1, retry_after_s))})


class UpstreamRateLimitedError(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"


class BadGatewayError(GatewayError):
    status_code = 502
    error_type = "server_error"


class ServiceUnavailableError(GatewayError):
    status_code = 503
    error_type = "server_error"


class GatewayTimeoutError(GatewayError):
    status_code = 504
    error_type = "server_error"


class InternalError(GatewayError):
    def __init__(self, request_id: str) -> None:
        super().__init__(f"Internal error (request id {request_id}); the details are in the gateway log.")


# Backend messages may name server paths (SGLang lists adapter dirs) or echo keys: never pass those on.
TRACEBACK = re.compile(r"Traceback \(most recent call last\).*", re.DOTALL)
URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@]*@")
SECRET_PARAMETER = re.compile(r"(\b(?:api[_-]?key|apikey|key|access[_-]?token|token|secret|password)=)[^&\s#;,\"']+",
                              re.IGNORECASE)
AUTHORIZATION = re.compile(r"(\b(?:proxy-)?authorization:\s*)\S+(?:\s+[A-Za-z0-9+/=._~\-]{6,})?", re.IGNORECASE)
BASIC_CREDENTIALS = re.compile(r"\bBasic\s+([A-Za-z0-9+/]{6,}={0,2})(?![\w+/=])", re.IGNORECASE)
SECRET_LIKE = re.compile(r"\b(?:sk|key|tok)-[A-Za-z0-9_\-]{6,}|\bBearer\s+\S+", re.IGNORECASE)
SERVER_PATH = re.compile(r"(?<![\w:/])/(?:[\w.\-]+/)+[\w.\-]*")
# Relative paths: `./x`, `../x`, `~/x`, or `dir/…/file.ext` (an extension that starts with a letter, so that
# ratios like `1.0/0.95` and model ids like `moonshotai/Kimi-K2.5` stay as they are).
RELATIVE_PATH = re.compile(r"(?<![\w/.~\-])(?:\.{1,2}|~)/[\w.\-/]*"
                           r"|(?<![\w:/.\-])[\w.\-]+(?:/[\w.\-]+)*/[\w\-]*[A-Za-z_][\w\-]*\.[A-Za-z][A-Za-z0-9]{0,15}(?![\w/])")
MAX_MESSAGE = 500
MAX_SCANNED = 4 * MAX_MESSAGE  # the regexes above are superlinear on hostile text: bound what they see


def _basic(match: re.Match) -> str:
    """`Basic <base64 of user:password>`; an ordinary word after "Basic" does not decode to that."""
    token = match.group(1)
    try:
        decoded = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
    except ValueError:
        return match.group(0)
    return "Basic <redacted>" if b":" in decoded else match.group(0)


def scrub(message: str) -> str:
    """A backend's error text made safe for clients: no paths, no credentials or key-like tokens, no tracebacks."""
    message = TRACEBACK.sub("", message[:MAX_SCANNED])
    message = URL_USERINFO.sub(r"\1<redacted>@", message)
    message = SECRET_PARAMETER.sub(r"\1<redacted>", message)
    message = AUTHORIZATION.sub(r"\1<redacted>", message)
    message = BASIC_CREDENTIALS.sub(_basic, message)
    message = SECRET_LIKE.sub("<redacted>", message)
    message = RELATIVE_PATH.sub("<path>", message)
    message = SERVER_PATH.sub("<path>", message)
    return message.strip()[:MAX_MESSAGE] or "The backend refused the request."


# A converter's traceback frames (its last lines are in a ConversionError): the header, `  File "…"` lines and
# the source lines under them. The exception line that ends the traceback is what an admin needs, and stays.
TRACEBACK_FRAMES = re.compile(r'^(?:Traceback \(most recent call last\):|  File ".*|    .*)\n?', re.MULTILINE)


def without_frames(message: str) -> str:
    return TRACEBACK_FRAMES.sub("", message).rstrip()


def quoted(value: str, limit: int = 64) -> str:
    """A name the client sent, quoted for a message and cut short: a path segment or field may be 20,000
    characters, and an error should not carry it back whole."""
    return f"'{value}'" if len(value) <= limit else f"'{value[:limit]}...' ({len(value)} characters)"


def error_body(message: str, error_type: str, param: str | None = None, code: str | int | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


def _rejected(exc: BackendRejectedError) -> GatewayError:
    error = GatewayError(scrub(exc.message), param=exc.param, code=exc.code)
    error.status_code, error.error_type = exc.status, exc.error_type
    return error


def _retry_after(exc: BackendError) -> dict[str, str]:
    return {"retry-after": str(max(1, round(getattr(exc, "retry_after_s", None) or 1)))}


def _where(exc: Exception) -> str:
    backend = getattr(exc, "backend", "")
    return f" (backend {backend})" if backend else ""


# The one table from an error raised below the HTTP edge to what the client sees. Most specific class first;
# the first row whose class matches wins.
ERROR_TABLE: tuple[tuple[type[Exception], Callable[[Exception], GatewayError]], ...] = (
    (ConversionError, lambda e: UnprocessableAdapterError(without_frames(str(e)))),
    (AdapterValidationError, lambda e: UnprocessableAdapterError(str(e))),
    (AdapterExistsError, lambda e: ConflictError(str(e))),
    (AdapterNotFoundError, lambda e: NotFoundError(f"No adapter named {quoted(str(e.args[0]))}.")),
    (AdapterInUseError, lambda e: ConflictError(str(e))),
    (RestartNeededError, lambda e: ConflictError(str(e))),
    (AdapterPlacementError, lambda e: BadGatewayError(scrub(str(e)))),
    (StoreUnavailableError, lambda e: ServiceUnavailableError(
        "The gateway's database (adapter registry, experiments) is unreachable; nothing was changed. Retry shortly.",
        headers={"retry-after": "5"})),
    (LeaseBusyError, lambda e: ServiceUnavailableError(str(e), headers={"retry-after": "5"})),
    (BackendRejectedError, _rejected),
    (ModelRetiredError, lambda e: ModelRetiredGatewayError(e.message)),
    (UnsupportedFeatureError, lambda e: InvalidRequestError(e.message, param=e.param)),
    (AdapterNotReadyError, lambda e: ServiceUnavailableError(
        "The adapter is being loaded on its backend; retry shortly.", headers=_retry_after(e))),
    (BackendRateLimitedError, lambda e: UpstreamRateLimitedError(
        f"The backend is rate limited{_where(e)}; retry later.", headers=_retry_after(e))),
    (BackendTimeoutError, lambda e: GatewayTimeoutError(f"The backend timed out{_where(e)}: {e.message}")),
    # a proxy's HTML page, a 200 that is not JSON: the backend's fault, never the client's
    (BackendProtocolError, lambda e: BadGatewayError(
        f"The backend sent a response the gateway could not read{_where(e)}: {e.message}")),
    (BackendError, lambda e: ServiceUnavailableError(   # down or restarting (a supervisor brings it back)
        f"No backend could serve the request{_where(e)}: {e.message}", headers=_retry_after(e))),
)


def to_gateway_error(exc: Exception) -> GatewayError:
    """The client-facing error for `exc`, from ERROR_TABLE; an exception it does not list is a bug (500)."""
    for kind, make in ERROR_TABLE:
        if isinstance(exc, kind):
            return make(exc)
    raise exc


def from_backend_error(exc: BackendError) -> GatewayError:
    """The status a client sees for a backend that failed before the first byte."""
    return to_gateway_error(exc)
