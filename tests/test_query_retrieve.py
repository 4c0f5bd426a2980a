"""The query/retrieve SCP against dcmtk (findscu, movescu, getscu, storescp)
and pynetdicom on real sockets, on SQLite and PostgreSQL.

One node per database serves the whole module: a small phantom study (CT
10, PT 8, MR 3 + 3 slices, 64² CT) sent with storescu, plus three one-image
studies sent with pynetdicom whose accession numbers hold ``%`` and ``_`` and
whose patient name is not ASCII. The node runs no models (an empty models
folder), so nothing else is indexed while the tests run.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacsnode.core.errors import InvalidQuery
from pacsnode.db.qr import InformationModel, find_query, retrieve_query
from pacsnode.db.session import create_db_engine
from pacsnode.lab.phantom import StudySpec, WrittenStudy, write_study
from pacsnode.scp.query import handle_find
from tests.conftest import _postgres_database
from tests.support import Node, free_port, node_config, require_binary, storescu, wait_for

SPEC = StudySpec(seed=11, size=64, slices=10)
SERIES_SIZES = {"CT": 10, "PT": 8, "MR_T1": 3, "MR_T2": 3}
PEERS = ("STORESCU", "FINDSCU", "MOVESCU", "GETSCU", "TESTSCU")
# Accession numbers that a LIKE without escaping would confuse.
ESCAPES = {"ESC-1": "50%_OFF", "ESC-2": "50AB_OFF", "ESC-3": "50A_OFF"}
NON_ASCII_NAME = "Müller^Jürgen"


@dataclass
class QR:
    node: Node
    database_url: str
    study: WrittenStudy
    study_uid: str
    patient_id: str
    receiver_port: int
    received: Path  # storescp's output folder
    receiver_log: Path
    work: Path


def _start_storescp(folder: Path, log_file: Path, port: int) -> subprocess.Popen[bytes]:
    exe = require_binary("storescp")
    folder.mkdir()
    proc = subprocess.Popen(
        [exe, "-v", "-aet", "DEST", "-od", str(folder), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=log_file.open("wb"),
    )
    echoscu = require_binary("echoscu")
    wait_for(
        lambda: (
            subprocess.run(
                [echoscu, "-aec", "DEST", "127.0.0.1", str(port)], capture_output=True
            ).returncode
            == 0
        ),
        what="storescp",
    )
    return proc


def _send_escape_studies(node: Node, template: Path) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        for patient_id, accession in ESCAPES.items():
            ds = pydicom.dcmread(template)
            ds.PatientID = patient_id
            ds.AccessionNumber = accession
            ds.PatientName = f"Escape^{patient_id}"
            if patient_id == "ESC-3":
                ds.SpecificCharacterSet = "ISO_IR 192"
                ds.PatientName = NON_ASCII_NAME
            ds.StudyInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def qr(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QR]:
    work = tmp_path_factory.mktemp(f"qr-{request.param}")
    if request.param == "sqlite":
        urls: Iterator[str] = iter([f"sqlite:///{work / 'index.db'}"])
    else:
        urls = _postgres_database()
    database_url = next(urls)
    study = write_study(work / "study", SPEC)
    port = free_port()
    receiver = _start_storescp(work / "received", work / "storescp.log", port)
    empty_models = work / "no-models"
    empty_models.mkdir()
    config = node_config(
        peers=[
            *({"ae_title": ae, "hosts": ["127.0.0.1"]} for ae in PEERS),
            # A peer with a port is a move destination too (Settings.move_destination).
            {"ae_title": "PEERSCP", "hosts": ["127.0.0.1"], "port": port},
        ],
        destinations=[{"name": "dest", "ae_title": "DEST", "host": "127.0.0.1", "port": port}],
        models_dir=str(empty_models),
    )
    node = Node(data_dir=work / "node", database_url=database_url, config=config)
    try:
        node.start()
        for key in SERIES_SIZES:
            storescu(node, study.folder / key)
        _send_escape_studies(node, study.series["CT"][0])
        header = pydicom.dcmread(study.series["CT"][0], stop_before_pixels=True)
        yield QR(
            node,
            database_url,
            study,
            str(header.StudyInstanceUID),
            str(header.PatientID),
            port,
            work / "received",
            work / "storescp.log",
            work,
        )
    finally:
        node.stop()
        receiver.terminate()
        receiver.wait(timeout=10)
        for _ in urls:  # drops the PostgreSQL database
            pass


# -- helpers ---------------------------------------------------------------------------


def findscu(qr: QR, model: str, *keys: str, calling: str = "FINDSCU") -> list[Dataset]:
    """Run findscu; return the response identifiers it extracted (-X)."""
    out = qr.work / f"find-{next(_counter)}"
    out.mkdir()
    args = [a for key in keys for a in ("-k", key)]
    result = subprocess.run(
        [require_binary("findscu"), model, "-aet", calling, "-aec", qr.node.ae_title,
         "-X", "-od", str(out), "127.0.0.1", str(qr.node.port), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def _count() -> Iterator[int]:
    n = 0
    while True:
        n += 1
        yield n


_counter = _count()


def study_files(qr: QR) -> dict[str, Path]:
    """SOP Instance UID -> the phantom file sent to the node."""
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
        for paths in qr.study.series.values()
        for p in paths
    }


def received_by_uid(folder: Path) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, folder.iterdir())}


def clear(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()


def associate(qr: QR, *sop_classes: str) -> Any:
    ae = AE(ae_title="TESTSCU")
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", qr.node.port, ae_title=qr.node.ae_title)
    assert assoc.is_established
    return assoc


def identifier(**keys: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def c_find(
    assoc: Any, ds: Dataset, model: str = StudyRootQueryRetrieveInformationModelFind
) -> tuple[list[Dataset], list[Dataset]]:
    """(statuses, identifiers) of one C-FIND."""
    statuses, found = [], []
    for status, rsp in assoc.send_c_find(ds, model):
        statuses.append(status)
        if rsp is not None:
            found.append(rsp)
    return statuses, found


# -- C-FIND with findscu ---------------------------------------------------------------


def test_find_patient_root_every_level(qr: QR) -> None:
    (patient,) = findscu(
        qr, "-P", "QueryRetrieveLevel=PATIENT", "PatientID=PHANTOM*", "PatientName",
        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances",
    )  # fmt: skip
    assert patient.PatientID == qr.patient_id
    assert patient.PatientName == "Phantom^Synthetic"
    assert patient.NumberOfPatientRelatedStudies == 1
    assert patient.NumberOfPatientRelatedInstances == sum(SERIES_SIZES.values())
    assert patient.QueryRetrieveLevel == "PATIENT"

    (study,) = findscu(
        qr, "-P", "QueryRetrieveLevel=STUDY", f"PatientID={qr.patient_id}", "StudyInstanceUID",
        "StudyDate", "AccessionNumber",
    )  # fmt: skip
    assert study.StudyInstanceUID == qr.study_uid
    assert (study.StudyDate, study.AccessionNumber) == ("20260101", "PH00000011")

    series = findscu(
        qr, "-P", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={qr.study_uid}",
        "SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances",
    )  # fmt: skip
    counts = sorted((s.Modality, s.NumberOfSeriesRelatedInstances) for s in series)
    assert counts == [("CT", 10), ("MR", 3), ("MR", 3), ("PT", 8)]

    ct_series = next(s.SeriesInstanceUID for s in series if s.Modality == "CT")
    images = findscu(
        qr, "-P", "QueryRetrieveLevel=IMAGE", f"SeriesInstanceUID={ct_series}",
        "SOPInstanceUID", "InstanceNumber", "SOPClassUID",
    )  # fmt: skip
    assert [int(i.InstanceNumber) for i in images] == list(range(1, 11))
    assert {i.SOPInstanceUID for i in images} <= set(study_files(qr))
    assert {i.SOPClassUID for i in images} == {CTImageStorage}


def test_find_returns_requested_keys_and_unique_keys_only(qr: QR) -> None:
    (study,) = findscu(
        qr, "-S", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={qr.study_uid}",
        "StudyDescription", "SpecificCharacterSet=ISO_IR 100", "InstitutionName",
    )  # fmt: skip
    assert {e.keyword for e in study} == {
        "SpecificCharacterSet",
        "QueryRetrieveLevel",
        "RetrieveAETitle",
        "StudyInstanceUID",
        "StudyDescription",
        "InstitutionName",  # not indexed: returned empty
    }
    assert study.SpecificCharacterSet == "ISO_IR 100"
    assert study.RetrieveAETitle == qr.node.ae_title
    assert study.InstitutionName == ""

    series = findscu(
        qr, "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={qr.study_uid}", "Modality=PT"
    )
    (pt,) = series
    assert {e.keyword for e in pt} == {
        "QueryRetrieveLevel",
        "RetrieveAETitle",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
    }


def test_find_study_root_date_range_wildcards_and_case(qr: QR) -> None:
    def studies(*keys: str) -> set[str]:
        found = findscu(qr, "-S", "QueryRetrieveLevel=STUDY", "PatientID", *keys)
        return {ds.PatientID for ds in found}

    phantom = {qr.patient_id}
    assert studies("StudyDate=20260101") >= phantom
    assert studies("StudyDate=20251231-20260101") >= phantom
    assert studies("StudyDate=20260101-") >= phantom
    assert studies("StudyDate=-20260101") >= phantom
    assert not studies("StudyDate=-20251231") & phantom
    assert not studies("StudyDate=20260102-") & phantom
    assert studies("StudyTime=1000-1100", "StudyDate=20260101") >= phantom
    assert studies("StudyTime=-1015") >= phantom  # 101500 lies within "up to 10:15"
    assert not studies("StudyTime=1016-") & phantom
    # SH is case-sensitive; PN case-insensitive (PS3.4 C.2.2.2.1).
    assert studies("AccessionNumber=PH*11") == phantom
    assert not studies("AccessionNumber=ph*11")
    assert studies("AccessionNumber=PH0000001?") == phantom
    assert studies("PatientName=phantom^synth*") == phantom
    assert studies("PatientName=PHANTOM^SYNTHETIC") == phantom
    assert studies("ModalitiesInStudy=MR") == phantom
    assert studies("ModalitiesInStudy=US\\P?") == phantom
    assert not studies("ModalitiesInStudy=US")
    (study,) = findscu(
        qr, "-S", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={qr.study_uid}",
        "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    )  # fmt: skip
    assert list(study.ModalitiesInStudy) == ["CT", "MR", "PT"]
    assert study.NumberOfStudyRelatedSeries == 4
    assert study.NumberOfStudyRelatedInstances == 24


def test_find_uid_list_and_universal_matching(qr: QR) -> None:
    first, second = (pydicom.dcmread(p) for p in qr.study.series["CT"][2:4])
    listed = findscu(
        qr, "-S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={qr.study_uid}",
        f"SeriesInstanceUID={first.SeriesInstanceUID}",
        f"SOPInstanceUID={first.SOPInstanceUID}\\{second.SOPInstanceUID}\\1.2.3.4",
    )  # fmt: skip
    assert {ds.SOPInstanceUID for ds in listed} == {first.SOPInstanceUID, second.SOPInstanceUID}
    everything = findscu(qr, "-S", "QueryRetrieveLevel=STUDY", "StudyInstanceUID")
    assert len(everything) == 1 + len(ESCAPES)


def _series_uids(qr: QR, key: str) -> set[str]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in qr.study.series[key]
    }


def test_find_refuses_relational_queries(qr: QR) -> None:
    out = subprocess.run(
        [require_binary("findscu"), "-v", "-P", "-aet", "FINDSCU", "-aec", qr.node.ae_title,
         "127.0.0.1", str(qr.node.port), "-k", "QueryRetrieveLevel=STUDY", "-k",
         "StudyInstanceUID"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "DataSetDoesNotMatchSOPClass" in out.stderr or "a900" in out.stderr.lower()


def test_unconfigured_peer_cannot_query(qr: QR) -> None:
    out = subprocess.run(
        [require_binary("findscu"), "-S", "-aet", "INTRUDER", "-aec", qr.node.ae_title,
         "127.0.0.1", str(qr.node.port), "-k", "QueryRetrieveLevel=STUDY"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0
    assert "Rejected" in out.stderr


# -- C-MOVE and C-GET with dcmtk -------------------------------------------------------


def movescu(qr: QR, destination: str, *keys: str) -> subprocess.CompletedProcess[str]:
    args = [a for key in keys for a in ("-k", key)]
    return subprocess.run(
        [require_binary("movescu"), "-v", "-S", "-aet", "MOVESCU", "-aec", qr.node.ae_title,
         "-aem", destination, "127.0.0.1", str(qr.node.port), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _associations_received(qr: QR) -> int:
    return qr.receiver_log.read_text(errors="replace").count("Association Received")


def test_move_study_to_destination_is_pixel_identical(qr: QR) -> None:
    clear(qr.received)
    before = _associations_received(qr)
    result = movescu(qr, "DEST", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={qr.study_uid}")
    assert result.returncode == 0, result.stderr + qr.node.log()[-4000:]
    originals = study_files(qr)
    wait_for(lambda: len(list(qr.received.iterdir())) == len(originals), what="all instances")
    received = received_by_uid(qr.received)
    assert set(received) == set(originals)
    for uid, path in originals.items():
        original = pydicom.dcmread(path)
        assert received[uid].PixelData == original.PixelData, uid
        assert received[uid].StudyInstanceUID == original.StudyInstanceUID
    # One association carried the whole move.
    assert _associations_received(qr) == before + 1
    wait_for(lambda: "C-MOVE from MOVESCU to DEST" in qr.node.log(), what="move logged")
    assert "24 completed, 0 warning, 0 failed/not sent" in qr.node.log()


def test_move_series_list_to_peer_with_port(qr: QR) -> None:
    clear(qr.received)
    mr = [
        str(pydicom.dcmread(qr.study.series[key][0], stop_before_pixels=True).SeriesInstanceUID)
        for key in ("MR_T1", "MR_T2")
    ]
    result = movescu(
        qr, "PEERSCP", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={qr.study_uid}",
        "SeriesInstanceUID=" + "\\".join(mr),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + qr.node.log()[-4000:]
    expected = _series_uids(qr, "MR_T1") | _series_uids(qr, "MR_T2")
    wait_for(lambda: len(list(qr.received.iterdir())) == len(expected), what="MR instances")
    assert set(received_by_uid(qr.received)) == expected


def test_move_to_unknown_destination_is_a801(qr: QR) -> None:
    result = movescu(qr, "NOWHERE", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={qr.study_uid}")
    assert re.search(r"a801|MoveDestinationUnknown", result.stderr, re.IGNORECASE), result.stderr
    assoc = associate(qr, StudyRootQueryRetrieveInformationModelMove)
    try:
        responses = list(
            assoc.send_c_move(
                identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=qr.study_uid),
                "NOWHERE",
                StudyRootQueryRetrieveInformationModelMove,
            )
        )
    finally:
        assoc.release()
    assert [status.Status for status, _ in responses] == [0xA801]


def test_getscu_retrieves_the_study(qr: QR) -> None:
    out = qr.work / "get"
    out.mkdir()
    result = subprocess.run(
        [require_binary("getscu"), "-S", "-aet", "GETSCU", "-aec", qr.node.ae_title,
         "-od", str(out), "127.0.0.1", str(qr.node.port), "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={qr.study_uid}"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TCP_NODELAY": "1"},  # dcmtk receivers leave Nagle on otherwise
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + qr.node.log()[-4000:]
    originals = study_files(qr)
    received = received_by_uid(out)
    assert set(received) == set(originals)
    for uid, path in originals.items():
        assert received[uid].PixelData == pydicom.dcmread(path).PixelData, uid
    wait_for(lambda: "C-GET from GETSCU" in qr.node.log(), what="get logged")


# -- pynetdicom: escaping, character sets, malformed identifiers, cancel --------------


def test_percent_and_underscore_match_literally(qr: QR) -> None:
    assoc = associate(qr, StudyRootQueryRetrieveInformationModelFind)
    try:

        def patients(accession: str) -> set[str]:
            statuses, found = c_find(
                assoc,
                identifier(QueryRetrieveLevel="STUDY", AccessionNumber=accession, PatientID=""),
            )
            assert statuses[-1].Status == 0x0000
            return {str(ds.PatientID) for ds in found}

        assert patients("50%_OFF") == {"ESC-1"}
        assert patients("50%*") == {"ESC-1"}  # a SQL '%' would match 50AB_OFF too
        assert patients("50?_OFF") == {"ESC-1", "ESC-3"}  # '?' is one character
        assert patients("50A_*") == {"ESC-3"}  # a SQL '_' would match 50AB_OFF too
        assert patients("50*_OFF") == set(ESCAPES)
        assert patients("50%_off") == set()  # case-sensitive
        assert patients("x' OR '1'='1") == set()
        assert patients("[5]0*") == set()  # GLOB classes are literal too
    finally:
        assoc.release()


def test_non_ascii_name_is_returned_in_utf8(qr: QR) -> None:
    assoc = associate(qr, StudyRootQueryRetrieveInformationModelFind)
    try:
        query = identifier(
            SpecificCharacterSet="ISO_IR 192",
            QueryRetrieveLevel="STUDY",
            PatientName="müller*",
            PatientID="",
        )
        statuses, found = c_find(assoc, query)
    finally:
        assoc.release()
    assert statuses[-1].Status == 0x0000
    (match,) = found
    assert match.SpecificCharacterSet == "ISO_IR 192"
    assert str(match.PatientName) == NON_ASCII_NAME
    assert match.PatientID == "ESC-3"
    assert NON_ASCII_NAME not in qr.node.log() and "ESC-3" not in qr.node.log()


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize(
    ("model", "keys", "offending"),
    [
        (StudyRootQueryRetrieveInformationModelFind, {"PatientID": ""}, 0x00080052),
        (StudyRootQueryRetrieveInformationModelFind, {"QueryRetrieveLevel": "FOO"}, 0x00080052),
        (StudyRootQueryRetrieveInformationModelFind, {"QueryRetrieveLevel": "PATIENT"}, 0x00080052),
        (PatientRootQueryRetrieveInformationModelFind, {"QueryRetrieveLevel": "STUDY"}, 0x00100020),
        (
            StudyRootQueryRetrieveInformationModelFind,
            {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "1.2.3"},
            0x0020000E,
        ),
        (
            StudyRootQueryRetrieveInformationModelFind,
            {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2.*"},
            0x0020000D,
        ),
        (
            StudyRootQueryRetrieveInformationModelFind,
            {"QueryRetrieveLevel": "STUDY", "StudyDate": "2026-01-01"},
            0x00080020,
        ),
    ],
)
def test_malformed_find_identifier_fails_and_node_keeps_serving(
    qr: QR, model: str, keys: dict[str, str], offending: int
) -> None:
    assoc = associate(qr, model, StudyRootQueryRetrieveInformationModelFind)
    try:
        statuses, found = c_find(assoc, identifier(**keys), model)
        assert found == []
        (status,) = statuses
        assert status.Status == 0xA900
        assert status.ErrorComment
        assert status.OffendingElement == offending
        # The same association still answers a valid query.
        statuses, found = c_find(
            assoc, identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=qr.study_uid)
        )
        assert statuses[-1].Status == 0x0000 and len(found) == 1
    finally:
        assoc.release()


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_malformed_retrieve_identifiers_fail(qr: QR) -> None:
    assoc = associate(
        qr, StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove
    )
    try:
        (rsp,) = list(
            assoc.send_c_get(
                identifier(StudyInstanceUID=qr.study_uid), StudyRootQueryRetrieveInformationModelGet
            )
        )
        assert rsp[0].Status == 0xA900 and "QueryRetrieveLevel" in rsp[0].ErrorComment
        (rsp,) = list(
            assoc.send_c_get(
                identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2.*"),
                StudyRootQueryRetrieveInformationModelGet,
            )
        )
        assert rsp[0].Status == 0xA900
        # C-MOVE can only answer pynetdicom's "Unable to process" before a destination.
        (rsp,) = list(
            assoc.send_c_move(
                identifier(StudyInstanceUID=qr.study_uid),
                "DEST",
                StudyRootQueryRetrieveInformationModelMove,
            )
        )
        assert 0xC000 <= rsp[0].Status <= 0xCFFF
        # Nothing matched: Success with no sub-operations.
        responses = list(
            assoc.send_c_move(
                identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2.3.4"),
                "DEST",
                StudyRootQueryRetrieveInformationModelMove,
            )
        )
        assert [r[0].Status for r in responses] == [0x0000]
    finally:
        assoc.release()


def test_find_honours_cancel(qr: QR) -> None:
    """The handler itself, with an event whose C-CANCEL arrives after the
    first response (over the network the order would depend on timing)."""
    ct = pydicom.dcmread(qr.study.series["CT"][0], stop_before_pixels=True)
    ds = identifier(QueryRetrieveLevel="IMAGE", SeriesInstanceUID=ct.SeriesInstanceUID)
    ds.SOPInstanceUID = ""
    checks = iter([False, True])

    class CancelledAfterOne:
        identifier = decode(BytesIO(encode(ds, True, True) or b""), True, True)
        request = SimpleNamespace(AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelFind)
        assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="TESTSCU"))

        @property
        def is_cancelled(self) -> bool:
            return next(checks)

    event = CancelledAfterOne()
    engine = create_db_engine(qr.database_url)
    try:
        responses = list(handle_find(event, engine, "PACSNODE"))  # type: ignore[arg-type]
    finally:
        engine.dispose()
    assert [status for status, _ in responses] == [0xFF00, 0xFE00]
    assert responses[0][1] is not None and responses[1][1] is None


def test_logs_carry_no_patient_names_or_ids(qr: QR) -> None:
    log = qr.node.log()
    assert "C-FIND" in log and "C-MOVE" in log and "C-GET" in log
    for phi in (qr.patient_id, "Phantom^Synthetic", NON_ASCII_NAME, *ESCAPES, *ESCAPES.values()):
        assert phi not in log, phi


# -- matching rules without a node -----------------------------------------------------


def test_query_plans() -> None:
    study_root = InformationModel.STUDY_ROOT
    query = find_query(
        study_root,
        "SERIES",
        {"StudyInstanceUID": ("1.2.3",), "Modality": ("CT",), "PatientName": (), "Rows": ("5",)},
    )
    assert dict(query.matching) == {"StudyInstanceUID": ("1.2.3",), "Modality": ("CT",)}
    assert query.returned == ("PatientName", "StudyInstanceUID", "SeriesInstanceUID", "Modality")
    assert (query.unsupported, query.ignored) == (("Rows",), ("Rows",))
    # Universal matching for a lone '*', even of a UID.
    assert "StudyDate" not in find_query(study_root, "STUDY", {"StudyDate": ("*",)}).matching
    with pytest.raises(InvalidQuery, match="SeriesInstanceUID"):
        retrieve_query(study_root, "SERIES", {"StudyInstanceUID": ("1.2.3",)})
    with pytest.raises(InvalidQuery, match="single value"):
        retrieve_query(InformationModel.PATIENT_ROOT, "PATIENT", {"PatientID": ("A", "B")})
    plan = retrieve_query(study_root, "IMAGE", {"SOPInstanceUID": ("1.2", "1.3"), "Rows": ("5",)})
    assert dict(plan.matching) == {"SOPInstanceUID": ("1.2", "1.3")}
