"""The ``pacsnode`` command line."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from pacsnode import cli_admin, cli_ops
from pacsnode.core.errors import ConfigError
from pacsnode.core.settings import Settings, load_settings

if TYPE_CHECKING:  # the phantom generator imports numpy and scipy: only when used
    from pacsnode.lab.phantom import Study, StudySpec

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
demo_app = typer.Typer(
    help="Synthetic phantom studies (CT, PET, MR): for testing and demonstration only.",
    no_args_is_help=True,
)
app.add_typer(demo_app, name="demo")
exports_app = typer.Typer(
    help="Results owed to destinations (C-STORE exports). Without a command: list them, "
    "newest first; `retry` re-queues failed ones."
)
app.add_typer(exports_app, name="exports")
app.command()(cli_ops.cleanup)
app.command()(cli_ops.healthcheck)

out = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        err.print(f"[red]pacsnode: {exc}[/red]", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def serve(
    worker: Annotated[
        bool, typer.Option(help="also run a Celery worker for both queues in this node")
    ] = True,
) -> None:
    """Run the node: migrate the database, then serve DICOM until stopped."""
    from pacsnode.serve import serve as run

    settings = _settings()
    sys.exit(run(settings, embedded_worker=worker))


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="comma-separated: cpu, gpu")] = "cpu,gpu",
    concurrency: Annotated[int, typer.Option(min=1, max=64)] = 1,
) -> None:
    """Run a Celery worker for pacsnode's queues (e.g. --queues gpu on a GPU machine)."""
    from pacsnode.core.logs import configure_logging
    from pacsnode.serve import worker_argv

    settings = _settings()
    unknown = set(queues.split(",")) - {"cpu", "gpu"}
    if unknown:
        err.print(f"[red]pacsnode worker: unknown queue(s) {sorted(unknown)}[/red]")
        raise typer.Exit(2)
    configure_logging(settings.log_level, "worker", settings.log_format)
    from pacsnode.workers.tasks import app as celery_app

    celery_app.worker_main(argv=worker_argv(queues, concurrency, settings.log_level))


