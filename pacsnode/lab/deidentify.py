"""De-identified copies of stored studies, for training data (PS3.15 Annex E).

The attribute actions are those of the Basic Application Level
Confidentiality Profile (PS3.15 Table E.1-1), applied by Kitware's
``dicom-anonymizer`` (its tables are generated from the standard's own
XML): identifying attributes are removed, emptied or replaced with dummies,
private attributes are removed and every UID the table lists is replaced.

UIDs are replaced through one mapping for the whole export, so an instance's
Study, Series, Frame of Reference and SOP Instance UIDs, and the references
between instances (a SEG's source images, an SR's evidence), stay consistent
and a series still loads as a volume. Pixel data is copied as stored: the
Basic Profile assumes no identifying text is burned into the pixels (PS3.15
E.1.1, Clean Pixel Data option not claimed); review modalities that burn in
annotations (ultrasound, secondary capture) before sharing them.

Each output object records what was done (PS3.15 E.1.1 items 4-5): Patient
Identity Removed YES, De-identification Method and its code sequence (DCM
113100, Basic Application Confidentiality Profile).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import Engine, select

from pacsnode.db.models import Finding, Instance, Series, Study

log = logging.getLogger(__name__)

# PS3.16 CID 7050 De-identification Method
_BASIC_PROFILE = ("113100", "DCM", "Basic Application Confidentiality Profile")
_METHOD = "PS3.15 Table E.1-1 Basic Profile (dicom-anonymizer)"  # LO: 64 characters


@dataclass(frozen=True)
class Selection:
    """Which stored studies to export; the filters combine (all must hold)."""

    study_uids: Sequence[str] = ()
    date_from: str = ""  # YYYYMMDD, Study Date, inclusive
    date_to: str = ""
    model: str = ""  # studies with a finding from this model...
    positive_only: bool = False  # ...that is positive


@dataclass
class ExportSummary:
    studies: int = 0
    series: int = 0
    instances: int = 0
    skipped: int = 0  # unreadable files: reported by UID, never exported


def select_instances(engine: Engine, selection: Selection) -> list[tuple[str, str, str]]:
    """(study UID, SOP Instance UID, spool path) of each selected instance."""
    query = (
        select(Study.study_instance_uid, Instance.sop_instance_uid, Instance.path)
        .join(Series, Series.study_pk == Study.id)
        .join(Instance, Instance.series_pk == Series.id)
        .order_by(Study.study_instance_uid, Series.series_instance_uid, Instance.instance_number)
    )
    if selection.study_uids:
        query = query.where(Study.study_instance_uid.in_(list(selection.study_uids)))
    if selection.date_from:
        query = query.where(Study.study_date >= selection.date_from)
    if selection.date_to:
        query = query.where(Study.study_date <= selection.date_to)
    if selection.model:
        with_finding = select(Finding.study_pk).where(Finding.model_name == selection.model)
        if selection.positive_only:
            with_finding = with_finding.where(Finding.positive.is_(True))
        query = query.where(Study.id.in_(with_finding))
    with engine.connect() as conn:
        return [(r[0], r[1], r[2]) for r in conn.execute(query)]


@contextmanager
def _uid_mapping() -> Iterator[None]:
    """dicom-anonymizer keeps its old->new UID map in a module variable: one
    map per export, so two exports never share (or leak) pseudonyms."""
    from dicomanonymizer import simpledicomanonymizer

    simpledicomanonymizer.dictionary.clear()
    try:
        yield
    finally:
        simpledicomanonymizer.dictionary.clear()


def deidentify_dataset(ds: Dataset) -> Dataset:
    """Apply the Basic Profile to ``ds`` in place (within :func:`_uid_mapping`)."""
    from dicomanonymizer import anonymize_dataset, initialize_actions

    actions = initialize_actions()
    anonymize_dataset(ds, delete_private_tags=True, base_rules_gen=lambda: dict(actions))

    # PS3.15 E.1.1: the profile applies to every occurrence of an attribute,
    # also inside sequence items (a SEG's and an SR's references to their
    # source images, for one); dicom-anonymizer's table actions only look at
    # the top level, so each item gets the actions of the attributes it holds,
    # depth first. (The repeating-group actions, overlays and curves, already
    # walked the whole tree.)
    def item_actions(item: Dataset) -> dict[Any, Any]:
        held = ((e.tag.group, e.tag.element) for e in item)
        return {tag: actions[tag] for tag in held if tag in actions}

    def apply(item: Dataset) -> None:
        rules = item_actions(item)
        anonymize_dataset(item, delete_private_tags=True, base_rules_gen=lambda: rules)

    _items(ds, apply)
    # The File Meta Information must agree with the new SOP Instance UID (PS3.10 7.1).
    if "SOPInstanceUID" in ds and getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        if "SourceApplicationEntityTitle" in ds.file_meta:
            del ds.file_meta.SourceApplicationEntityTitle
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = _METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = _BASIC_PROFILE
    ds.DeidentificationMethodCodeSequence = [code]
    return ds


def _items(ds: Dataset, apply: Callable[[Dataset], None]) -> None:
    for element in list(ds):
        if element.VR == "SQ" and element.tag in ds:
            for item in element.value:
                apply(item)
                _items(item, apply)


def export_deidentified(
    engine: Engine, spool_dir: Path, out_dir: Path, selection: Selection
) -> ExportSummary:
    """Write a de-identified copy of each selected instance below ``out_dir``
    as ``<study>/<series>/<instance>.dcm`` (the new UIDs)."""
    rows = select_instances(engine, selection)
    summary = ExportSummary()
    studies: set[str] = set()
    series: set[str] = set()
    out_dir.mkdir(parents=True, exist_ok=True)
    with _uid_mapping():
        for study_uid, sop_uid, path in rows:
            try:
                ds = pydicom.dcmread(spool_dir / path)
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                log.warning("export-training: skipped %s: %s", sop_uid, type(exc).__name__)
                summary.skipped += 1
                continue
            deidentify_dataset(ds)
            target = out_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID
            target.mkdir(parents=True, exist_ok=True)
            ds.save_as(target / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            studies.add(study_uid)
            series.add(str(ds.SeriesInstanceUID))
            summary.instances += 1
    summary.studies, summary.series = len(studies), len(series)
    return summary
