"""AdminClient: the admin API (/admin/adapters, /admin/backends) as typed calls, for the CLI and scripts.

Every call returns the decoded JSON body or raises one of three errors: AdminAPIError (the gateway answered
with an error status; carries the status and the message of its OpenAI-shaped body), GatewayUnreachableError
(nothing answered at the URL) or GatewayNoAnswerError (connected, but no answer within the timeout). The admin
key travels only in the Authorization header; no error text or repr here contains it.
"""
from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx

ADMIN_KEY_ENV = "KIMI_GATEWAY_ADMIN_KEY"
READ_TIMEOUT_S = 30.0
CHANGE_TIMEOUT_S = 600.0    # add/swap/remove answer only once the adapter loaded, flipped or drained


class AdminClientError(Exception):
    """Base for what the CLI reports; the message is safe to print (it never holds the admin key)."""


class AdminAPIError(AdminClientError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


class GatewayUnreachableError(AdminClientError):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the gateway at {url}: {reason}")
        self.url = url


class GatewayNoAnswerError(AdminClientError):
    def __init__(self, url: str, timeout_s: float) -> None:
        super().__init__(f"no answer from the gateway at {url} within {timeout_s:g} s")
        self.url = url
        self.timeout_s = timeout_s


def error_message(response: httpx.Response) -> str:
    """The `error.message` of an OpenAI-shaped body; else FastAPI's `detail`, else the text or the reason."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        text = response.text.strip()
        return text[:300] if text else response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
        if "detail" in body:
            return str(body["detail"])
    return json.dumps(body)[:300]


class AdminClient:
    """One gateway's admin API. `transport` is for tests (httpx.MockTransport); by default, real HTTP."""

    def __init__(self, base_url: str, admin_key: str | None, *, timeout_s: float = READ_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.timeout_s = timeout_s
        self._http = httpx.Client(base_url=self.base_url, headers=headers, transport=transport,
                                  timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)))

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def list_adapters(self) -> dict[str, Any]:
        return self._call("GET", "/admin/adapters")

    def get_adapter(self, name: str) -> dict[str, Any]:
        return self._call("GET", adapter_path(name))

    def add_adapter(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/admin/adapters", body)

    def swap_adapter(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", adapter_path(name) + "/swap", body)

    def remove_adapter(self, name: str) -> None:
        self._call("DELETE", adapter_path(name))

    def list_backends(self) -> dict[str, Any]:
        return self._call("GET", "/admin/backends")

    def get_experiment(self, name: str) -> dict[str, Any]:
        return self._call("GET", "/admin/experiments/" + quote(name, safe=""))

    def promote_experiment(self, name: str, variant: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/admin/experiments/" + quote(name, safe="") + "/promote",
                          {"variant": variant} if variant else None)

    def put_route(self, name: str, route: dict[str, Any]) -> dict[str, Any]:
        return self._call("PUT", "/admin/routes/" + quote(name, safe=""), route)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise GatewayUnreachableError(self.base_url, describe_connect_error(exc)) from exc
        except httpx.TimeoutException as exc:
            raise GatewayNoAnswerError(self.base_url, self.timeout_s) from exc
        except httpx.TransportError as exc:
            raise GatewayUnreachableError(self.base_url, type(exc).__name__) from exc
        if response.status_code >= 400:
            raise AdminAPIError(response.status_code, error_message(response))
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdminAPIError(response.status_code, f"the answer to {method} {path} is not JSON: is {self.base_url} "
                                                      "a kimi-gateway admin listener?") from exc


def adapter_path(name: str) -> str:
    return "/admin/adapters/" + quote(name, safe="")


def describe_connect_error(exc: httpx.TransportError) -> str:
    """The OS's words for why the connection failed ("Connection refused"), found by type down the cause chain."""
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect timed out"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__
