"""What every ``pacsnode`` command shares: the one bootstrap (settings and
database engine), consoles, error exits, table and JSON printing, the audit
actor of command-line actions."""

from __future__ import annotations

import getpass
import json
import socket
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine

from pacsnode.core.errors import ConfigError
from pacsnode.core.settings import Settings, load_settings
from pacsnode.db import audit

out = Console()
err = Console(stderr=True)

Limit = Annotated[int, typer.Option(min=1, max=10_000)]
Offset = Annotated[int, typer.Option(min=0)]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON lines")]


def node_settings() -> Settings:
    """The node's settings, or exit 2 with the message that names the bad key."""
    try:
        return load_settings()
    except ConfigError as exc:
        err.print(f"[red]pacsnode: {exc}[/red]", highlight=False)
        raise typer.Exit(2) from None


def node_engine(settings: Settings) -> Engine:
    from pacsnode.db.session import create_db_engine

    return create_db_engine(settings.effective_database_url)


def cli_actor() -> audit.Actor:
    return audit.Actor("cli", f"cli:{getpass.getuser()}", socket.gethostname())


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]pacsnode: {message}[/red]", highlight=False)
    return typer.Exit(code)


def choice(name: str, value: str | None, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise fail(f"unknown {name} {value!r} (one of {', '.join(allowed)})")


def when(value: datetime | None) -> str:
    if value is None:
        return "-"
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def parse_time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise fail(f"--{name}: expected an ISO 8601 date or time, got {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def print_table(rows: list[Any], total: int, title: str, columns: dict[str, Any]) -> None:
    table = Table(title=f"{title} ({len(rows)} of {total})")
    for name in columns:
        table.add_column(name)
    for row in rows:
        table.add_row(*(str(get(row)) for get in columns.values()))
    Console(width=max(out.width, 160)).print(table)


def json_lines(rows: list[Any]) -> None:
    for row in rows:
        print(json.dumps(row.as_json()))


def scu_failure(exc: BaseException, calling_ae: str) -> str:
    """Why an outgoing association failed, for the person at the terminal:
    an A-ASSOCIATE-RJ in words with what to change
    (:func:`pacsnode.scp.status.explain_reject`), else the error's message."""
    from pacsnode.scp.scu import AssociationRejected
    from pacsnode.scp.status import explain_reject

    if isinstance(exc, AssociationRejected):
        return explain_reject(exc.result, exc.source, exc.reason, calling_ae, exc.peer.ae_title)
    return str(exc)
