"""The only reader of app.state: named dependency aliases for the control plane (STYLE.md convention 2)."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.auth import Principal, authenticate
from gateway.state import GatewayState


def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway


StateDep = Annotated[GatewayState, Depends(get_state)]


def get_principal(request: Request, state: StateDep) -> Principal:
    header = request.headers.get("authorization")
    return authenticate(header.encode("latin-1") if header else None, state.client_keys)


PrincipalDep = Annotated[Principal, Depends(get_principal)]
