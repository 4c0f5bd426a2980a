"""The DICOMweb server (PS3.18) under ``/dicom-web``: QIDO-RS (:mod:`.qido`),
WADO-RS (:mod:`.wado`, :mod:`.rendered`) and STOW-RS (:mod:`.stow`).

It is a sub-application mounted on the admin API's app: same port, same
bearer tokens and dashboard cookie (:mod:`pacsnode.api.deps`), same error
handler, and its own CORS policy (``dicomweb.cors_origins``; none by
default), so opening DICOMweb to a browser on another origin never opens the
admin API.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from sqlalchemy import Engine

from pacsnode.api.dicomweb import qido, rendered, stow, wado
from pacsnode.api.errors import pacsnode_error_response
from pacsnode.core.errors import PacsnodeError
from pacsnode.core.settings import Settings

PREFIX = "/dicom-web"


def create_dicomweb_app(settings: Settings, engine: Engine) -> FastAPI:
    app = FastAPI(
        title="pacsnode DICOMweb",
        description="QIDO-RS, WADO-RS and STOW-RS (DICOM PS3.18). See docs/dicomweb.md.",
        version="1",
    )
    app.add_exception_handler(PacsnodeError, pacsnode_error_response)
    app.state.settings = settings
    app.state.engine = engine

    app.state.stow = None  # spool and index writer, made by the first STOW-RS request
    for module in (qido, wado, rendered, stow):
        app.include_router(module.router)
    if settings.dicomweb.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.dicomweb.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Accept", "Content-Type"],
            expose_headers=["Warning", "Content-Location"],
        )
    return app
