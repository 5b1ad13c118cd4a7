"""Who may read the gateway's own introspection (config `exposure`): /metrics, /openapi.json and the
per-backend details of /readyz. `public` serves it to anyone on the main listener; `admin` serves it only on
the admin listener when `admin_listen` is set (nothing to present there: the listener is the boundary), and
otherwise only to a request with an admin key."""
from __future__ import annotations

from typing import Callable, Literal

from fastapi import Request

from gateway.api.admin import require_admin
from gateway.config import GatewayConfig
from gateway.dependencies import StateDep
from gateway.errors import GatewayError, NotFoundError

Introspection = Literal["metrics", "openapi", "readyz_details"]
PATHS = {"metrics": "/metrics", "openapi": "/openapi.json"}


def admin_listener_paths(config: GatewayConfig) -> frozenset[str]:
    """Paths that move to the admin listener, beside /admin itself (when there is one)."""
    return frozenset(path for what, path in PATHS.items() if getattr(config.exposure, what) == "admin")


def shared_paths(config: GatewayConfig) -> frozenset[str]:
    """Paths both listeners serve: /readyz keeps its status for load balancers, details on the admin one."""
    return frozenset({"/readyz"}) if config.exposure.readyz_details == "admin" else frozenset()


def on_admin_listener(scope: dict, config: GatewayConfig) -> bool:
    server = scope.get("server")
    return config.admin_listen is not None and server is not None and server[1] == config.admin_listen.port


def require_exposed(what: Introspection, request: Request, state) -> None:
    """Pass, or raise: a 404 off the admin listener when there is one, else the admin API's own 401/403."""
    config = state.config
    if getattr(config.exposure, what) == "public" or on_admin_listener(request.scope, config):
        return
    if config.admin_listen is not None:
        raise NotFoundError("Not found.")
    require_admin(request, state)


def may_see(what: Introspection, request: Request, state) -> bool:
    try:
        require_exposed(what, request, state)
    except GatewayError:
        return False
    return True


def exposed(what: Introspection) -> Callable[[Request, StateDep], None]:
    """A route dependency: the route answers only where `exposure.<what>` allows."""
    def check(request: Request, state: StateDep) -> None:
        require_exposed(what, request, state)
    return check
