"""The ``pacsnode`` command line."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from pacsnode.errors import ConfigError
from pacsnode.settings import Settings, load_settings

app = typer.Typer(
    help="pacsnode: an AI node beside your PACS. Not a medical device; bundled "
    "models are for demonstration and testing.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")

out = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        err.print(f"[red]pacsnode: {exc}[/red]", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def serve() -> None:
    """Run the node: migrate the database, then serve DICOM until stopped."""
    from pacsnode.serve import serve as run

    settings = _settings()
    sys.exit(run(settings))


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="comma-separated: cpu, gpu")] = "cpu,gpu",
    concurrency: Annotated[int, typer.Option(min=1, max=64)] = 1,
) -> None:
    """Run a Celery worker for pacsnode's queues (e.g. --queues gpu on a GPU machine)."""
    from pacsnode.logs import configure_logging
    from pacsnode.serve import worker_argv

    settings = _settings()
    unknown = set(queues.split(",")) - {"cpu", "gpu"}
    if unknown:
        err.print(f"[red]pacsnode worker: unknown queue(s) {sorted(unknown)}[/red]")
        raise typer.Exit(2)
    configure_logging(settings.log_level, process_name="worker")
    from workers.tasks import app as celery_app

    celery_app.worker_main(argv=worker_argv(queues, concurrency, settings.log_level))


@app.command()
def echo(
    target: Annotated[str, typer.Argument(help="AE@HOST:PORT of the peer to verify")],
    timeout: Annotated[float, typer.Option(help="seconds to wait for the peer")] = 10.0,
) -> None:
    """Send a C-ECHO (verification) from pacsnode's AE title to a peer."""
    from scp.echo import EchoError, parse_target
    from scp.echo import echo as send_echo

    settings = _settings()
    try:
        ae_title, host, port = parse_target(target)
        elapsed = send_echo(settings.ae_title, ae_title, host, port, timeout)
    except (EchoError, ValueError) as exc:
        err.print(f"[red]C-ECHO {target}: {exc}[/red]", highlight=False)
        raise typer.Exit(1) from None
    out.print(f"C-ECHO {target}: success ({elapsed * 1000:.0f} ms)", highlight=False)


@app.command()
def studies(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    patient_id: Annotated[str | None, typer.Option(help="exact Patient ID")] = None,
    accession: Annotated[str | None, typer.Option(help="exact Accession Number")] = None,
    modality: Annotated[str | None, typer.Option(help="with a series of this modality")] = None,
) -> None:
    """List received studies, most recent first."""
    from db.queries import list_studies
    from db.session import create_db_engine

    settings = _settings()
    engine = create_db_engine(settings.effective_database_url)
    rows = list_studies(
        engine,
        limit=limit,
        offset=offset,
        patient_id=patient_id,
        accession_number=accession,
        modality=modality,
    )
    if as_json:
        for row in rows:
            print(json.dumps(row.as_json()))
        return
    table = Table(title=f"Studies ({len(rows)} shown)")
    for column in (
        "Study Instance UID",
        "Patient ID",
        "Date",
        "Accession",
        "Modalities",
        "Series",
        "Instances",
        "MB",
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
            row.last_received_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    out.print(table)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database schema to the newest revision."""
    from db.migrate import upgrade
    from db.session import create_db_engine

    settings = _settings()
    revision = upgrade(create_db_engine(settings.effective_database_url))
    out.print(f"database at revision {revision}", highlight=False)


@config_app.command("show")
def config_show(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Print the effective configuration (defaults, YAML file, environment); secrets masked."""
    data = _settings().public_dict()
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")


def main() -> None:
    app()
