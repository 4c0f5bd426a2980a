"""The lab on the command line: ``pacsnode demo`` (synthetic phantom studies),
``train``, ``evaluate`` (bundled models on held-out phantoms) and
``export-training`` (de-identified copies of stored studies, PS3.15 Annex E
Basic Profile, see :mod:`pacsnode.lab.deidentify`).

Training and evaluation need the lab extra (``pip install pacsnode[lab]``);
``demo`` needs only the node's own dependencies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from pacsnode.cli.common import err, node_settings, out, scu_failure

if TYPE_CHECKING:  # the phantom generator imports numpy and scipy: only when used
    from pacsnode.lab.phantom import Study, StudySpec

demo_app = typer.Typer(
    help="Synthetic phantom studies (CT, PET, MR): for testing and demonstration only.",
    no_args_is_help=True,
)

_DATE = re.compile(r"^\d{8}$")


def _require_lab(command: str) -> None:
    """Exit 2 with the install hint when the lab extra is missing."""
    import importlib.util

    missing = [
        name
        for name in ("sklearn", "matplotlib", "dicomanonymizer")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        err.print(
            f"[red]pacsnode {command}: needs the lab extra (missing: {', '.join(missing)}); "
            "install it with: pip install 'pacsnode[lab]'[/red]",
            highlight=False,
        )
        raise typer.Exit(2)


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

    from pacsnode.core.errors import ScuError
    from pacsnode.lab.phantom import generate_study, study_datasets
    from pacsnode.lab.phantom.send import send_datasets
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
        except ScuError as exc:
            reason = scu_failure(exc, calling_ae)
            err.print(f"[red]C-STORE {target}: {reason}[/red]", highlight=False)
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
    _require_lab("train")
    from pacsnode.lab import fusion_recipe
    from pacsnode.lab.fusion_training import train_fusion_model
    from pacsnode.lab.recipes import FULL, RECIPES, TINY, train_model

    names = _model_names(model, [*RECIPES, fusion_recipe.NAME])
    folder = out_dir if out_dir is not None else node_settings().models_dir
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
    _require_lab("evaluate")
    from pacsnode.core.errors import ModelConfigError
    from pacsnode.lab.heldout import evaluate as run_evaluation
    from pacsnode.models.registry import Registry

    settings = node_settings()
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
    from pacsnode.db.session import create_db_engine
    from pacsnode.lab.deidentify import Selection, export_deidentified

    _require_lab("export-training")
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
    settings = node_settings()
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


def register(app: typer.Typer) -> None:
    """Add demo, train, evaluate and export-training to the ``pacsnode`` app."""
    app.add_typer(demo_app, name="demo")
    app.command()(train)
    app.command()(evaluate)
    app.command("export-training")(export_training)
