"""Running the node: ``pacsnode serve``, ``worker``, ``echo``, ``db upgrade``,
``config show``."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
import yaml

from pacsnode.cli.common import err, node_settings, out, scu_failure

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)


def serve(
    worker: Annotated[
        bool, typer.Option(help="also run a Celery worker for both queues in this node")
    ] = True,
) -> None:
    """Run the node: migrate the database, then serve DICOM until stopped."""
    from pacsnode.serve import serve as run

    settings = node_settings()
    sys.exit(run(settings, embedded_worker=worker))


def worker(
    queues: Annotated[str, typer.Option(help="comma-separated: cpu, gpu")] = "cpu,gpu",
    concurrency: Annotated[int, typer.Option(min=1, max=64)] = 1,
) -> None:
    """Run a Celery worker for pacsnode's queues (e.g. --queues gpu on a GPU machine)."""
    from pacsnode.core.logs import configure_logging
    from pacsnode.serve import worker_argv

    settings = node_settings()
    unknown = set(queues.split(",")) - {"cpu", "gpu"}
    if unknown:
        err.print(f"[red]pacsnode worker: unknown queue(s) {sorted(unknown)}[/red]")
        raise typer.Exit(2)
    configure_logging(settings.log_level, "worker", settings.log_format)
    from pacsnode.core.errors import ConfigError
    from pacsnode.workers.celery_app import check_embedded_broker

    try:
        warning = check_embedded_broker(settings)
    except ConfigError as exc:
        err.print(f"pacsnode worker: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    if warning:
        err.print(f"pacsnode worker: {warning}", markup=False, highlight=False)
    from pacsnode.workers.tasks import app as celery_app

    celery_app.worker_main(argv=worker_argv(queues, concurrency, settings.log_level))


def echo(
    target: Annotated[str, typer.Argument(help="AE@HOST:PORT of the peer to verify")],
    timeout: Annotated[float, typer.Option(help="seconds to wait for the peer")] = 10.0,
    calling_ae: Annotated[
        str | None, typer.Option(help="our AE title (default: the node's ae_title)")
    ] = None,
) -> None:
    """Send a C-ECHO (verification) from pacsnode's AE title to a peer."""
    from pacsnode.core.errors import ScuError
    from pacsnode.scp.echo import echo as send_echo
    from pacsnode.scp.echo import parse_target

    settings = node_settings()
    try:
        ae_title, host, port = parse_target(target)
        elapsed = send_echo(calling_ae or settings.ae_title, ae_title, host, port, timeout)
    except (ScuError, ValueError) as exc:
        reason = scu_failure(exc, calling_ae or settings.ae_title)
        err.print(f"[red]C-ECHO {target}: {reason}[/red]", highlight=False)
        raise typer.Exit(1) from None
    out.print(f"C-ECHO {target}: success ({elapsed * 1000:.0f} ms)", highlight=False)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database schema to the newest revision."""
    from pacsnode.db.migrate import upgrade
    from pacsnode.db.session import create_db_engine

    settings = node_settings()
    revision = upgrade(create_db_engine(settings.effective_database_url))
    out.print(f"database at revision {revision}", highlight=False)


@config_app.command("show")
def config_show(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Print the effective configuration (defaults, YAML file, environment); secrets masked."""
    data = node_settings().public_dict()
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")


def register(app: typer.Typer) -> None:
    """Add serve, worker, echo, db and config to the ``pacsnode`` app."""
    app.command()(serve)
    app.command()(worker)
    app.command()(echo)
    app.add_typer(db_app, name="db")
    app.add_typer(config_app, name="config")
