"""Administration commands: the API's common questions on the command line.

``pacsnode jobs|results|models|stats|audit`` use the same query
layer as the API (:mod:`pacsnode.db.queries`, :mod:`pacsnode.db.admin`,
:mod:`pacsnode.db.stats`) with the same filters; ``--json`` prints one JSON object per line. Actions
(retry, reprocess, enable, disable, token creation) are audited as
``cli:<user>``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer

from pacsnode.cli.common import (
    AsJson,
    Limit,
    Offset,
    choice,
    cli_actor,
    fail,
    json_lines,
    node_engine,
    node_settings,
    out,
    parse_time,
    print_table,
    when,
)
from pacsnode.db import audit

jobs_app = typer.Typer(help="Pipeline jobs. Without a command: list them, newest first.")
results_app = typer.Typer(
    help="Model results. Without a command: classification findings; `segments`: "
    "segments with their measurements."
)
models_app = typer.Typer(
    help="Installed models (bundled ones: demonstration and testing only, not clinical use). "
    "Without a command: list them."
)


# --- jobs -----------------------------------------------------------------------


@jobs_app.callback(invoke_without_command=True)
def jobs_list(
    ctx: typer.Context,
    state: Annotated[
        str | None, typer.Option(help="pending|queued|running|succeeded|failed")
    ] = None,
    study: Annotated[str | None, typer.Option(help="Study Instance UID")] = None,
    as_json: AsJson = False,
    limit: Limit = 50,
    offset: Offset = 0,
) -> None:
    """List jobs, newest first."""
    if ctx.invoked_subcommand is not None:
        return
    from pacsnode.db.admin import JOB_STATES, list_jobs

    choice("state", state, JOB_STATES)
    with node_engine(node_settings()).connect() as conn:
        page = list_jobs(conn, state=state, study_instance_uid=study, limit=limit, offset=offset)
    if as_json:
        return json_lines(page.items)
    print_table(
        page.items,
        page.total,
        "Jobs",
        {
            "ID": lambda r: r.id,
            "Study Instance UID": lambda r: r.study_instance_uid,
            "Kind": lambda r: r.kind,
            "State": lambda r: r.state,
            "Tries": lambda r: r.attempts,
            "Worker": lambda r: r.lease_owner,
            "Created (UTC)": lambda r: when(r.created_at),
            "Finished (UTC)": lambda r: when(r.finished_at),
            "Error": lambda r: r.error,
        },
    )


@jobs_app.command("retry")
def jobs_retry(
    ids: Annotated[list[int] | None, typer.Option("--id", help="job id (repeatable)")] = None,
) -> None:
    """Put failed jobs (all, or those given) back to pending; the dispatcher queues them."""
    from pacsnode.db.admin import retry_jobs

    with node_engine(node_settings()).begin() as conn:
        done = retry_jobs(conn, ids or None)
        audit.record(conn, cli_actor(), "jobs.retry", detail={"asked": ids, "ids": done})
    out.print(f"re-queued {len(done)} job(s)", highlight=False)


@jobs_app.command("reprocess")
def jobs_reprocess(study: Annotated[str, typer.Argument(help="Study Instance UID")]) -> None:
    """Run the pipeline on a whole study again (a new job through the outbox)."""
    from pacsnode.core.errors import NotFound
    from pacsnode.db.admin import reprocess_study

    try:
        with node_engine(node_settings()).begin() as conn:
            job_id = reprocess_study(conn, study)
            audit.record(conn, cli_actor(), "studies.reprocess", target=study)
    except NotFound as exc:
        raise fail(str(exc), 1) from None
    out.print(f"job {job_id} queued for study {study}", highlight=False)


# --- results ----------------------------------------------------------------------


_Model = Annotated[str | None, typer.Option(help="model name")]
_Version = Annotated[str | None, typer.Option(help="model version")]
_Label = Annotated[str | None, typer.Option(help="code meaning or value, e.g. Lesion")]
_Ood = Annotated[bool | None, typer.Option("--ood/--no-ood", help="flagged out-of-distribution")]
_Since = Annotated[str | None, typer.Option(help="created at or after (ISO 8601)")]
_Until = Annotated[str | None, typer.Option(help="created before (ISO 8601)")]
_Study = Annotated[str | None, typer.Option(help="Study Instance UID")]


@results_app.callback(invoke_without_command=True)
def results_findings(
    ctx: typer.Context,
    model: _Model = None,
    version: _Version = None,
    label: _Label = None,
    min_probability: Annotated[float | None, typer.Option(min=0, max=1)] = None,
    max_probability: Annotated[float | None, typer.Option(min=0, max=1)] = None,
    ood: _Ood = None,
    since: _Since = None,
    until: _Until = None,
    study: _Study = None,
    as_json: AsJson = False,
    limit: Limit = 50,
    offset: Offset = 0,
) -> None:
    """Classification findings, newest first (e.g. --model lesion --min-probability 0.8)."""
    if ctx.invoked_subcommand is not None:
        return
    from pacsnode.db.admin import ResultFilter, list_findings

    flt = ResultFilter(
        model,
        version,
        label,
        min_probability,
        max_probability,
        ood,
        parse_time(since, "since"),
        parse_time(until, "until"),
        study,
    )
    with node_engine(node_settings()).begin() as conn:
        page = list_findings(conn, flt, limit=limit, offset=offset)
        audit.record(conn, cli_actor(), "results.findings.read", detail=_detail(flt))
    if as_json:
        return json_lines(page.items)
    print_table(
        page.items,
        page.total,
        "Findings",
        {
            "Study Instance UID": lambda r: r.study_instance_uid,
            "Model": lambda r: f"{r.model_name} {r.model_version}",
            "Label": lambda r: r.code_meaning,
            "P": lambda r: f"{r.probability:.3f}",
            "Positive": lambda r: r.positive,
            "OOD": lambda r: r.ood,
            "Created (UTC)": lambda r: when(r.created_at),
        },
    )


def _detail(flt: Any) -> dict[str, Any]:
    return {
        k: v.isoformat() if isinstance(v, datetime) else v
        for k, v in flt.__dict__.items()
        if v is not None
    }


@results_app.command("segments")
def results_segments(
    model: _Model = None,
    version: _Version = None,
    label: _Label = None,
    ood: _Ood = None,
    since: _Since = None,
    until: _Until = None,
    study: _Study = None,
    as_json: AsJson = False,
    limit: Limit = 50,
    offset: Offset = 0,
) -> None:
    """Segments with their measurements, newest first."""
    from pacsnode.db.admin import ResultFilter, list_segments

    flt = ResultFilter(
        model,
        version,
        label,
        None,
        None,
        ood,
        parse_time(since, "since"),
        parse_time(until, "until"),
        study,
    )
    with node_engine(node_settings()).begin() as conn:
        page = list_segments(conn, flt, limit=limit, offset=offset)
        audit.record(conn, cli_actor(), "results.segments.read", detail=_detail(flt))
    if as_json:
        return json_lines(page.items)
    print_table(
        page.items,
        page.total,
        "Segments",
        {
            "Study Instance UID": lambda r: r.study_instance_uid,
            "Model": lambda r: f"{r.model_name} {r.model_version}",
            "#": lambda r: r.segment_number,
            "Label": lambda r: r.code_meaning,
            "mm³": lambda r: f"{r.volume_mm3:.1f}",
            "Voxels": lambda r: r.voxel_count,
            "OOD": lambda r: r.ood,
        },
    )


# --- models ------------------------------------------------------------------------


@models_app.callback(invoke_without_command=True)
def models_list(ctx: typer.Context, as_json: AsJson = False) -> None:
    """Installed models and whether the next job runs them."""
    if ctx.invoked_subcommand is not None:
        return
    from pacsnode.db.modelswitch import list_models

    settings = node_settings()
    with node_engine(settings).connect() as conn:
        rows = list_models(conn, settings)
    if as_json:
        return json_lines(rows)
    print_table(
        rows,
        len(rows),
        "Models",
        {
            "Name": lambda r: r.name,
            "Version": lambda r: r.version,
            "Task": lambda r: r.task,
            "Applies to": lambda r: r.applies_to,
            "Enabled": lambda r: "yes" if r.enabled else "no",
            "Switched by": lambda r: r.switched_by or "-",
        },
    )


def _switch(name: str, version: str, enabled: bool) -> None:
    from pacsnode.core.errors import ModelConfigError
    from pacsnode.db.modelswitch import switch_model

    settings = node_settings()
    actor = cli_actor()
    action = "models.enable" if enabled else "models.disable"
    target = f"{name}@{version}" if version else name
    try:
        with node_engine(settings).begin() as conn:
            switch_model(conn, settings, name, version, enabled, actor.name)
            audit.record(conn, actor, action, target=target)
    except ModelConfigError as exc:
        raise fail(str(exc), 1) from None
    out.print(f"{target}: {'enabled' if enabled else 'disabled'} from the next job on")


_Name = Annotated[str, typer.Argument(help="model name")]
_OneVersion = Annotated[str, typer.Option(help="only this version (default: every version)")]


@models_app.command("enable")
def models_enable(name: _Name, version: _OneVersion = "") -> None:
    """Enable a model (stored in the database; workers apply it from the next job)."""
    _switch(name, version, True)


@models_app.command("disable")
def models_disable(name: _Name, version: _OneVersion = "") -> None:
    """Disable a model (stored in the database; workers apply it from the next job)."""
    _switch(name, version, False)


# --- stats, audit, tokens, api ----------------------------------------------------


def stats(as_json: AsJson = False) -> None:
    """Counts, throughput and p50/p95 stage latencies (per model for forward passes)."""
    from pacsnode.db.stats import stats as node_stats

    with node_engine(node_settings()).connect() as conn:
        figures = node_stats(conn)
    if as_json:
        print(json.dumps(figures.as_json()))
        return
    out.print(
        f"studies {figures.studies}, series {figures.series}, instances {figures.instances} "
        f"({figures.instances_last_hour} in the last hour), associations {figures.associations}",
        highlight=False,
    )
    out.print(
        f"jobs {figures.jobs}; finished: {figures.jobs_finished_last_hour} in the last "
        f"hour, {figures.jobs_finished_last_day} in the last day",
        highlight=False,
    )
    out.print(
        f"exports {figures.exports}; findings {figures.findings}, segments {figures.segments}",
        highlight=False,
    )
    print_table(
        figures.latencies,
        len(figures.latencies),
        "Stage latencies",
        {
            "Stage": lambda r: r.stage,
            "Model": lambda r: r.model_name or "-",
            "Runs": lambda r: r.count,
            "p50 (s)": lambda r: f"{r.p50_s:.3f}",
            "p95 (s)": lambda r: f"{r.p95_s:.3f}",
        },
    )


def audit_cmd(
    channel: Annotated[str | None, typer.Option(help="api|dicom|export|cli")] = None,
    actor: Annotated[str | None, typer.Option(help="e.g. token:ops, an AE title")] = None,
    action: Annotated[str | None, typer.Option(help="e.g. jobs.retry, export.attempt")] = None,
    since: _Since = None,
    until: _Until = None,
    as_json: AsJson = False,
    limit: Limit = 100,
    offset: Offset = 0,
) -> None:
    """The audit trail, newest first: who did what, when and from where."""
    choice("channel", channel, audit.CHANNELS)
    with node_engine(node_settings()).connect() as conn:
        rows, total = audit.list_events(
            conn,
            channel=channel,
            actor=actor,
            action=action,
            since=parse_time(since, "since"),
            until=parse_time(until, "until"),
            limit=limit,
            offset=offset,
        )
    if as_json:
        return json_lines(rows)
    print_table(
        rows,
        total,
        "Audit",
        {
            "ID": lambda r: r.id,
            "At (UTC)": lambda r: when(r.at),
            "Channel": lambda r: r.channel,
            "Actor": lambda r: r.actor,
            "From": lambda r: r.source,
            "Action": lambda r: r.action,
            "Target": lambda r: r.target,
            "Outcome": lambda r: r.outcome,
            "Detail": lambda r: r.detail,
        },
    )


def register(app: typer.Typer) -> None:
    """Add jobs, results, models, stats and audit to the ``pacsnode`` app."""
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(results_app, name="results")
    app.add_typer(models_app, name="models")
    app.command("stats")(stats)
    app.command("audit")(audit_cmd)
