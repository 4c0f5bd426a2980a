"""Hostile input: malformed PDUs from a scripted raw-socket peer, malformed
data sets over real associations, and property-based fuzzing of the ingest
and preprocessing entry points. Each gets a DICOM status or a recorded job
error, the SCP's memory stays bounded and the node keeps serving (a C-ECHO
after each case).

Invalid and path-like UIDs are covered in ``test_policy_and_faults.py``
(hostile UID tests) and ``test_dataset.py``; a missing Study Instance UID in
``test_storage_scp.py``.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from pacsnode.core.errors import IngestError, PreprocessError
from pacsnode.lab.phantom import SeriesSpec, ct_series_datasets
from pacsnode.scp.dataset import instance_record, read_header
from pacsnode.workers.volume import load_series
from tests.support import Node, child_pids, node_config, wait_for
from tests.test_assembly import FAST, jobs
from tests.test_pipeline import NO_MODELS, finished

SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def echo(node: Node) -> bool:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0x0000
    assoc.release()
    return bool(ok)


def settled(node: Node) -> None:
    """All services up: the Celery worker service has forked its pool process."""
    assert node.process is not None
    pid = node.process.pid
    wait_for(lambda: any(child_pids(c) for c in child_pids(pid)), timeout=60, what="worker pool")
    assert echo(node)


def rss_mb(node: Node) -> float:
    """Resident memory of the node's processes except the Celery worker
    (the service with a pool process below it): the SCP processes, the
    assembler and the dispatcher."""
    assert node.process is not None
    total = 0
    for pid in child_pids(node.process.pid):
        if child_pids(pid):  # the Celery worker service has a pool process
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1])
    return total / 1024


def raw(node: Node, data: bytes, *, dribble: float = 0.0, linger: float = 0.5) -> bytes:
    """Send ``data`` on a raw TCP connection (``dribble``: seconds between
    bytes), then read whatever the node answers until it closes or ``linger``."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        try:
            if dribble:
                for byte in data:
                    sock.sendall(bytes([byte]))
                    time.sleep(dribble)  # the fault itself: a slow sender
            else:
                sock.sendall(data)
        except OSError:
            pass  # the node may close first
        sock.settimeout(linger)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (TimeoutError, OSError):
            pass
        return answer


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body) if length is None else length) + body


