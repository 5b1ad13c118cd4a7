"""GET /v1/models: the routes this key may use, in OpenAI's list shape (never a backend's own cards,
which leak server paths in `root`)."""
from __future__ import annotations

import time

from fastapi import APIRouter

from gateway.dependencies import PrincipalDep, StateDep
from gateway.errors import ModelNotFoundError

router = APIRouter()
STARTED = int(time.time())


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": STARTED, "owned_by": "kimi-gateway"}


@router.get("/v1/models")
async def list_models(state: StateDep, principal: PrincipalDep) -> dict:
    names = [name for name in state.routes.names() if principal.may_use(name)]
    return {"object": "list", "data": [model_card(name) for name in names]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, state: StateDep, principal: PrincipalDep) -> dict:
    if state.routes.get(model) is None or not principal.may_use(model):
        raise ModelNotFoundError(model)
    return model_card(model)
