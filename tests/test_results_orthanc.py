"""Results back to a real PACS: Orthanc pushes a phantom study to pacsnode,
the bundled models run, and the DICOM-SEG and TID 1500 SR arrive in Orthanc
in the same study; an Orthanc outage delays them and loses nothing.

The bundled models are for demonstration and testing; the checks here are on
the objects and their delivery, not on clinical meaning.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO

from pacsnode.lab.phantom import StudySpec, write_study
from tests.faultreport import ledger
from tests.orthanc import Orthanc, orthanc_binary
from tests.support import IN_CI, Node, node_config, require_binary, wait_for
from tests.test_assembly import FAST

# Lesions the segmenter finds (held-out seed, never used in training).
CT = {"seed": 900_011, "size": 256, "slices": 100, "modalities": ("CT",), "lesions": 2}
JOB_TIMEOUT = 240.0


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    binary = orthanc_binary()
    if binary is None:
        if IN_CI:
            pytest.fail("Orthanc is not installed (apt-get install orthanc)")
        pytest.skip("Orthanc is not installed")
    server = Orthanc(home=tmp_path / "orthanc", binary=binary)
    server.configure()  # fixes its ports: the node's configuration names them
    yield server
    server.stop()


def start_pair(make_node: Any, orthanc: Orthanc, **exports: Any) -> Node:
    """A node that accepts Orthanc as a peer and returns results to it, and an
    Orthanc that knows the node as the modality ``pacsnode``."""
    config = node_config(
        peers=[
            {"ae_title": "ORTHANC", "hosts": ["127.0.0.1"], "port": orthanc.dicom_port},
            {"ae_title": "FINDSCU", "hosts": ["127.0.0.1"]},
            {"ae_title": "GETSCU", "hosts": ["127.0.0.1"]},
        ],
        completion=FAST,
        exports={"rules": [{"destinations": ["@sender"]}], **exports},
    )
    node = make_node(config=config).start()
    orthanc.modalities = {"pacsnode": (node.ae_title, "127.0.0.1", node.port)}
    orthanc.start()
    return node


def push_study(orthanc: Orthanc, folder: Path, study_uid: str) -> None:
    """Upload a study to Orthanc, then have Orthanc send it to pacsnode."""
    orthanc.upload(sorted(folder.rglob("*.dcm")))
    study_id = orthanc.study_id(study_uid)
    assert study_id is not None
    orthanc.post("/modalities/pacsnode/store", {"Resources": [study_id], "Synchronous": True})


def results_in_orthanc(orthanc: Orthanc, study_uid: str) -> dict[str, list[str]] | None:
    found = {m: orthanc.instances_of_modality(study_uid, m) for m in ("SEG", "SR")}
    return found if found["SEG"] and found["SR"] else None


def exports(node: Node) -> list[dict[str, Any]]:
    result = node.cli("exports", "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def read(orthanc: Orthanc, instance_id: str) -> pydicom.Dataset:
    return pydicom.dcmread(DicomBytesIO(orthanc.file(instance_id)))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_orthanc_receives_seg_and_sr_in_the_same_study(
    make_node: Any, orthanc: Orthanc, tmp_path: Path
) -> None:
    node = start_pair(make_node, orthanc)
    study = write_study(tmp_path / "study", StudySpec(**CT))
    truth = json.loads(study.truth.read_text())
    study_uid = truth["study_instance_uid"]
    ct_uid = truth["series"]["CT"]["series_instance_uid"]
    push_study(orthanc, study.folder, study_uid)

    found = wait_for(
        lambda: results_in_orthanc(orthanc, study_uid), JOB_TIMEOUT, "SEG and SR in Orthanc"
    )
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1
    seg = hd.seg.Segmentation.from_dataset(read(orthanc, found["SEG"][0]))
    assert seg.StudyInstanceUID == study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_uid
    assert "not clinical" in seg.SeriesDescription
    sr = hd.sr.Comprehensive3DSR.from_dataset(read(orthanc, found["SR"][0]))
    assert sr.StudyInstanceUID == study_uid
    evidence = {
        item.SeriesInstanceUID
        for study_item in sr.CurrentRequestedProcedureEvidenceSequence
        for item in study_item.ReferencedSeriesSequence
    }
    assert {ct_uid, seg.SeriesInstanceUID} <= evidence
    rows = exports(node)
    assert len(rows) == 2 and {r["state"] for r in rows} == {"sent"}

    # The PACS (or anyone allowed) finds and retrieves the results from pacsnode.
    out = tmp_path / "find"
    out.mkdir()
    found_seg = subprocess.run(
        [require_binary("findscu"), "-S", "-aet", "FINDSCU", "-aec", node.ae_title,
         "-X", "-od", str(out), "127.0.0.1", str(node.port),
         "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study_uid}",
         "-k", "Modality=SEG\\SR", "-k", "SeriesInstanceUID"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert found_seg.returncode == 0, found_seg.stderr
    modalities = sorted(pydicom.dcmread(p).Modality for p in out.glob("rsp*.dcm"))
    assert modalities == ["SEG", "SR"]
    got = tmp_path / "get"
    got.mkdir()
    result = subprocess.run(
        [require_binary("getscu"), "-S", "-aet", "GETSCU", "-aec", node.ae_title,
         "-od", str(got), "127.0.0.1", str(node.port), "-k", "QueryRetrieveLevel=SERIES",
         "-k", f"StudyInstanceUID={study_uid}", "-k", f"SeriesInstanceUID={seg.SeriesInstanceUID}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (retrieved,) = [pydicom.dcmread(p) for p in got.iterdir()]
    assert retrieved.SOPInstanceUID == seg.SOPInstanceUID


@pytest.mark.faults
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_orthanc_down_exports_retry_and_arrive_once(
    make_node: Any, orthanc: Orthanc, tmp_path: Path, fault_report: Any
) -> None:
    started = time.monotonic()
    node = start_pair(make_node, orthanc, initial_backoff_s=0.5, max_backoff_s=2.0)
    study = write_study(tmp_path / "study", StudySpec(**CT))
    study_uid = json.loads(study.truth.read_text())["study_instance_uid"]
    push_study(orthanc, study.folder, study_uid)
    orthanc.stop()  # the PACS goes down before the results are ready

    def failing() -> list[dict[str, Any]] | None:
        rows = exports(node)
        retrying = [r for r in rows if r["state"] == "retrying" and r["attempts"] >= 2]
        return rows if len(rows) == 2 and len(retrying) == 2 else None

    rows = wait_for(failing, JOB_TIMEOUT, "exports retrying while Orthanc is down")
    assert all(r["last_error"] for r in rows)
    orthanc.start()  # same ports, same storage
    found = wait_for(
        lambda: results_in_orthanc(orthanc, study_uid), 60, "SEG and SR after the restart"
    )
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1
    rows = wait_for(
        lambda: (r := exports(node)) and all(x["state"] == "sent" for x in r) and r,
        30,
        "export rows sent",
    )
    assert len(rows) == 2
    # Nothing duplicated: Orthanc holds the CT and exactly one SEG and one SR.
    book = ledger(node.database_url)
    held = orthanc.count_instances()
    fault_report(
        "destination PACS down, then back (Orthanc)",
        sent=CT["slices"],
        acked=CT["slices"],
        stored=len(book.instances) - 2,  # the node's own SEG and SR are indexed too
        jobs=book.jobs,
        results=book.results,
        exports=book.exports_sent,
        lost=max(0, CT["slices"] + 2 - held) + 1 - book.job_states["succeeded"],
        duplicated=max(0, held - CT["slices"] - 2)
        + book.export_duplicates
        + book.result_duplicates,
        seconds=time.monotonic() - started,
    )
    assert held == CT["slices"] + 2