@app.command()
def echo(
    target: Annotated[str, typer.Argument(help="AE@HOST:PORT of the peer to verify")],
    timeout: Annotated[float, typer.Option(help="seconds to wait for the peer")] = 10.0,
) -> None:
    """Send a C-ECHO (verification) from pacsnode's AE title to a peer."""
    from pacsnode.scp.echo import EchoError, parse_target
    from pacsnode.scp.echo import echo as send_echo

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
    settings = _settings()
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
    engine = create_db_engine(_settings().effective_database_url)
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
            f"{row.ae_title}@{row.host}:{row.port}", row.state, str(row.attempts),
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
    settings = _settings()
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
        cli_admin.audit.record(conn, cli_admin.cli_actor(), "exports.retry", detail=detail)
    out.print(f"re-queued {count} export(s)", highlight=False)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database schema to the newest revision."""
    from pacsnode.db.migrate import upgrade
    from pacsnode.db.session import create_db_engine

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


def _demo_spec(
    modalities: str, seed: int, slices: int, size: int, lesions: int | None
) -> StudySpec:
    from pacsnode.lab.phantom import StudySpec

    chosen = tuple(dict.fromkeys(m.strip().upper() for m in modalities.split(",") if m.strip()))
    try:
        return StudySpec(seed=seed, modalities=chosen, slices=slices, size=size, lesions=lesions)
    except ValueError as exc:
        err.print(f"[red]pacsnode demo: {exc}[/red]", highlight=False)
        raise typer.Exit(2) from None


def _demo_summary(study: Study) -> str:
    counts = ", ".join(f"{key} {image.grid.shape[0]}" for key, image in study.series.items())
    return (
        f"phantom study {study.header.study_instance_uid} (synthetic, for testing and "
        f"demonstration only): {counts} instances, {len(study.lesions)} lesion(s)"
    )


_Modalities = Annotated[str, typer.Option(help="comma-separated: ct, pt, mr")]
_Seed = Annotated[int, typer.Option(min=0, help="same seed, same pixels and UIDs")]
_Slices = Annotated[int, typer.Option(min=1, max=2000, help="CT slices")]
_Size = Annotated[int, typer.Option(min=16, max=2048, help="CT rows and columns")]
_Lesions = Annotated[
    int | None,
    typer.Option(min=0, max=50, help="lesions; 0: a normal study (default: 1 to 5, from the seed)"),
]


@demo_app.command("send")
def demo_send(
    target: Annotated[str, typer.Argument(help="AE@HOST:PORT of the receiving node")],
    modalities: _Modalities = "ct,pt,mr",
    seed: _Seed = 0,
    slices: _Slices = 200,
    size: _Size = 512,
    lesions: _Lesions = None,
    calling_ae: Annotated[str, typer.Option(help="our AE title")] = "PACSNODE_DEMO",
    timeout: Annotated[float, typer.Option(help="seconds to wait for the peer")] = 30.0,
) -> None:
    """Generate a synthetic phantom study and C-STORE it (testing and demonstration only)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pacsnode.lab.phantom import generate_study, study_datasets
    from pacsnode.lab.phantom.send import SendError, send_datasets
    from pacsnode.scp.echo import parse_target

    try:
        ae_title, host, port = parse_target(target)
    except ValueError as exc:
        err.print(f"[red]pacsnode demo send: {exc}[/red]", highlight=False)
        raise typer.Exit(2) from None
    study = generate_study(_demo_spec(modalities, seed, slices, size, lesions))
    out.print(_demo_summary(study), highlight=False)
    columns = (TextColumn("C-STORE"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=out) as progress:
        task = progress.add_task("send", total=study.instance_count)
        try:
            result = send_datasets(
                study_datasets(study), study.sop_classes(), ae_title, host, port, calling_ae,
                progress=lambda n: progress.advance(task, n), timeout=timeout,
            )  # fmt: skip
        except SendError as exc:
            err.print(f"[red]C-STORE {target}: {exc}[/red]", highlight=False)
            raise typer.Exit(1) from None
    out.print(
        f"C-STORE {target}: {result.stored} stored, {len(result.failed)} failed", highlight=False
    )
    for uid, status in result.failed[:10]:
        out.print(f"  failed: instance {uid}: {status}", highlight=False)
    if len(result.failed) > 10:
        out.print(f"  ... and {len(result.failed) - 10} more", highlight=False)
    if not result.ok:
        raise typer.Exit(1)


@demo_app.command("write")
def demo_write(
    folder: Annotated[Path, typer.Argument(help="folder for the series and the ground truth")],
    modalities: _Modalities = "ct,pt,mr",
    seed: _Seed = 0,
    slices: _Slices = 200,
    size: _Size = 512,
    lesions: _Lesions = None,
) -> None:
    """Write a synthetic phantom study and its ground truth (testing and demonstration only)."""
    from pacsnode.lab.phantom import generate_study, write_study

    study = generate_study(_demo_spec(modalities, seed, slices, size, lesions))
    written = write_study(folder, study)
    out.print(_demo_summary(study), highlight=False)
    files = sum(len(paths) for paths in written.series.values())
    out.print(
        f"wrote {files} DICOM files to {folder}; ground truth in {written.truth.name} "
        f"and {written.masks.name}",
        highlight=False,
    )


# --- bundled models: training and held-out evaluation ------------------------


def _model_names(model: str, known: list[str]) -> list[str]:
    if model == "all":
        return known
    if model not in known:
        err.print(
            f"[red]pacsnode: no model {model!r} (known: {', '.join(known)}, all)[/red]",
            highlight=False,
        )
        raise typer.Exit(2)
    return [model]


def _fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"  # NaN: not applicable
    return str(value)


@app.command()
def train(
    model: Annotated[str, typer.Argument(help="a bundled model's name, or 'all'")],
    steps: Annotated[
        int | None, typer.Option(min=1, help="training steps (default: the recipe's)")
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="initialisation, order, augmentation")] = 0,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="models folder to write <model>/ into (default: models_dir)"),
    ] = None,
    tiny: Annotated[bool, typer.Option(hidden=True, help="tiny data and networks (tests)")] = False,
) -> None:
    """Train a bundled model on synthetic phantoms (for demonstration, not clinical use).

    Writes <out>/<model>/: the weights, manifest.yaml with their SHA-256, and
    training.json. Seeded: the same seed and steps give the same model up to
    floating-point rounding.
    """
    from pacsnode.lab import fusion_recipe
    from pacsnode.lab.fusion_training import train_fusion_model
    from pacsnode.lab.recipes import FULL, RECIPES, TINY, train_model

    names = _model_names(model, [*RECIPES, fusion_recipe.NAME])
    folder = out_dir if out_dir is not None else _settings().models_dir
    for name in names:
        if name == fusion_recipe.NAME:
            fusion_scale = fusion_recipe.TINY if tiny else fusion_recipe.FULL
            written = train_fusion_model(folder, steps=steps, seed=seed, scale=fusion_scale)
        else:
            written = train_model(
                name, folder, steps=steps, seed=seed, scale=TINY if tiny else FULL, progress=True
            )
        out.print(
            f"{name}: wrote {written.weights} ({written.weights_bytes / 1e6:.2f} MB, "
            f"sha256 {written.sha256[:12]}...) and {written.manifest.name} in "
            f"{written.seconds:.0f} s",
            highlight=False,
        )


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="an installed model's name, or 'all'")],
    studies: Annotated[
        int, typer.Option(min=2, max=2000, help="held-out CT studies, half with lesions")
    ] = 40,
    out_dir: Annotated[
        Path, typer.Option("--out", help="folder for <model>/report.json, roc.png, pr.png")
    ] = Path("evaluation"),
    check: Annotated[bool, typer.Option(help="exit 1 when a model misses its target")] = False,
) -> None:
    """Evaluate installed models on held-out synthetic phantoms, in inference mode."""
    from pacsnode.core.errors import ModelConfigError
    from pacsnode.lab.heldout import evaluate as run_evaluation
    from pacsnode.models.registry import Registry

    settings = _settings()
    try:
        registry = Registry.load(settings.models_dir, settings.disabled_models)
    except ModelConfigError as exc:
        err.print(f"[red]pacsnode evaluate: {exc}[/red]", highlight=False)
        raise typer.Exit(2) from None
    installed = sorted({m.manifest.name for m in registry.models})
    names = _model_names(model, installed)
    if not names:
        err.print(f"[red]pacsnode evaluate: no models in {settings.models_dir}[/red]")
        raise typer.Exit(2)
    results = run_evaluation(registry, names, studies=studies, out_dir=out_dir)
    table = Table(title=f"Held-out phantoms ({studies} CT studies; inference mode)")
    columns = (
        "Model", "Task", "N", "Sens.", "Spec.", "Prec.", "Recall", "F1", "ROC AUC",
        "Dice", "HD95 mm", "MR det.", "Noise det.", "False al.", "Target met",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("Model", "Task") else "right")
    for r in results:
        m = r.metrics
        n = m.get("n", m.get("lesion_cases", m.get("normal")))
        table.add_row(
            r.model, r.task, _fmt(n),
            *(_fmt(m.get(k)) for k in ("sensitivity", "specificity", "precision", "recall", "f1")),
            _fmt(m.get("roc_auc")), _fmt(m.get("mean_dice")), _fmt(m.get("mean_hd95_mm"), 1),
            _fmt(m.get("mr_as_ct_detection_rate")), _fmt(m.get("noise_detection_rate")),
            _fmt(m.get("false_alarm_rate")), _fmt(m.get("target_met")),
        )  # fmt: skip
    Console(width=max(out.width, 150)).print(table)  # wide enough when piped
    from pacsnode.lab.fusion_eval import fusion_table

    if (fused := fusion_table(results)) is not None:
        Console(width=max(out.width, 150)).print(fused)
    out.print(
        f"Reports in {out_dir}/<model>/. Synthetic data; the models are for demonstration, "
        "not clinical use.",
        highlight=False,
    )
    summary = {r.model: {"task": r.task, **r.metrics} for r in results}
    from pacsnode.lab.evaluation import _jsonable

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    if check and not all(r.metrics.get("target_met") for r in results):
        raise typer.Exit(1)


cli_admin.register(app)  # jobs, results, models, stats, audit, tokens, api

from pacsnode.cli_training import export_training  # noqa: E402

app.command("export-training")(export_training)


def main() -> None:
    app()
