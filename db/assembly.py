"""Study assembly state and the job outbox, in SQL.

The storage SCP records arrivals (:func:`note_arrivals`, in the transaction
that indexes the instances) and the end of each association
(:func:`close_associations`). The assembler reads the groups still assembling
(:func:`assembling`) and, when one is complete, marks it triggered and writes
its job row (:func:`pacsnode.db.jobs.create_job`) in one transaction
(:func:`trigger`): the outbox of docs/architecture.md §3.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

from sqlalchemy import Connection, Table, case, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from pacsnode.core.states import AssemblyState, JobKind
from pacsnode.db.jobs import DEFAULT_PIPELINE, create_job
from pacsnode.db.models import Assembly, Instance, Series

_ASSEMBLY: Table = Assembly.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class Arrival:
    """Instances of one group (study or series) received in one index batch."""

    key_uid: str
    grouping: str
    study_pk: int
    series_pk: int | None
    calling_ae_title: str
    received_at: datetime
    opens: int  # associations that sent their first instance of this group


def utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes; pacsnode writes UTC everywhere."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def note_arrivals(conn: Connection, arrivals: Iterable[Arrival]) -> None:
    """Create or refresh the assembly rows of the groups that just received
    instances. A group already triggered starts assembling again, and its
    next job will be an update that re-runs the whole study."""
    stmt = _arrival_statement(conn.dialect.name)
    for a in sorted(arrivals, key=lambda a: a.key_uid):
        conn.execute(
            stmt,
            {
                "key_uid": a.key_uid,
                "grouping": a.grouping,
                "study_pk": a.study_pk,
                "series_pk": a.series_pk,
                "calling_ae_title": a.calling_ae_title,
                "state": AssemblyState.ASSEMBLING,
                "next_kind": JobKind.INITIAL,
                "first_received_at": a.received_at,
                "last_received_at": a.received_at,
                "sending": a.opens,
                "released_at": None,
                "triggered_at": None,
                "trigger_reason": "",
            },
        )


@cache
def _arrival_statement(dialect: str) -> Any:
    """The upsert of :func:`note_arrivals`, built once per process: it runs
    in every index commit, and building it cost more than executing it."""
    t = _ASSEMBLY.c
    insert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
    stmt = insert(_ASSEMBLY)
    again = t.state == AssemblyState.TRIGGERED
    return stmt.on_conflict_do_update(
        index_elements=["key_uid"],
        set_={
            "state": AssemblyState.ASSEMBLING,
            "last_received_at": stmt.excluded.last_received_at,
            "sending": t.sending + stmt.excluded.sending,
            "calling_ae_title": stmt.excluded.calling_ae_title,
            "next_kind": case((again, JobKind.UPDATE.value), else_=t.next_kind),
            "first_received_at": case(
                (again, stmt.excluded.first_received_at), else_=t.first_received_at
            ),
            "released_at": case((again, None), else_=t.released_at),
        },
    )


def close_associations(
    conn: Connection, key_uids: Sequence[str], released: bool, at: datetime
) -> None:
    """An association that sent these groups ended. Only a released one (not
    an aborted one) counts as 'the sender has finished' for the debounce."""
    if not key_uids:
        return
    t = _ASSEMBLY.c
    values: dict[str, Any] = {"sending": case((t.sending > 0, t.sending - 1), else_=0)}
    if released:
        values["released_at"] = at
    conn.execute(update(_ASSEMBLY).where(t.key_uid.in_(sorted(key_uids))).values(**values))


def reset_sending(conn: Connection) -> int:
    """At start-up no association is open: forget counts a crash left behind."""
    t = _ASSEMBLY.c
    result = conn.execute(update(_ASSEMBLY).where(t.sending != 0).values(sending=0))
    return int(result.rowcount or 0)


def assembling(conn: Connection) -> Sequence[Any]:
    """The groups still waiting to be complete."""
    return conn.execute(
        select(_ASSEMBLY).where(_ASSEMBLY.c.state == AssemblyState.ASSEMBLING)
    ).all()


def trigger(
    conn: Connection, row: Any, reason: str, now: datetime, pipeline: str = DEFAULT_PIPELINE
) -> int | None:
    """Mark ``row`` triggered and write its job, in the caller's transaction.

    Returns the job id, or None when an instance arrived since ``row`` was
    read (the group is then re-evaluated on the next pass).
    """
    t = _ASSEMBLY.c
    marked = conn.execute(
        update(_ASSEMBLY)
        .where(
            t.id == row.id,
            t.state == AssemblyState.ASSEMBLING,
            t.last_received_at == row.last_received_at,
        )
        .values(state=AssemblyState.TRIGGERED, triggered_at=now, trigger_reason=reason)
    )
    if marked.rowcount != 1:
        return None
    count = select(func.count(Instance.id)).join(Series, Instance.series_pk == Series.id)
    if row.series_pk is not None:
        count = count.where(Series.id == row.series_pk)
    else:
        count = count.where(Series.study_pk == row.study_pk)
    instances = int(conn.execute(count).scalar_one())
    return create_job(
        conn,
        assembly_pk=row.id,
        study_pk=row.study_pk,
        series_pk=row.series_pk,
        kind=JobKind(row.next_kind),
        trigger_reason=reason,
        instances=instances,
        now=now,
        pipeline=pipeline,
    )
