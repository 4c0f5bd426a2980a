"""The FastAPI application: ``/api/v1`` (one router per resource),
``/healthz``, ``/readyz``, ``/metrics``, the dashboard under ``/ui`` and the
DICOMweb server under ``/dicom-web`` (:mod:`pacsnode.api.dicomweb`) and the
OHIF viewer under ``/viewer``."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy import Engine

from pacsnode.api import dashboard, metrics, viewer
from pacsnode.api.deps import require_read
from pacsnode.api.dicomweb import PREFIX as DICOMWEB_PREFIX
from pacsnode.api.dicomweb import create_dicomweb_app
from pacsnode.api.errors import pacsnode_error_response
from pacsnode.api.routes import exports, health, jobs, models, results, stats, studies
from pacsnode.core.errors import PacsnodeError
from pacsnode.core.settings import Settings
from pacsnode.db.session import create_db_engine

API_PREFIX = "/api/v1"


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    app = FastAPI(
        title="pacsnode admin API",
        version="1",
        description="Studies, jobs, results, exports, models and statistics of one pacsnode. "
        "Bearer tokens: `pacsnode tokens create --role read|admin`. The bundled models "
        "are for demonstration and testing, not clinical use.",
    )

    @app.middleware("http")
    async def refuse_control_characters(request: Request, call_next: Any) -> Any:
        # A NUL cannot be stored in PostgreSQL text nor appear in a DICOM UID
        # or LO value (PS3.5 §6.2): refuse it here with a clear answer.
        raw = unquote(request.url.path + "?" + (request.url.query or ""))
        if any(ord(ch) < 0x20 for ch in raw):
            return JSONResponse(
                {"detail": "control characters are not allowed in the path or query"}, 400
            )
        return await call_next(request)

    # Every deliberate error answers with the HTTP status its class declares.
    app.add_exception_handler(PacsnodeError, pacsnode_error_response)
    app.state.settings = settings
    app.state.engine = engine or create_db_engine(settings.effective_database_url)
    api = APIRouter(prefix=API_PREFIX)
    for module in (studies, jobs, results, exports, models, stats):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(health.router)
    app.include_router(dashboard.router)
    app.include_router(viewer.router)
    if settings.dicomweb.enabled:
        app.mount(DICOMWEB_PREFIX, create_dicomweb_app(settings, app.state.engine))

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        """People who open the node's address land on the dashboard."""
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/metrics", tags=["health"], response_class=Response)
    def prometheus(request: Request) -> Response:
        """Prometheus text format; needs a read token unless ``api.open_metrics``."""
        if not settings.api.open_metrics:
            require_read(request, settings, app.state.engine)
        body = metrics.render(app.state.engine, settings)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
