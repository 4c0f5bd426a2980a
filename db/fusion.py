"""Fusion outcomes: where each study-level fusion model stands on a study.

The pipeline's fuse stage writes one row per (study, model version)
(:func:`record`); the assembler's loop turns waits whose deadline passed into
a recorded ``incomplete`` outcome (:func:`expire_waits`). A late series
starts an update job (db.assembly) whose fuse stage replaces the row.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Table, select, update
from sqlalchemy.dialects import postgresql, sqlite

from pacsnode.core.states import FusionState
from pacsnode.db.models import FusionOutcome, Study

log = logging.getLogger(__name__)

_OUTCOME: Table = FusionOutcome.__table__  # type: ignore[assignment]
_DETAIL_MAX = 1024


@dataclass(frozen=True)
class Outcome:
    state: FusionState
    missing_roles: Sequence[str] = ()
    series: Mapping[str, str] | None = None  # role -> SeriesInstanceUID
    detail: str = ""
    deadline_at: datetime | None = None


def record(
    conn: Connection,
    *,
    study_pk: int,
    job_id: int,
    model_name: str,
    model_version: str,
    outcome: Outcome,
    now: datetime | None = None,
) -> None:
    """Insert or replace the outcome of this model version on this study."""
    values = {
        "job_pk": job_id,
        "state": FusionState(outcome.state),  # ValueError for an unknown state
        "missing_roles": ",".join(outcome.missing_roles),
        "series": "\n".join(f"{r}={uid}" for r, uid in (outcome.series or {}).items()),
        "detail": outcome.detail[:_DETAIL_MAX],
        "deadline_at": outcome.deadline_at,
        "updated_at": now or datetime.now(UTC),
    }
    insert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[conn.dialect.name]
    stmt = insert(_OUTCOME).values(
        study_pk=study_pk, model_name=model_name, model_version=model_version, **values
    )
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["study_pk", "model_name", "model_version"], set_=values
        )
    )


def study_first_received(conn: Connection, study_pk: int) -> datetime:
    value = conn.execute(select(Study.first_received_at).where(Study.id == study_pk)).scalar_one()
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def expire_waits(conn: Connection, now: datetime | None = None) -> list[int]:
    """Waiting outcomes past their deadline become ``incomplete``; returns
    their ids. A later series still re-runs the model (an update job)."""
    now = now or datetime.now(UTC)
    t = _OUTCOME.c
    rows = conn.execute(
        select(t.id, t.study_pk, t.model_name, t.model_version, t.missing_roles).where(
            t.state == FusionState.WAITING, t.deadline_at <= now
        )
    ).all()
    for row in rows:
        conn.execute(
            update(_OUTCOME)
            .where(t.id == row.id, t.state == FusionState.WAITING)
            .values(
                state=FusionState.INCOMPLETE,
                updated_at=now,
                detail=f"incomplete study: no series for role(s) {row.missing_roles} "
                "arrived within fusion.max_wait_s",
            )
        )
        log.warning(
            "fusion %s@%s on study pk %d: incomplete study, missing %s",
            row.model_name,
            row.model_version,
            row.study_pk,
            row.missing_roles,
        )
    return [int(r.id) for r in rows]
