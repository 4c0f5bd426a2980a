"""The export queue: one row per (output object, destination) (docs/architecture.md §3, exports).

The database is the queue. The pipeline's export stage calls
:func:`enqueue_exports`; the ``export_due`` task (:func:`scp.export.run_due`)
claims due rows a destination at a time, sends them and records each outcome;
the dispatcher publishes that task while due rows exist, so a broker outage
delays exports and loses none. This module is the only writer of
``export.state``:

    pending ──claim──▶ sending ──mark_sent──▶ sent
                          │
                          └──mark_failed──▶ retrying ──(due)──claim──▶ sending …
                                        └─▶ failed   (at or past the deadline)
    failed | retrying ──retry_exports──▶ pending

Claims are exclusive: an ``UPDATE … WHERE id IN (…) AND <still due>
RETURNING id`` takes only rows nobody else took (SQLite serialises writers;
on PostgreSQL the candidates are also selected ``FOR UPDATE SKIP LOCKED``).
``claimed_at`` is the claim's token: an outcome is recorded only while the row
is still ``sending`` under that claim. A row ``sending`` for longer than the
lease lost its worker and is due again, so a crashed worker loses nothing; its
batch may then reach the destination twice (at-least-once; a PACS takes a
repeated SOP Instance UID as the same object).

Every function takes the caller's connection and ``now`` (UTC), so tests can
move time forward without sleeping.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from pacsnode.core.errors import InvalidRequest
from pacsnode.core.settings import SENDER, Destination, ExportPolicy, Settings
from pacsnode.core.states import DUE_EXPORT_STATES, RETRYABLE_EXPORT_STATES, ExportState
from pacsnode.core.taskdefs import EXPORT_LEASE_S
from pacsnode.db import audit
from pacsnode.db.models import Export, Instance

log = logging.getLogger(__name__)

# The states as the API and CLI accept them.
STATES = tuple(s.value for s in ExportState)
RETRYABLE_STATES = tuple(s.value for s in RETRYABLE_EXPORT_STATES)
# A claim older than this lost its worker: the export_due task's hard time
# limit plus a minute (pacsnode.core.taskdefs).
LEASE_S = EXPORT_LEASE_S
ERROR_MAX = 256


def utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes (stored as UTC): make them aware."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# --- choosing destinations -----------------------------------------------------


def known_destinations(settings: Settings) -> dict[str, Destination]:
    """Every destination by name: configured ones and peers with a port
    (``peer-<AE>``, what ``@sender`` resolves to)."""
    known = {d.name: d for d in settings.destinations}
    for peer in settings.peers:
        dest = settings.sender_destination(peer.ae_title)
        if dest is not None:
            known.setdefault(dest.name, dest)
    return known


def destinations_for(
    settings: Settings, model_name: str, calling_ae_title: str
) -> list[Destination]:
    """Where the outputs of ``model_name`` for a study sent by
    ``calling_ae_title`` go, in rule order, each address once.

    ``@sender`` resolves to the sending peer (it needs a ``port``); when it
    cannot, that destination is skipped with a warning naming the AE title.
    """
    chosen: dict[str, Destination] = {}
    for rule in settings.exports.rules:
        if not rule.matches(model_name, calling_ae_title):
            continue
        for name in rule.destinations:
            dest = (
                settings.sender_destination(calling_ae_title)
                if name == SENDER
                else settings.destination(name)
            )
            if dest is None:
                log.warning(
                    "export of %s results: %s cannot be resolved for calling AE %r "
                    "(not a configured peer, or the peer has no port): skipped",
                    model_name,
                    name,
                    calling_ae_title.strip(),
                )
                continue
            chosen.setdefault(dest.address, dest)
    return list(chosen.values())


# --- enqueue -------------------------------------------------------------------


def _address(dest: Destination) -> dict[str, Any]:
    """The row's copy of where ``dest`` is: AE title, host and port, or the
    URL (with an empty AE title and host, port 0)."""
    return {
        "ae_title": dest.ae_title or "",
        "host": dest.host or "",
        "port": dest.port or 0,
        "url": dest.url,
    }


def row_destination(name: str, ae_title: str, host: str, port: int, url: str | None) -> Destination:
    """The destination a row says it goes to (validated when enqueued; a
    later configuration change must not wedge the row). Without TLS or
    credentials: :func:`scp.export.run_due` adds the configured ones."""
    if url:
        return Destination.model_construct(name=name, url=url)
    return Destination.model_construct(name=name, ae_title=ae_title, host=host, port=port)


def enqueue_exports(
    conn: Connection,
    *,
    job_id: int | None,
    instance_pks: Sequence[int],
    destinations: Sequence[Destination],
    now: datetime,
    deadline: datetime,
) -> list[int]:
    """Owe every instance to every destination; return the ids of the rows
    created (empty when all existed).

    Idempotent: (instance, destination name) is unique, and an existing row
    is left exactly as it is: sent stays sent, failed stays failed until
    :func:`retry_exports`. So a re-run of a job never sends twice.
    """
    insert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[conn.dialect.name]
    created = []
    for instance_pk in dict.fromkeys(instance_pks):
        for dest in destinations:
            stmt = (
                insert(Export)
                .values(
                    instance_pk=instance_pk,
                    job_pk=job_id,
                    destination=dest.name,
                    **_address(dest),
                    state=ExportState.PENDING,
                    attempts=0,
                    created_at=now,
                    next_attempt_at=now,
                    deadline_at=deadline,
                    last_error="",
                )
                .on_conflict_do_nothing(index_elements=["instance_pk", "destination"])
                .returning(Export.id)
            )
            new_id = conn.execute(stmt).scalar_one_or_none()
            if new_id is not None:
                created.append(int(new_id))
    return created


# --- claiming and recording outcomes ---------------------------------------------


def _due(now: datetime, lease_s: float) -> ColumnElement[bool]:
    """Due: waiting and its time has come, or claimed by a worker that lost it."""
    return or_(
        and_(Export.state.in_(DUE_EXPORT_STATES), Export.next_attempt_at <= now),
        and_(
            Export.state == ExportState.SENDING,
            Export.claimed_at < now - timedelta(seconds=lease_s),
        ),
    )


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """What became of one object sent to a destination: ``sent`` (stored,
    possibly with a warning), or why not, in a few words (UIDs, never patient
    data). ``reached``: False when the destination could not be reached at
    all (its other rows wait for their backoff). ``permanent``: the
    destination refused for good, so the row fails now instead of retrying."""

    sent: bool
    status: int | None = None  # DIMSE status, or STOW-RS Failure/Warning Reason, if one came
    reason: str = ""
    reached: bool = True
    permanent: bool = False


@dataclass(frozen=True, slots=True)
class ClaimedExport:
    id: int
    instance_pk: int
    sop_instance_uid: str
    path: str  # relative to the spool directory
    attempts: int  # including this one


@dataclass(frozen=True, slots=True)
class Claim:
    """Due rows of one destination, now ``sending`` under ``claimed_at``."""

    destination: Destination
    claimed_at: datetime
    items: list[ClaimedExport]


def claim_due(
    conn: Connection,
    *,
    now: datetime,
    limit: int = 50,
    lease_s: float = LEASE_S,
    exclude: Collection[str] = (),
) -> Claim | None:
    """Claim up to ``limit`` due rows of one destination (the one waiting
    longest, not in ``exclude``) for one association; None if nothing is due.

    Each claim counts as an attempt. Commit right after: the claim protects
    the rows only once other workers can see it.
    """
    due = _due(now, lease_s)
    if exclude:
        due = and_(due, Export.destination.not_in(list(exclude)))
    # On SQLite another worker may claim the rows between our SELECT and our
    # UPDATE (which then matches none): look again. On PostgreSQL the rows
    # are locked from the first SELECT on, so the first round succeeds.
    for _ in range(_CLAIM_ROUNDS):
        first = conn.execute(
            select(Export.destination, Export.ae_title, Export.host, Export.port, Export.url)
            .where(due)
            .order_by(Export.next_attempt_at, Export.id)
            .limit(1)
            .with_for_update(skip_locked=True)  # ignored by SQLite, which serialises writers
        ).first()
        if first is None:
            return None
        name, ae_title, host, port, url = first
        # The same name and address: a row enqueued before a configuration
        # change keeps going where it says it goes.
        same = (
            Export.destination == name,
            Export.ae_title == ae_title,
            Export.host == host,
            Export.port == port,
            Export.url.is_(None) if url is None else Export.url == url,
        )
        candidates = select(Export.id).where(due, *same)
        candidates = candidates.order_by(Export.next_attempt_at, Export.id).limit(limit)
        ids = list(conn.execute(candidates.with_for_update(skip_locked=True)).scalars())
        claimed = list(
            conn.execute(
                update(Export)
                .where(Export.id.in_(ids), due)
                .values(state=ExportState.SENDING, claimed_at=now, attempts=Export.attempts + 1)
                .returning(Export.id)
            ).scalars()
        )
        if claimed:
            destination = row_destination(name, ae_title, host, port, url)
            return Claim(destination, now, _claimed_items(conn, claimed))
    return None


_CLAIM_ROUNDS = 5


def _claimed_items(conn: Connection, ids: Sequence[int]) -> list[ClaimedExport]:
    rows = conn.execute(
        select(
            Export.id, Export.instance_pk, Instance.sop_instance_uid, Instance.path, Export.attempts
        )
        .join(Instance, Instance.id == Export.instance_pk)
        .where(Export.id.in_(ids))
        .order_by(Export.id)
    )
    return [ClaimedExport(int(r[0]), int(r[1]), r[2], r[3], int(r[4])) for r in rows]


def _claimed(export_id: int, claimed_at: datetime) -> tuple[ColumnElement[bool], ...]:
    return (
        Export.id == export_id,
        Export.state == ExportState.SENDING,
        Export.claimed_at == claimed_at,
    )


def mark_sent(
    conn: Connection,
    export_id: int,
    *,
    claimed_at: datetime,
    now: datetime,
    status: int | None = 0,
) -> bool:
    """The destination stored the object (Success or Warning ``status``).
    False if the claim was lost (the row was re-claimed meanwhile)."""
    row = conn.execute(
        update(Export)
        .where(*_claimed(export_id, claimed_at))
        .values(
            state=ExportState.SENT,
            sent_at=now,
            next_attempt_at=None,
            last_status=status,
            last_error="",
        )
        .returning(
            Export.destination,
            Export.ae_title,
            Export.host,
            Export.port,
            Export.url,
            Export.attempts,
        )
    ).first()
    if row is None:
        return False
    _audit(conn, export_id, row, now, ExportState.SENT, status, "")
    return True


def _audit(
    conn: Connection,
    export_id: int,
    row: Any,
    now: datetime,
    outcome: str,
    status: int | None,
    reason: str,
) -> None:
    """The export attempt's audit row, in the transaction that records it."""
    destination, ae_title, host, port, url, attempts = row
    address = row_destination(destination, ae_title, host, port, url).address
    audit.record(
        conn,
        audit.Actor("export", f"node->{destination}", address[:96]),
        "export.attempt",
        target=f"export:{export_id}",
        outcome=outcome,
        detail={"attempt": attempts, "status": status, "reason": reason},
        at=now,
    )


