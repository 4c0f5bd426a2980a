"""Liveness and readiness probes (no token needed; they reveal no data)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from pacsnode.api.deps import EngineDep, SettingsDep
from pacsnode.api.schemas import ReadyPublic
from pacsnode.workers.brokerstate import broker_reachable

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The API process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyPublic, responses={503: {"model": ReadyPublic}})
def readyz(engine: EngineDep, settings: SettingsDep) -> Any:
    """The database answers and the broker accepts connections; 503 otherwise."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        database = "ok"
    except Exception as exc:
        database = f"unreachable: {type(exc).__name__}"
    broker = broker_reachable(settings)
    body = {"database": database, "broker": broker}
    return JSONResponse(body, status_code=200 if database == broker == "ok" else 503)
