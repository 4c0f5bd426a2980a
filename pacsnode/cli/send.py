"""``pacsnode send PATH... AE@HOST:PORT``: C-STORE one's own DICOM files and
folders to a node (this one or any other), so no DICOM toolkit is needed to
try pacsnode with real data. The work is :func:`pacsnode.scp.sendfiles.send_files`.

Exit status: 0 if every DICOM file was stored (Success or Warning, PS3.4
B.2.3; files that are not DICOM are skipped with a notice and do not count),
1 if any was not or there was no association, 2 for a usage error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pacsnode.cli.common import err, out, scu_failure

SHOWN = 20  # failures and skipped files listed one by one; the rest counted


def send(
    args: Annotated[
        list[str],
        typer.Argument(
            help="files and folders (recursive), then the AE@HOST:PORT to send to",
            metavar="PATH... AE@HOST:PORT",
        ),
    ],
    calling_ae: Annotated[str, typer.Option(help="our AE title")] = "PACSNODE_SEND",
    timeout: Annotated[float, typer.Option(help="seconds to wait for the peer")] = 30.0,
) -> None:
    """C-STORE DICOM files and folders as stored (every storage SOP class and transfer syntax)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pacsnode.scp.echo import parse_target
    from pacsnode.scp.sendfiles import SendFilesError, collect_files, send_files

    if len(args) < 2:
        err.print("[red]pacsnode send: give at least one PATH, then AE@HOST:PORT[/red]")
        raise typer.Exit(2)
    *names, target = args
    try:
        ae_title, host, port = parse_target(target)
        files = collect_files(Path(name) for name in names)
    except ValueError as exc:
        err.print(f"[red]pacsnode send: {exc}[/red]", highlight=False)
        raise typer.Exit(2) from None
    columns = (TextColumn("C-STORE"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=out) as progress:
        task = progress.add_task("send", total=len(files))
        try:
            report = send_files(
                files, ae_title, host, port, calling_ae,
                progress=lambda n: progress.advance(task, n), timeout=timeout,
            )  # fmt: skip
        except SendFilesError as exc:
            err.print(
                f"[red]C-STORE {target}: {scu_failure(exc, calling_ae)}[/red]", highlight=False
            )
            raise typer.Exit(1) from None
    for path, why in report.skipped[:SHOWN]:
        out.print(f"  skipped: {path}: {why}", highlight=False)
    if len(report.skipped) > SHOWN:
        out.print(f"  ... and {len(report.skipped) - SHOWN} more skipped", highlight=False)
    for path, status in report.failed[:SHOWN]:
        out.print(f"  failed: {path}: {status}", highlight=False)
    if len(report.failed) > SHOWN:
        out.print(f"  ... and {len(report.failed) - SHOWN} more failed", highlight=False)
    warned = f" ({report.warnings} with a warning)" if report.warnings else ""
    out.print(
        f"C-STORE {target}: {report.stored} stored{warned}, {len(report.failed)} failed, "
        f"{len(report.skipped)} skipped (not DICOM storage files)",
        highlight=False,
    )
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``send`` to the ``pacsnode`` app."""
    app.command()(send)