def spread() -> float:
    """A jitter draw in [-1, 1]: one per batch, see :func:`backoff_s`."""
    return random.uniform(-1.0, 1.0)


def backoff_s(policy: ExportPolicy, attempts: int, draw: float | None = None) -> float:
    """Delay before the next try after ``attempts`` failed ones: exponential
    from ``initial_backoff_s``, capped at ``max_backoff_s``, then moved by
    ``jitter * draw`` (in [-1, 1]; random when None), so that workers and
    destinations that failed at the same moment do not all return at the same
    moment. Always within base * [1 - jitter, 1 + jitter].

    The rows of one batch share one draw: they failed together (usually the
    destination was down) and should return together, on one association.
    """
    exponent = min(max(attempts - 1, 0), 64)
    base = min(policy.initial_backoff_s * 2.0**exponent, policy.max_backoff_s)
    return base * (1.0 + policy.jitter * (spread() if draw is None else draw))


def mark_failed(
    conn: Connection,
    export_id: int,
    *,
    claimed_at: datetime,
    now: datetime,
    policy: ExportPolicy,
    reason: str,
    status: int | None = None,
    draw: float | None = None,
    permanent: bool = False,
) -> str | None:
    """Record a failed try: ``retrying`` with the next attempt after a
    backoff (never later than the deadline, so the last try happens at it),
    or ``failed`` when the deadline has passed or the destination refused
    for good (``permanent``: the same request would get the same answer).
    ``reason`` must be short and free of patient data; ``draw`` is the
    batch's jitter (:func:`backoff_s`).
    Returns the new state, None if the claim was lost."""
    row = conn.execute(
        select(
            Export.attempts,
            Export.deadline_at,
            Export.destination,
            Export.ae_title,
            Export.host,
            Export.port,
            Export.url,
        ).where(*_claimed(export_id, claimed_at))
    ).first()
    if row is None:
        return None
    attempts, deadline = int(row[0]), utc(row[1])
    values: dict[str, Any] = {"last_error": reason[:ERROR_MAX], "last_status": status}
    if now >= deadline or permanent:
        values.update(state=ExportState.FAILED, next_attempt_at=None)
    else:
        delay = timedelta(seconds=backoff_s(policy, attempts, draw))
        values.update(state=ExportState.RETRYING, next_attempt_at=min(now + delay, deadline))
    result = conn.execute(update(Export).where(*_claimed(export_id, claimed_at)).values(**values))
    if not result.rowcount:
        return None
    audit_row = (row[2], row[3], row[4], row[5], row[6], attempts)
    _audit(conn, export_id, audit_row, now, str(values["state"]), status, reason[:ERROR_MAX])
    return str(values["state"])


