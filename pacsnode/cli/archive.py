"""The archive on the command line: ``pacsnode studies`` and ``pacsnode exports``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pacsnode.cli.common import cli_actor, err, node_settings, out
from pacsnode.db import audit

exports_app = typer.Typer(
    help="Results owed to destinations (C-STORE exports). Without a command: list them, "
    "newest first; `retry` re-queues failed ones."
)


def studies(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    patient_id: Annotated[str | None, typer.Option(help="exact Patient ID")] = None,
    accession: Annotated[str | None, typer.Option(help="exact Accession Number")] = None,
    modality: Annotated[str | None, typer.Option(help="with a series of this modality")] = None,
    date_from: Annotated[str | None, typer.Option(help="Study Date from (YYYYMMDD)")] = None,
    date_to: Annotated[str | None, typer.Option(help="Study Date to (YYYYMMDD)")] = None,
    status: Annotated[
        str | None, typer.Option(help="receiving|pending|queued|running|succeeded|failed")
    ] = None,
) -> None:
    """List received studies, most recent first."""
    from pacsnode.db.queries import STUDY_STATUSES, StudyFilter, list_studies
    from pacsnode.db.session import create_db_engine

    for name, value in (("date-from", date_from), ("date-to", date_to)):
        if value is not None and not (len(value) == 8 and value.isdigit()):
            err.print(f"[red]pacsnode studies: --{name}: expected YYYYMMDD[/red]")
            raise typer.Exit(2)
    if status is not None and status not in STUDY_STATUSES:
        err.print(f"[red]pacsnode studies: --status: one of {', '.join(STUDY_STATUSES)}[/red]")
        raise typer.Exit(2)
    settings = node_settings()
    engine = create_db_engine(settings.effective_database_url)
    flt = StudyFilter(patient_id, accession, modality, date_from, date_to, status)
    with engine.connect() as conn:
        page = list_studies(conn, flt, limit=limit, offset=offset)
    rows = page.items
    if as_json:
        for row in rows:
            print(json.dumps(row.as_json()))
        return
    table = Table(title=f"Studies ({len(rows)} of {page.total})")
    for column in (
        "Study Instance UID",
        "Patient ID",
        "Date",
        "Accession",
        "Modalities",
        "Series",
        "Instances",
        "MB",
        "Status",
        "Last received (UTC)",
    ):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.study_instance_uid,
            row.patient_id,
            row.study_date,
            row.accession_number,
            ",".join(row.modalities),
            str(row.series_count),
            str(row.instance_count),
            f"{row.size_bytes / 1e6:.1f}",
            row.status,
            _when(row.last_received_at),
        )
    out.print(table)


def _check_state(state: str | None, allowed: tuple[str, ...]) -> None:
    if state is not None and state not in allowed:
        err.print(
            f"[red]pacsnode exports: unknown state {state!r} (one of {', '.join(allowed)})[/red]",
            highlight=False,
        )
        raise typer.Exit(2)


def _when(value: datetime | None) -> str:
    from pacsnode.db.exports import utc

    return "-" if value is None else utc(value).strftime("%Y-%m-%d %H:%M:%S")


@exports_app.callback(invoke_without_command=True)
def exports_list(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="pending|sending|retrying|sent|failed")] = None,
    destination: Annotated[str | None, typer.Option(help="destination name")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    offset: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """List exports, newest first (one row per output object and destination)."""
    if ctx.invoked_subcommand is not None:
        return
    from pacsnode.db.exports import STATES, counts, list_exports
    from pacsnode.db.session import create_db_engine

    _check_state(state, STATES)
    engine = create_db_engine(node_settings().effective_database_url)
    with engine.connect() as conn:
        rows = list_exports(conn, state=state, destination=destination, limit=limit, offset=offset)
        totals = counts(conn)
    if as_json:
        for row in rows:
            print(json.dumps(row.as_json()))
        return
    summary = ", ".join(f"{totals.get(s, 0)} {s}" for s in STATES if totals.get(s))
    table = Table(title=f"Exports ({len(rows)} shown; {summary or 'none'})")
    for column in (
        "ID", "SOP Instance UID", "Destination", "Address", "State", "Tries",
        "Next try (UTC)", "Deadline (UTC)", "Sent (UTC)", "Last error",
    ):  # fmt: skip
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row.id), row.sop_instance_uid, row.destination,
            row.address, row.state, str(row.attempts),
            _when(row.next_attempt_at), _when(row.deadline_at), _when(row.sent_at),
            row.last_error + (f" [0x{row.last_status:04X}]" if row.last_status else ""),
        )  # fmt: skip
    Console(width=max(out.width, 160)).print(table)


@exports_app.command("retry")
def exports_retry(
    ids: Annotated[list[int] | None, typer.Option("--id", help="export id (repeatable)")] = None,
    state: Annotated[str, typer.Option(help="failed, or retrying to try at once")] = "failed",
    destination: Annotated[str | None, typer.Option(help="destination name")] = None,
) -> None:
    """Re-queue exports (failed ones by default) with a new deadline; a worker sends them soon."""
    from pacsnode.db.exports import RETRYABLE_STATES, known_destinations, retry_exports
    from pacsnode.db.session import create_db_engine

    _check_state(state, RETRYABLE_STATES)
    settings = node_settings()
    now = datetime.now(UTC)
    engine = create_db_engine(settings.effective_database_url)
    with engine.begin() as conn:
        count = retry_exports(
            conn,
            now=now,
            deadline=now + timedelta(seconds=settings.exports.deadline_s),
            ids=ids or None,
            state=state,
            destination=destination,
            refresh=known_destinations(settings),
        )
        detail = {"ids": ids, "state": state, "destination": destination, "count": count}
        audit.record(conn, cli_actor(), "exports.retry", detail=detail)
    out.print(f"re-queued {count} export(s)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add studies and exports to the ``pacsnode`` app."""
    app.command()(studies)
    app.add_typer(exports_app, name="exports")
