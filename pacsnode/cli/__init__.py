"""The ``pacsnode`` command line (the app layer: nothing below imports it).

One module per area, each with a ``register(app)``: :mod:`.node` (serve,
worker, echo, db, config), :mod:`.archive` (studies, exports), :mod:`.admin`
(jobs, results, models, stats, audit), :mod:`.access` (tokens, api),
:mod:`.ops` (cleanup, healthcheck), :mod:`.send` (send), :mod:`.lab` (demo, train, evaluate,
export-training). :mod:`.common` holds the one bootstrap they share.
"""

from __future__ import annotations

import typer

from pacsnode.cli import access, admin, archive, lab, node, ops, send

app = typer.Typer(
    help="pacsnode: an AI node beside your PACS. Not a medical device; bundled "
    "models are for demonstration and testing.",
    no_args_is_help=True,
    add_completion=False,
)
for _area in (node, send, archive, ops, lab, admin, access):
    _area.register(app)


def main() -> None:
    app()