# --- operator actions and queries ---------------------------------------------------


def retry_exports(
    conn: Connection,
    *,
    now: datetime,
    deadline: datetime,
    ids: Sequence[int] | None = None,
    state: str = ExportState.FAILED,
    destination: str | None = None,
    refresh: Mapping[str, Destination] | None = None,
) -> int:
    """Put ``failed`` (or, to try at once, ``retrying``) rows back to
    ``pending``, due now, with a new ``deadline`` and a fresh backoff;
    return how many. Filter by ``ids`` and ``destination``. With
    ``refresh`` (:func:`known_destinations`) a row takes its destination's
    current AE title, host and port or URL, so a corrected configuration
    applies."""
    if state not in RETRYABLE_STATES:
        raise InvalidRequest(f"only {' or '.join(RETRYABLE_STATES)} exports can be retried")
    where: list[ColumnElement[bool]] = [Export.state == state]
    if ids is not None:
        where.append(Export.id.in_(list(ids)))
    if destination is not None:
        where.append(Export.destination == destination)
    values: dict[str, Any] = {
        "state": ExportState.PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "deadline_at": deadline,
        "claimed_at": None,
    }
    count = 0
    names = [
        str(n) for n in conn.execute(select(Export.destination).where(*where).distinct()).scalars()
    ]
    for name in names:
        dest = (refresh or {}).get(name)
        address = {} if dest is None else _address(dest)
        result = conn.execute(
            update(Export).where(*where, Export.destination == name).values(**values, **address)
        )
        count += int(result.rowcount or 0)
    return count