def associate_rq() -> bytes:
    """A well-formed A-ASSOCIATE-RQ (PS3.8 9.3.2) for the node, from pynetdicom's encoder."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context
    from pynetdicom.transport import AddressInformation

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "TESTSCU"
    primitive.called_ae_title = "PACSNODE"
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 11112)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 11112)
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    return bytes(request.encode())


@SQLITE_ONLY
def test_malformed_pdus_are_answered_and_memory_stays_bounded(make_node: Any) -> None:
    node: Node = make_node(config=node_config(disabled_models=NO_MODELS)).start()
    good = associate_rq()
    settled(node)
    baseline = rss_mb(node)
    cases = {
        "truncated A-ASSOCIATE-RQ": good[: len(good) // 2],
        "length longer than the data": pdu(0x01, good[6:], length=len(good) + 500)[:200],
        "length shorter than the data": pdu(0x01, good[6:], length=10) + good[16:],
        "4 GiB length": pdu(0x01, b"\x00" * 64, length=0xFFFFFFF0),
        "unknown PDU type 0x09": pdu(0x09, b"\x00" * 16),
        "P-DATA-TF before association": pdu(0x04, struct.pack(">LBB", 2, 1, 3)),
        "A-RELEASE-RQ before association": pdu(0x05, b"\x00" * 4),
        "random bytes": bytes(range(256)) * 8,
        "zero bytes": b"\x00" * 1024,
    }
    answers: dict[str, bytes] = {}
    for name, data in cases.items():
        answers[name] = raw(node, data)
        assert echo(node), f"not serving after {name}"
    # A PDU the node can read but not accept gets an A-ABORT (0x07) or an
    # A-ASSOCIATE-RJ (0x03); an incomplete one ends the connection.
    for name in ("unknown PDU type 0x09", "P-DATA-TF before association"):
        assert answers[name][:1] in (b"\x07", b""), (name, answers[name][:8])
    # A slow sender holds its own connection only: others are served meanwhile.
    slow = threading.Thread(target=raw, args=(node, good[:40]), kwargs={"dribble": 0.05})
    slow.start()
    assert echo(node)
    slow.join(timeout=30)
    # The full request, dribbled byte by byte, is still understood.
    assert raw(node, good, dribble=0.002, linger=2)[:1] == b"\x02"  # A-ASSOCIATE-AC
    grown = rss_mb(node) - baseline
    assert grown < 64, f"SCP memory grew by {grown:.0f} MB"
    assert node.process is not None and node.process.poll() is None


def _study(**changes: Any) -> pydicom.Dataset:
    ds = ct_series_datasets(SeriesSpec(slices=1, rows=32, columns=32))[0]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


@SQLITE_ONLY
def test_malformed_data_sets_get_a_status_or_a_job_error(make_node: Any, tmp_path: Path) -> None:
    node: Node = make_node(config=node_config(completion=FAST, disabled_models=NO_MODELS)).start()
    settled(node)
    baseline = rss_mb(node)
    truncated = _study()
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 3]
    giant = _study(Rows=65535, Columns=65535)  # 8 GiB of 16-bit pixels, claimed
    no_rows = _study(Rows=None)
    bad_charset = _study(SpecificCharacterSet="ISO_IR 999")
    bad_charset.PatientName = b"\xff\xfe\xfd\x00Name"
    stored_cases = {
        "truncated pixel data": (truncated, "pixel data"),
        "Rows x Columns x Frames claiming gigabytes": (giant, "declares"),
        "missing Rows": (no_rows, "Rows or Columns"),
    }
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    assert assoc.is_established
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        for name, (ds, _) in stored_cases.items():
            # Stored as received (PS3.4 B.4.1: the SCP need not check pixel data).
            assert assoc.send_c_store(ds).Status == 0x0000, name
        status = assoc.send_c_store(bad_charset).Status
    finally:
        pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
        assoc.release()
    assert status == 0x0000  # stored; an unknown character set is not the SCP's concern
    # A data set whose element lengths run past its end: refused, not stored.
    broken = tmp_path / "broken.dcm"
    _study().save_as(broken, enforce_file_format=True)
    raw_bytes = bytearray(broken.read_bytes())
    marker = raw_bytes.find(b"\x08\x00\x60\x00")  # (0008,0060) Modality
    raw_bytes[marker + 6 : marker + 8] = b"\xff\x7f"  # length 32767
    broken.write_bytes(bytes(raw_bytes[: marker + 40]))
    ae2 = AE(ae_title="TESTSCU")
    ae2.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae2.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    pynetdicom_config = __import__("pynetdicom")._config
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        rsp = assoc.send_c_store(broken)
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    assert rsp.Status in (0xA900,) or 0xC000 <= rsp.Status <= 0xCFFF, hex(rsp.Status)
    assert echo(node)

    done = wait_for(lambda: finished(node, 4), timeout=90, what="four jobs to finish")
    by_study = {j.study_pk: j for j in done}
    assert len(by_study) == 4
    errors = [j.error for j in done if j.state == "failed"]
    for name, (_, expected) in stored_cases.items():
        assert any(expected in e for e in errors), (name, [(j.state, j.error) for j in done])
    assert sum(j.state == "succeeded" for j in done) == 1  # the odd character set
    assert rss_mb(node) - baseline < 64
    assert echo(node)
    assert jobs(node)


# --- property-based fuzzing of the entry points -----------------------------------


def _valid_encoding() -> bytes:
    buffer = BytesIO()
    _study().save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


VALID = _valid_encoding()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[position] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[position : position + draw(st.integers(1, 64))]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        if not data:
            break
    return bytes(data)


FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same cases every run: CI failures reproduce
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(st.one_of(mutated(), st.binary(max_size=512)))
def test_fuzz_ingest_header_parsing(data: bytes) -> None:
    """What the C-STORE handler runs on every received data set: a record or
    an IngestError (a DICOM failure status), never another exception."""
    try:
        record = instance_record(
            read_header(data),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            size_bytes=len(data),
            calling_ae_title="FUZZ",
            peer_host="127.0.0.1",
            received_at=datetime.now(UTC),
        )
    except IngestError:
        return
    assert record.sop_instance_uid and record.study_instance_uid


@FUZZ
@given(mutated())
def test_fuzz_preprocessing_load(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    """The worker's first stage: a Volume or a PreprocessError (recorded as
    the job's error), never another exception and never a huge allocation."""
    path = tmp_path_factory.mktemp("fuzz") / "x.dcm"
    path.write_bytes(data)
    try:
        volume = load_series([path])
    except PreprocessError:
        return
    assert volume.array.size <= 32 * 32 * 4
