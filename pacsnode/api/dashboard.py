"""The dashboard: server-rendered pages (Jinja2), no front-end build.

Sign-in: the login form takes an API token and sets it as the HttpOnly,
SameSite=Strict ``pacsnode_token`` cookie (also what the OHIF viewer at
``/viewer/`` signs in with: :mod:`pacsnode.api.viewer`, whose pages send a
visitor here with ``?next=`` and get them back); a bearer header works too. Pages
need a read token; the retry buttons (plain HTML forms posting to the
dashboard) need an admin token. The pages use the same query layer as the
API and the CLI, and audit the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from pacsnode.api.deps import (
    COOKIE,
    VIEW_ROLES,
    EngineDep,
    Principal,
    SettingsDep,
    authenticate,
    check_token,
    client_address,
)
from pacsnode.api.overlay import key_image
from pacsnode.api.routes.common import audited
from pacsnode.api.viewer import viewer_link
from pacsnode.core.errors import NotFound
from pacsnode.core.states import RETRYABLE_EXPORT_STATES, JobState
from pacsnode.db.admin import list_jobs, retry_jobs
from pacsnode.db.exports import known_destinations, retry_exports
from pacsnode.db.modelswitch import list_models
from pacsnode.db.queries import StudyFilter, get_study, list_series, list_studies
from pacsnode.db.stats import stats as node_stats

RowId = Annotated[int, PathParam(ge=1, le=2**31 - 1)]
router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))


def _principal(request: Request, settings: Any, engine: Any, admin: bool = False) -> Principal:
    principal = authenticate(request, settings, engine)
    if principal is None:
        raise HTTPException(303, headers={"Location": "/ui/login"})
    if principal.role not in VIEW_ROLES:
        raise HTTPException(403, detail="a store token cannot sign in: use a read or admin token")
    if admin and principal.role != "admin":
        raise HTTPException(403, detail="this action needs an admin token")
    return principal


def _page(request: Request, name: str, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context)


def _next_page(value: str) -> str:
    """Where to go after signing in: a page of the dashboard or the viewer
    on this node, never another site."""
    plain = all(0x20 < ord(ch) < 0x7F and ch != "\\" for ch in value)
    if value.startswith(("/ui/", "/viewer/")) and plain and len(value) <= 2048:
        return value
    return "/ui/"


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "") -> HTMLResponse:
    return _page(request, "login.html", error="", next=_next_page(next))


@router.post("/login")
def login(
    request: Request,
    settings: SettingsDep,
    engine: EngineDep,
    token: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/ui/",
) -> Response:
    target = _next_page(next)
    principal = check_token(token.strip(), client_address(request), settings, engine)
    if principal is None:
        return _page(request, "login.html", error="unknown or revoked token", next=target)
    if principal.role not in VIEW_ROLES:
        return _page(request, "login.html", error="a store token cannot sign in", next=target)
    response = RedirectResponse(target, status_code=303)
    secure = request.url.scheme == "https"
    response.set_cookie(
        COOKIE, token.strip(), httponly=True, samesite="strict", secure=secure, path="/"
    )
    return response


@router.get("/login/once/{key}")
def login_once(
    request: Request,
    settings: SettingsDep,
    engine: EngineDep,
    key: Annotated[str, PathParam(max_length=128)],
) -> Response:
    """The one-time link ``pacsnode serve`` prints on a local first run
    (:mod:`pacsnode.firstrun`): signs this browser in with a new admin token."""
    from pacsnode.db import audit
    from pacsnode.firstrun import redeem

    client = client_address(request)
    token = redeem(settings, engine, key, client)
    if token is None:
        with engine.begin() as conn:
            audit.record(
                conn,
                audit.Actor("api", "anonymous", client),
                "ui.first_run_login",
                outcome="denied",
            )
        error = (
            "this login link is unknown or was already used: sign in with a token "
            "(pacsnode tokens create --role admin --name NAME)"
        )
        return templates.TemplateResponse(request, "login.html", {"error": error}, status_code=403)
    response = RedirectResponse("/ui/", status_code=303)
    secure = request.url.scheme == "https"
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=secure, path="/")
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, settings: SettingsDep, engine: EngineDep) -> HTMLResponse:
    from pacsnode.workers.brokerstate import queue_depths

    principal = _principal(request, settings, engine)
    with audited(engine, principal, "ui.overview") as conn:
        figures = node_stats(conn)
        failed = list_jobs(conn, state=JobState.FAILED, limit=10)
    return _page(
        request,
        "overview.html",
        stats=figures,
        failed=failed.items,
        queues=queue_depths(settings),
        principal=principal,
    )


@router.get("/studies", response_class=HTMLResponse)
def studies(
    request: Request, settings: SettingsDep, engine: EngineDep, q: str = "", offset: int = 0
) -> HTMLResponse:
    principal = _principal(request, settings, engine)
    q = q.strip()[:64]
    offset = max(0, offset)
    with audited(engine, principal, "ui.studies", detail={"q": q}) as conn:
        page = list_studies(conn, StudyFilter(), limit=50, offset=offset)
        if q:  # the search box: Patient ID, accession number or Study UID
            found = {}
            for flt in (
                StudyFilter(patient_id=q),
                StudyFilter(accession_number=q),
                StudyFilter(study_instance_uid=q),
            ):
                for item in list_studies(conn, flt, limit=50).items:
                    found[item.study_instance_uid] = item
            items, total = list(found.values()), len(found)
        else:
            items, total = page.items, page.total
    return _page(
        request,
        "studies.html",
        viewer_link=viewer_link,
        items=items,
        total=total,
        q=q,
        offset=offset,
        principal=principal,
    )


@router.get("/studies/{uid}", response_class=HTMLResponse)
def study(request: Request, settings: SettingsDep, engine: EngineDep, uid: str) -> HTMLResponse:
    from pacsnode.db.admin import ResultFilter, list_findings, list_segments

    principal = _principal(request, settings, engine)
    with audited(engine, principal, "ui.study", target=uid[:64]) as conn:
        found = get_study(conn, uid)
        if found is None:
            raise NotFound("study not found")
        series = list_series(conn, study_instance_uid=uid, limit=200).items
        flt = ResultFilter(study_instance_uid=uid)
        findings = list_findings(conn, flt, limit=200).items
        segments = list_segments(conn, flt, limit=200).items
        jobs = list_jobs(conn, study_instance_uid=uid, limit=20).items
    return _page(
        request,
        "study.html",
        viewer=viewer_link(found.study_instance_uid),
        study=found,
        series=series,
        findings=findings,
        segments=segments,
        jobs=jobs,
        principal=principal,
    )


@router.get("/studies/{uid}/key.png")
def study_image(request: Request, settings: SettingsDep, engine: EngineDep, uid: str) -> Response:
    principal = _principal(request, settings, engine)
    with audited(engine, principal, "ui.key_image", target=uid[:64]):
        pass
    png = key_image(engine, settings, uid)
    if png is None:
        raise NotFound("the study has no volume series")
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/jobs", response_class=HTMLResponse)
def jobs(
    request: Request, settings: SettingsDep, engine: EngineDep, state: str = "", offset: int = 0
) -> HTMLResponse:
    principal = _principal(request, settings, engine)
    with audited(engine, principal, "ui.jobs", detail={"state": state}) as conn:
        page = list_jobs(conn, state=state or None, limit=50, offset=max(0, offset))
    return _page(request, "jobs.html", page=page, state=state, principal=principal)


@router.post("/jobs/{job_id}/retry")
def job_retry(
    request: Request, settings: SettingsDep, engine: EngineDep, job_id: RowId
) -> Response:
    principal = _principal(request, settings, engine, admin=True)
    with audited(engine, principal, "jobs.retry", target=f"job:{job_id}") as conn:
        retry_jobs(conn, [job_id])
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/exports", response_class=HTMLResponse)
def exports(
    request: Request, settings: SettingsDep, engine: EngineDep, state: str = "", offset: int = 0
) -> HTMLResponse:
    from pacsnode.db.admin import page_exports

    principal = _principal(request, settings, engine)
    with audited(engine, principal, "ui.exports", detail={"state": state}) as conn:
        page = page_exports(conn, state=state or None, limit=50, offset=max(0, offset))
    return _page(request, "exports.html", page=page, state=state, principal=principal)


@router.post("/exports/{export_id}/retry")
def export_retry(
    request: Request, settings: SettingsDep, engine: EngineDep, export_id: RowId
) -> Response:
    from datetime import UTC, datetime, timedelta

    principal = _principal(request, settings, engine, admin=True)
    now = datetime.now(UTC)
    with audited(engine, principal, "exports.retry", target=f"export:{export_id}") as conn:
        for state in RETRYABLE_EXPORT_STATES:
            retry_exports(
                conn,
                now=now,
                deadline=now + timedelta(seconds=settings.exports.deadline_s),
                ids=[export_id],
                state=state,
                refresh=known_destinations(settings),
            )
    return RedirectResponse("/ui/exports", status_code=303)


@router.get("/models", response_class=HTMLResponse)
def models(request: Request, settings: SettingsDep, engine: EngineDep) -> HTMLResponse:
    principal = _principal(request, settings, engine)
    with audited(engine, principal, "ui.models") as conn:
        rows = list_models(conn, settings)
    return _page(request, "models.html", models=rows, principal=principal)
