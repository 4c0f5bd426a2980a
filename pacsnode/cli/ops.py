"""Operations commands: ``pacsnode cleanup`` (retention) and ``pacsnode healthcheck``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pacsnode.cli.common import err, node_settings, out
from pacsnode.core.errors import ConfigError
from pacsnode.core.settings import Settings


def cleanup(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="report what would be deleted; delete nothing")
    ] = False,
    keep_days: Annotated[
        float | None,
        typer.Option(min=0.0, help="override retention.keep_days for this run"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON line per study")] = False,
) -> None:
    """Delete studies older than the retention window (retention.keep_days).

    Never deletes a study that is still being received, has a job that is not
    finished, or has a result not yet sent to its destinations; those are
    listed with the reason they were kept.
    """
    from pacsnode.db.retention import apply_retention, summarize
    from pacsnode.db.session import create_db_engine

    settings = node_settings()
    days = keep_days if keep_days is not None else settings.retention.keep_days
    if days is None:
        out.print("retention disabled (retention.keep_days is not set): nothing deleted")
        return
    cutoff = datetime.now(UTC) - timedelta(days=days)
    engine = create_db_engine(settings.effective_database_url)
    verdicts = apply_retention(
        engine,
        data_dir=settings.data_dir,
        spool_dir=settings.spool_dir,
        cutoff=cutoff,
        discard_failed_exports=settings.retention.discard_failed_exports,
        dry_run=dry_run,
    )
    engine.dispose()
    if as_json:
        for verdict in verdicts:
            print(json.dumps(verdict.as_json()))
        return
    verb = "would delete" if dry_run else "deleted"
    table = Table(title=f"Studies last received before {cutoff:%Y-%m-%d %H:%M} UTC")
    for column in ("Study Instance UID", "Last received (UTC)", "Instances", "MB", "Outcome"):
        table.add_column(column)
    for v in verdicts:
        outcome = (
            verb
            if (v.deletable if dry_run else v.deleted)
            else "kept: " + "; ".join(v.keep_reasons)
        )
        table.add_row(
            v.study_instance_uid,
            v.last_received_at.strftime("%Y-%m-%d %H:%M:%S"),
            str(v.instances),
            f"{v.size_bytes / 1e6:.1f}",
            outcome,
        )
    if verdicts:
        Console(width=max(out.width, 160)).print(table)
    total = summarize(verdicts, dry_run)
    kept = sum(1 for v in verdicts if not (v.deletable if dry_run else v.deleted))
    out.print(
        f"{verb} {total['studies']} studies ({total['instances']} instances, "
        f"{total['bytes'] / 1e6:.1f} MB); kept {kept}",
        highlight=False,
    )


def healthcheck(
    dicom: Annotated[
        bool, typer.Option(help="also check that this host's SCP answers an association")
    ] = True,
    timeout: Annotated[float, typer.Option(help="seconds per check")] = 5.0,
) -> None:
    """Check the node's health (for containers): exit 0 or 1.

    Healthy: the database is reachable at the newest schema revision, the
    broker (if configured) answers and, with --dicom, the local SCP answers an
    A-ASSOCIATE-RQ.
    """
    problems = []
    settings = node_settings()
    try:
        _check_database(settings)
    except Exception as exc:
        problems.append(f"database: {exc}")
    if settings.broker_url:
        try:
            _check_broker(settings.broker_url, timeout)
        except Exception as exc:
            problems.append(f"broker: {type(exc).__name__}: {exc}")
    if dicom:
        try:
            _check_dicom(settings, timeout)
        except Exception as exc:
            problems.append(f"DICOM: {exc}")
    if problems:
        for problem in problems:
            err.print(f"[red]unhealthy: {problem}[/red]", highlight=False)
        raise typer.Exit(1)
    out.print("healthy", highlight=False)


def _check_database(settings: Settings) -> None:
    from pacsnode.db.migrate import current_revision, head_revision
    from pacsnode.db.session import create_db_engine

    engine = create_db_engine(settings.effective_database_url)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    if current != head_revision():
        raise ConfigError(f"schema at {current}, expected {head_revision()} (pacsnode db upgrade)")


def _check_broker(url: str, timeout: float) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=timeout) as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)


def _check_dicom(settings: Settings, timeout: float) -> None:
    """An A-ASSOCIATE-RQ from the node's own AE title to its own port. Either
    answer (accepted: then a C-ECHO; or rejected by the peer policy, as the
    node's AE title is rarely a configured peer) shows that an SCP process
    read the request and ran its policy: the node is serving, not just
    holding a listening socket."""
    from pacsnode.core.errors import AssociationRejected, NoAssociation, ScuError
    from pacsnode.scp.echo import echo

    host = settings.dicom_host if settings.dicom_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    try:
        echo(settings.ae_title, settings.ae_title, host, settings.dicom_port, timeout)
    except AssociationRejected:
        return
    except NoAssociation:
        raise ConnectionError(f"no answer from {host}:{settings.dicom_port}") from None
    except ScuError:
        raise ConnectionError("C-ECHO failed") from None


def register(app: typer.Typer) -> None:
    """Add cleanup and healthcheck to the ``pacsnode`` app."""
    app.command()(cleanup)
    app.command()(healthcheck)
