"""UID grammar, header parsing and the durable spool."""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread

from pacsnode.core.errors import InvalidDataset, NonConformantDataset, OutOfResources
from pacsnode.lab.phantom import SeriesSpec, ct_series_datasets
from pacsnode.scp.dataset import instance_record, is_valid_uid, read_header
from pacsnode.scp.spool import Spool


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "0.0", "1.2." + "9" * 60])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid) == (len(uid) <= 64)


@pytest.mark.parametrize(
    "uid",
    [
        "../../etc",
        "1.2/3",
        "1.2.03",
        ".1.2",
        "1..2",
        "1.2.",
        "1",
        "",
        "1.2.3\x00.4",
        "1.2 .3",
        "1.2.3" + ".1" * 40,
    ],
)
def test_hostile_or_malformed_uids_are_invalid(uid: str) -> None:
    assert not is_valid_uid(uid)


def _encoded(**changes: object) -> bytes:
    ds = ct_series_datasets(SeriesSpec(slices=1, rows=8, columns=8))[0]
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _record(encoded: bytes):  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    return instance_record(
        read_header(encoded),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        size_bytes=len(encoded),
        calling_ae_title="CT1",
        peer_host="127.0.0.1",
        received_at=datetime.now(UTC),
    )


def test_record_from_header() -> None:
    record = _record(_encoded())
    assert record.modality == "CT"
    assert record.path == (
        f"{record.study_instance_uid}/{record.series_instance_uid}/{record.sop_instance_uid}.dcm"
    )


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_missing_filing_uid_is_refused(keyword: str) -> None:
    with pytest.raises(NonConformantDataset, match=keyword):
        _record(_encoded(**{keyword: None}))


def test_path_like_uid_is_refused() -> None:
    with pytest.raises(NonConformantDataset, match="not a valid UID"):
        _record(_encoded(SeriesInstanceUID="../../../etc"))


@pytest.mark.parametrize(
    "garbage", [b"", b"\x00" * 128 + b"DICM" + b"\xff" * 50, b"\x08\x00\x16\x00UI\xff\xff"]
)
def test_garbage_is_refused(garbage: bytes) -> None:
    # pydicom reads much garbage without complaint; the UID checks catch it.
    with pytest.raises((InvalidDataset, NonConformantDataset)):
        _record(garbage)


def test_spool_adopts_a_received_file_durably(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    received = spool.incoming / "tmp123.dcm"
    received.write_bytes(b"a" * 1000)
    assert spool.adopt(received, "1.2/1.2.3/1.2.3.4.dcm") == 1000
    assert (tmp_path / "spool/1.2/1.2.3/1.2.3.4.dcm").read_bytes() == b"a" * 1000
    assert not received.exists()
    # Re-sent: replaced, not duplicated.
    again = spool.incoming / "tmp456.dcm"
    again.write_bytes(b"new")
    spool.adopt(again, "1.2/1.2.3/1.2.3.4.dcm")
    assert [p.name for p in (tmp_path / "spool/1.2/1.2.3").iterdir()] == ["1.2.3.4.dcm"]
    assert (tmp_path / "spool/1.2/1.2.3/1.2.3.4.dcm").read_bytes() == b"new"


def test_crash_leftovers_are_cleared(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    (spool.incoming / "partial.dcm").write_bytes(b"half")
    assert spool.clear_incoming() == 1
    assert not list(spool.incoming.iterdir())


def test_spool_watermark(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    spool = Spool(tmp_path, min_free_bytes=st.f_bavail * st.f_frsize + 2**30)
    with pytest.raises(OutOfResources, match="watermark"):
        spool.check_space(100)


def test_encoded_bytes_round_trip() -> None:
    encoded = _encoded()
    assert dcmread(BytesIO(encoded)).Modality == "CT"
