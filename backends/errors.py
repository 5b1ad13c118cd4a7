"""The errors drivers raise: transport faults and backend answers, mapped once to HTTP by gateway/errors.py.

    BackendError
    ├── BackendUnavailableError     connect refused/reset, 502/503 from the backend (retryable, fall back)
    │   ├── BackendRateLimitedError 429 from the backend, with retry_after_s when it said so
    │   ├── BackendAccountError     the backend refuses the gateway's account (key, permission, model, quota):
    │   │                           never retried there, another target may serve
    │   ├── AdapterNotReadyError    no replica of this backend serves the adapter version right now
    │   └── AdapterMissingError     a replica lost an adapter it had (a restart): reloaded in the background
    ├── ServerChangedError          a replica's adapter list changed under us (llama.cpp restart): rebuild, resend
    ├── BackendTimeoutError         a phase (connect, idle between chunks) ran out (retryable before the first byte)
    │   └── BackendFirstByteTimeoutError  no first event in time: the prefill is not repeated on that backend
    ├── BackendProtocolError        the backend answered something that is not HTTP/SSE/JSON we understand
    ├── BackendRejectedError        the backend refused the request (4xx): status + a client-safe message
    └── UnsupportedFeatureError     the backend kind cannot do what the request asks (another target may)
        └── ModelRetiredError       the hosted model id was retired and no successor is mapped (404)
"""
from __future__ import annotations


class BackendError(Exception):
    """Base of every driver error; `backend` names the config backend that failed."""

    retryable = False

    def __init__(self, message: str, *, backend: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.backend = backend


class BackendUnavailableError(BackendError):
    retryable = True


class BackendRateLimitedError(BackendUnavailableError):
    def __init__(self, message: str, *, backend: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message, backend=backend)
        self.retry_after_s = retry_after_s


class BackendAccountError(BackendUnavailableError):
    """Waiting does not help (a refused key, a retired model, an exhausted quota): not retried on this backend."""

    retryable = False


class AdapterNotReadyError(BackendUnavailableError):
    """Another target may serve it; with none, the client gets 503 and a short retry-after."""

    def __init__(self, message: str, *, backend: str = "", retry_after_s: float = 1.0) -> None:
        super().__init__(message, backend=backend)
        self.retry_after_s = retry_after_s


class AdapterMissingError(AdapterNotReadyError):
    """The replica answered that it does not have an adapter the gateway loaded there."""

    def __init__(self, message: str, *, backend: str = "", replica: int = 0) -> None:
        super().__init__(message, backend=backend)
        self.replica = replica


class ServerChangedError(BackendError):
    """Raised by a connection check before anything was sent: the request is rebuilt and sent again."""

    retryable = True


class BackendTimeoutError(BackendError):
    retryable = True


class BackendFirstByteTimeoutError(BackendTimeoutError):
    """The first event (a stream's first `data:`, a non-stream's response) did not come within the first-byte
    timeout, counted from sending the request whatever came before it (SGLang sends a stream's head before
    prefill). Retrying would run the same prefill again, so it is not retried on the same backend."""

    retryable = False


class BackendProtocolError(BackendError):
    retryable = True


class BackendRejectedError(BackendError):
    """A 4xx the client caused; `message` is already scrubbed and safe to show."""

    def __init__(
        self, message: str, *, status: int, backend: str = "", error_type: str = "invalid_request_error",
        param: str | None = None, code: str | None = None,
    ) -> None:
        super().__init__(message, backend=backend)
        self.status = status
        self.error_type = error_type
        self.param = param
        self.code = code


class UnsupportedFeatureError(BackendError):
    """The backend kind cannot do what the request asks (vision, a field, adapters): not retryable here,
    but another target of the same route may do it."""

    def __init__(self, message: str, *, backend: str = "", param: str | None = None) -> None:
        super().__init__(message, backend=backend)
        self.param = param


class ModelRetiredError(UnsupportedFeatureError):
    """A retired hosted model id with no configured successor: a 404 naming the retirement (another target
    of the route may still serve it)."""

    def __init__(self, message: str, *, backend: str = "", model: str = "") -> None:
        super().__init__(message, backend=backend, param="model")
        self.model = model
