"""Patient privacy: no patient name or ID in any log line of any process
(SCP, assembler, dispatcher, worker) while studies go through the whole
pipeline (ingest, models, results, exports), at DEBUG; and
``pacsnode export-training --deidentify`` writes copies with no original
identifier that still load as volumes and keep their references.

The bundled models are for demonstration and testing, not clinical use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from pacsnode.db.models import Export, Instance
from pacsnode.db.session import create_db_engine
from pacsnode.lab.phantom import StudySpec, write_study
from pacsnode.workers.volume import load_series
from tests.support import Node, free_port, node_config, storescu, wait_for
from tests.test_assembly import FAST
from tests.test_exports import StoreSCP

# Values no code path invents: any occurrence in a log came from a data set.
PATIENTS = [
    {
        "PatientName": "Quixotewhirl^Zebulonia^Marguerite",
        "PatientID": "PRIV-77Q3-ZK91",
        "PatientBirthDate": "19370412",
        "AccessionNumber": "ACC8841QZ",
        "OtherPatientIDs": "ALTID-5521-XQ",
        "InstitutionName": "Hospital Vexillum Pellucid",
        "ReferringPhysicianName": "Drovenkamp^Ysolde",
    },
    {
        "PatientName": "Brumblethwaite^Ottoline",
        "PatientID": "PRIV-11K8-WW02",
        "PatientBirthDate": "19520930",
        "AccessionNumber": "ACC1199WX",
        "OtherPatientIDs": "ALTID-0813-PL",
        "InstitutionName": "Clinique Saint-Azurine",
        "ReferringPhysicianName": "Fennimore^Caspian",
    },
]
IDENTIFIERS = [
    part
    for patient in PATIENTS
    for value in patient.values()
    for part in [value, *value.split("^")]
    if len(part) >= 6
]
# Short z extents: the segmenter's cost grows with the number of 4 mm slabs.
SPECS = [
    StudySpec(seed=900_011, size=128, slices=30, z_extent_mm=120, modalities=("CT",), lesions=2),
    StudySpec(seed=900_017, size=96, slices=16, z_extent_mm=64, modalities=("CT",), lesions=0),
]


def write_identified_studies(folder: Path) -> list[Path]:
    folders = []
    for k, (spec, patient) in enumerate(zip(SPECS, PATIENTS, strict=True)):
        study = write_study(folder / f"study{k}", spec)
        for path in study.folder.rglob("*.dcm"):
            ds = pydicom.dcmread(path)
            for keyword, value in patient.items():
                setattr(ds, keyword, value)
            ds.save_as(path, enforce_file_format=True)
        folders.append(study.folder / "CT")
    return folders


def leaks(text: str) -> list[str]:
    lowered = text.lower()
    return [value for value in IDENTIFIERS if value.lower() in lowered]


@pytest.fixture
def pipeline_run(
    make_node: Any, tmp_path: Path
) -> Any:  # a node that has run both studies through models and exports
    scp = StoreSCP(free_port(), tmp_path / "pacs").start()
    config = node_config(
        completion=FAST,
        log_level="DEBUG",
        disabled_models=["ct-lesion-sequence"],  # time; the other three still run
        destinations=[
            {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}
        ],
        exports={"rules": [{"destinations": ["pacs"]}]},
    )
    node: Node = make_node(config=config).start()
    for folder in write_identified_studies(tmp_path / "in"):
        storescu(node, folder)
    engine = create_db_engine(node.database_url)

    def exports_sent() -> list[Any] | None:
        with engine.connect() as conn:
            rows = list(conn.execute(select(Export.state)).scalars())
        # One SEG (the study with lesions may have segments) and one SR per study at least.
        return rows if len(rows) >= 2 and set(rows) == {"sent"} else None

    from tests.test_assembly import jobs

    wait_for(
        lambda: (j := jobs(node)) and len(j) == 2 and {x.state for x in j} == {"succeeded"},
        timeout=240,
        what="both jobs to succeed",
    )
    wait_for(exports_sent, timeout=60, what="every export sent")
    yield node, scp, engine
    engine.dispose()
    scp.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_no_patient_identifier_in_any_log_and_deidentified_export(
    pipeline_run: Any, tmp_path: Path
) -> None:
    node, scp, engine = pipeline_run
    # The node really saw the identifiers: they are in its data, not its logs.
    stored = next((node.data_dir / "spool").rglob("*.dcm"))
    assert str(pydicom.dcmread(stored).PatientID).startswith("PRIV-")
    assert scp.received(), "the destination received the results"
    log = node.log()
    for process in ("[scp-", "[worker]", "[assembler]"):
        assert process in log, f"no log line from {process}"
    assert "DEBUG" in log
    assert leaks(log) == []
    # Exported results carry the patient (as they must), the node's log does not.
    received = next((scp.folder / "received").iterdir())
    assert str(pydicom.dcmread(received).PatientID).startswith("PRIV-")

    out = tmp_path / "training"
    result = node.cli("export-training", "--deidentify", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert leaks(result.stdout + result.stderr) == []
    with engine.connect() as conn:
        original_uids = set(conn.execute(select(Instance.sop_instance_uid)).scalars())
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == len(original_uids)
    study_uids = set()
    for path in files:
        raw = path.read_bytes()
        assert leaks(raw.decode("latin-1")) == [], path
        assert not any(uid.encode() in raw for uid in original_uids if len(uid) > 20), path
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        study_uids.add(str(ds.StudyInstanceUID))
    assert len(study_uids) == 2
    # Each CT series still loads as one volume with its geometry; the SEG
    # references instances that exist in the copy.
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    series_dirs = {p.parent for p in files}
    ct_dirs = [d for d in series_dirs if pydicom.dcmread(next(d.iterdir())).Modality == "CT"]
    assert len(ct_dirs) == 2
    for folder in ct_dirs:
        volume = load_series(sorted(folder.iterdir()))
        assert volume.array.shape[0] in (spec.slices for spec in SPECS)
    segs = [p for p in files if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"]
    assert segs
    for path in segs:
        seg = pydicom.dcmread(path)
        referenced = {
            item.ReferencedSOPInstanceUID
            for series in seg.ReferencedSeriesSequence
            for item in series.ReferencedInstanceSequence
        }
        assert referenced and referenced <= set(by_uid)
        assert {pydicom.dcmread(by_uid[u]).StudyInstanceUID for u in referenced} == {
            seg.StudyInstanceUID
        }

    # Filters: an unknown model or an empty date range selects nothing.
    nothing = node.cli("export-training", "--deidentify", "--model", "nope", "--out", str(out))
    assert nothing.returncode == 1 and "0 instance(s)" in nothing.stdout
    assert node.cli("export-training", "--out", str(out)).returncode == 2  # --deidentify needed
