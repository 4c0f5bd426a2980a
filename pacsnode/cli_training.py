"""``pacsnode export-training``: de-identified copies of stored studies for
training data (PS3.15 Annex E Basic Profile, see :mod:`pacsnode.lab.deidentify`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True)

_DATE = re.compile(r"^\d{8}$")


def export_training(
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write <study>/<series>/ into")],
    deidentify: Annotated[
        bool,
        typer.Option(
            "--deidentify/--no-deidentify",
            help="apply the PS3.15 Basic Profile (required: identified copies are not offered)",
        ),
    ] = False,
    study: Annotated[
        list[str] | None, typer.Option("--study", help="a Study Instance UID (repeatable)")
    ] = None,
    date_from: Annotated[str, typer.Option("--from", help="Study Date on or after, YYYYMMDD")] = "",
    date_to: Annotated[str, typer.Option("--to", help="Study Date on or before, YYYYMMDD")] = "",
    model: Annotated[str, typer.Option(help="only studies with a finding of this model")] = "",
    positive: Annotated[
        bool, typer.Option("--positive", help="with --model: only positive findings")
    ] = False,
) -> None:
    """Write de-identified copies of selected studies (for training models).

    UIDs are replaced consistently across the export, so series still load as
    volumes and results still reference their source images. Pixel data is
    copied as stored: check for burned-in text before sharing.
    """
    from pacsnode.cli import _settings
    from pacsnode.db.session import create_db_engine
    from pacsnode.lab.deidentify import Selection, export_deidentified

    if not deidentify:
        err.print("[red]pacsnode export-training: --deidentify is required[/red]")
        raise typer.Exit(2)
    for name, value in (("--from", date_from), ("--to", date_to)):
        if value and not _DATE.match(value):
            err.print(f"[red]pacsnode export-training: {name} expects YYYYMMDD[/red]")
            raise typer.Exit(2)
    if positive and not model:
        err.print("[red]pacsnode export-training: --positive needs --model[/red]")
        raise typer.Exit(2)
    settings = _settings()
    selection = Selection(
        study_uids=tuple(study or ()),
        date_from=date_from,
        date_to=date_to,
        model=model,
        positive_only=positive,
    )
    engine = create_db_engine(settings.effective_database_url)
    try:
        summary = export_deidentified(engine, settings.spool_dir, out_dir, selection)
    finally:
        engine.dispose()
    out.print(
        f"de-identified {summary.instances} instance(s) of {summary.studies} study(ies), "
        f"{summary.series} series, into {out_dir}"
        + (f"; {summary.skipped} unreadable file(s) skipped" if summary.skipped else ""),
        highlight=False,
    )
    if summary.instances == 0:
        raise typer.Exit(1)
