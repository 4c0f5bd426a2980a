"""The audit trail: who did what, when and from where (the only writer of
``audit_event``).

:func:`record` takes the caller's connection, so the audit row commits in
the transaction of the action it records: an action that committed has its
row, and a row never describes an action that rolled back. Reads of results
through the API have no transaction of their own; their row is committed
before the response is sent, so a caller never holds results whose reading
was not recorded.

``detail`` holds identifiers (UIDs, ids), counts and filters; never patient
names. A filter on Patient ID is an identifier the auditor needs ("who looked
up this patient?"), so it is kept: the audit table is as sensitive as the
index and lives beside it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select

from pacsnode.db.models import AuditEvent

CHANNELS = ("api", "dicom", "export", "cli")
DETAIL_MAX = 2048


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts, and from where (a token's name and the client address, an
    AE title and its host, ``cli:<user>``)."""

    channel: str
    name: str
    source: str = ""


def _clip(value: str, size: int) -> str:
    return value if len(value) <= size else value[: size - 1] + "…"


def record(
    conn: Connection,
    actor: Actor,
    action: str,
    *,
    target: str = "",
    outcome: str = "ok",
    detail: Mapping[str, Any] | None = None,
    at: datetime | None = None,
) -> None:
    """Write one audit row in the caller's transaction."""
    text = json.dumps(dict(detail or {}), sort_keys=True, default=str)
    conn.execute(
        insert(AuditEvent).values(
            at=at or datetime.now(UTC),
            channel=actor.channel,
            actor=_clip(actor.name, 96),
            action=_clip(action, 64),
            target=_clip(target, 128),
            source=_clip(actor.source, 96),
            outcome=_clip(outcome, 16),
            detail=_clip(text, DETAIL_MAX),
        )
    )


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    at: datetime
    channel: str
    actor: str
    action: str
    target: str
    source: str
    outcome: str
    detail: str

    def as_json(self) -> dict[str, Any]:
        at = self.at if self.at.tzinfo else self.at.replace(tzinfo=UTC)
        return {
            "id": self.id,
            "at": at.isoformat(),
            "channel": self.channel,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "source": self.source,
            "outcome": self.outcome,
            "detail": self.detail,
        }


def list_events(
    conn: Connection,
    *,
    channel: str | None = None,
    actor: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[AuditRow], int]:
    """Audit rows, newest first, and how many match in all."""
    where = []
    if channel is not None:
        where.append(AuditEvent.channel == channel)
    if actor is not None:
        where.append(AuditEvent.actor == actor)
    if action is not None:
        where.append(AuditEvent.action == action)
    if since is not None:
        where.append(AuditEvent.at >= since)
    if until is not None:
        where.append(AuditEvent.at < until)
    total = int(conn.execute(select(func.count(AuditEvent.id)).where(*where)).scalar_one())
    rows = conn.execute(
        select(AuditEvent).where(*where).order_by(AuditEvent.id.desc()).limit(limit).offset(offset)
    ).all()
    return [
        AuditRow(r.id, r.at, r.channel, r.actor, r.action, r.target, r.source, r.outcome, r.detail)
        for r in rows
    ], total
