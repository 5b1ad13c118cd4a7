"""/healthz (process alive), /readyz (every route has a healthy target; 503 while draining), /metrics.
What /readyz details and /metrics show, and to whom, is config `exposure` (gateway/exposure.py)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.dependencies import StateDep
from gateway.exposure import exposed, may_see

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request, state: StateDep) -> JSONResponse:
    ready = state.ready()
    body: dict = {"status": "ready" if ready else ("draining" if state.draining else "not ready")}
    if may_see("readyz_details", request, state):
        body["backends"] = {name: ("up" if up else "down") for name, up in state.healthy.items()}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", dependencies=[Depends(exposed("metrics"))])
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
