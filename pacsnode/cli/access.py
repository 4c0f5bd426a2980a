"""API access on the command line: ``pacsnode tokens create|list|revoke``
and ``pacsnode api`` (the admin API, dashboard and /metrics alone)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Annotated

import typer

from pacsnode.cli.common import (
    AsJson,
    choice,
    cli_actor,
    err,
    fail,
    node_engine,
    node_settings,
    out,
    print_table,
    when,
)
from pacsnode.db import audit

tokens_app = typer.Typer(help="Bearer tokens of the admin API.", no_args_is_help=True)


@tokens_app.command("create")
def tokens_create(
    role: Annotated[
        str,
        typer.Option(
            help="read (queries, DICOMweb QIDO/WADO), admin (queries and actions) "
            "or store (DICOMweb STOW-RS only)"
        ),
    ],
    name: Annotated[str, typer.Option(help="who or what uses it (shown in the audit trail)")] = "",
) -> None:
    """Create an API token and print it once (only its SHA-256 is stored)."""
    from pacsnode.db.tokens import ROLES, create_token

    choice("role", role, ROLES)
    name = name.strip() or f"{role}-{datetime.now(UTC):%Y%m%d%H%M%S}"
    if len(name) > 64:
        raise fail("--name: at most 64 characters")
    with node_engine(node_settings()).begin() as conn:
        token_id, token = create_token(conn, role, name)
        audit.record(
            conn,
            cli_actor(),
            "tokens.create",
            target=f"token:{name}",
            detail={"id": token_id, "role": role},
        )
    print(token)
    err.print(
        f"token {token_id} ({name}, {role}): store it now, it cannot be shown again",
        highlight=False,
    )


@tokens_app.command("list")
def tokens_list(as_json: AsJson = False) -> None:
    """Tokens (names and roles; never the tokens themselves)."""
    from pacsnode.db.tokens import list_tokens

    with node_engine(node_settings()).connect() as conn:
        rows = list_tokens(conn)
    if as_json:
        for r in rows:
            print(
                json.dumps(
                    {
                        "id": r.id,
                        "name": r.name,
                        "role": r.role,
                        "revoked": r.revoked_at is not None,
                    }
                )
            )
        return
    print_table(
        rows,
        len(rows),
        "Tokens",
        {
            "ID": lambda r: r.id,
            "Name": lambda r: r.name,
            "Role": lambda r: r.role,
            "Created (UTC)": lambda r: when(r.created_at),
            "Revoked": lambda r: when(r.revoked_at),
        },
    )


@tokens_app.command("revoke")
def tokens_revoke(token_id: Annotated[int, typer.Argument(help="token id (tokens list)")]) -> None:
    """Revoke a token: it stops working at once."""
    from pacsnode.db.tokens import revoke

    with node_engine(node_settings()).begin() as conn:
        done = revoke(conn, token_id)
        if done:
            audit.record(conn, cli_actor(), "tokens.revoke", target=f"token-id:{token_id}")
    if not done:
        raise fail(f"no live token {token_id}", 1)
    out.print(f"token {token_id} revoked")


def api() -> None:
    """Serve the admin API, dashboard and /metrics alone (api.host:http_port)."""
    import signal
    import threading

    from pacsnode.apiserver import bind_api, run_api
    from pacsnode.core.logs import configure_logging
    from pacsnode.db.migrate import upgrade

    settings = node_settings()
    configure_logging(settings.log_level, process_name="api")
    upgrade(node_engine(settings))
    try:
        sock = bind_api(settings)
    except OSError as exc:
        raise fail(f"api.host/http_port: cannot listen: {exc.strerror}") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    host, port = sock.getsockname()[:2]
    print(f"pacsnode api: http://{host}:{port}", flush=True)
    run_api(settings, stop, sock)
    sys.exit(0)


def register(app: typer.Typer) -> None:
    """Add tokens and api to the ``pacsnode`` app."""
    app.add_typer(tokens_app, name="tokens")
    app.command("api")(api)
