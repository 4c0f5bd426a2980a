"""Helpers the routers share: pagination parameters and audited transactions."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import Query
from sqlalchemy import Connection, Engine

from pacsnode.api.deps import Principal
from pacsnode.api.schemas import MAX_LIMIT
from pacsnode.db import audit
from pacsnode.db.queries import Page

T = TypeVar("T")

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="rows per page")]
Offset = Annotated[int, Query(ge=0, le=10_000_000, description="rows to skip")]
# DICOM DA (PS3.5 §6.2): YYYYMMDD; a range bound, compared as text like C-FIND does.
DicomDate = Annotated[
    str | None, Query(pattern=r"^\d{8}$", description="DICOM date YYYYMMDD (inclusive)")
]
Text = Annotated[str | None, Query(max_length=64)]


@contextmanager
def audited(
    engine: Engine,
    principal: Principal,
    action: str,
    target: str = "",
    detail: Mapping[str, Any] | None = None,
) -> Iterator[Connection]:
    """One transaction holding the action (or read) and its audit row."""
    with engine.begin() as conn:
        yield conn
        audit.record(conn, principal.actor, action, target=target, detail=_plain(detail))


def _plain(detail: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        k: (v.isoformat() if isinstance(v, datetime) else v)
        for k, v in (detail or {}).items()
        if v is not None
    }


def page_out(page: Page[T], convert: Callable[[T], Any] | None = None) -> dict[str, Any]:
    items = [convert(i) for i in page.items] if convert else page.items
    return {"items": items, "total": page.total, "limit": page.limit, "offset": page.offset}