@dataclass(frozen=True, slots=True)
class ExportRow:
    """One export as listed by ``pacsnode exports`` (UIDs, never patient data)."""

    id: int
    sop_instance_uid: str
    sop_class_uid: str
    job_pk: int | None
    destination: str
    ae_title: str
    host: str
    port: int
    url: str | None
    state: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None
    sent_at: datetime | None
    deadline_at: datetime
    last_error: str
    last_status: int | None

    @property
    def address(self) -> str:
        """``AE@host:port``, or the DICOMweb URL."""
        return self.url or f"{self.ae_title}@{self.host}:{self.port}"

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["address"] = self.address
        for key, value in data.items():
            if isinstance(value, datetime):
                data[key] = utc(value).isoformat()
        return data


def list_exports(
    conn: Connection,
    *,
    state: str | None = None,
    destination: str | None = None,
    limit: int = 200,
    offset: int = 0,
) -> list[ExportRow]:
    """Exports, newest first, optionally of one state and destination."""
    stmt = (
        select(
            Export.id,
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Export.job_pk,
            Export.destination,
            Export.ae_title,
            Export.host,
            Export.port,
            Export.url,
            Export.state,
            Export.attempts,
            Export.created_at,
            Export.next_attempt_at,
            Export.sent_at,
            Export.deadline_at,
            Export.last_error,
            Export.last_status,
        )
        .join(Instance, Instance.id == Export.instance_pk)
        .order_by(Export.id.desc())
        .limit(limit)
        .offset(offset)
    )
    if state is not None:
        stmt = stmt.where(Export.state == state)
    if destination is not None:
        stmt = stmt.where(Export.destination == destination)
    return [ExportRow(**row._asdict()) for row in conn.execute(stmt)]


def counts(conn: Connection) -> dict[str, int]:
    rows = conn.execute(select(Export.state, func.count()).group_by(Export.state))
    return {state: int(n) for state, n in rows}


def due_keys(
    conn: Connection, *, now: datetime, lease_s: float = LEASE_S, limit: int = 1000
) -> frozenset[tuple[Any, ...]]:
    """What is due now, one key per row and state change (id, next attempt,
    claim): a key the dispatcher has not seen before means work its last
    message may not cover."""
    rows = conn.execute(
        select(Export.id, Export.next_attempt_at, Export.claimed_at)
        .where(_due(now, lease_s))
        .order_by(Export.next_attempt_at, Export.id)
        .limit(limit)
    )
    return frozenset(tuple(row) for row in rows)
