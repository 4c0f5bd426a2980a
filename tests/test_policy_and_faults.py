"""Peer policy, hostile input, disk watermark and crash durability, over real sockets."""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from pacsnode.db.models import Instance
from pacsnode.db.session import create_db_engine
from pacsnode.lab.phantom import SeriesSpec, ct_series_datasets
from tests.faultreport import ledger, lost_and_duplicated
from tests.support import Node, free_port, node_config, require_binary, wait_for


def associate(node: Node, calling: str = "TESTSCU", called: str = "PACSNODE"):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.network_timeout = 20
    return ae.associate("127.0.0.1", node.port, ae_title=called)


def rejection(assoc) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    return rj.result, rj.result_source, rj.diagnostic


def indexed_uids(node: Node) -> set[str]:
    engine = create_db_engine(node.database_url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(select(Instance.sop_instance_uid)).scalars())
    finally:
        engine.dispose()


def test_known_peer_is_accepted(node: Node) -> None:
    assoc = associate(node)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_unknown_calling_ae_is_rejected(node: Node) -> None:
    # PS3.8 9.3.4: rejected-permanent, service-user, calling-AE-title-not-recognized
    assert rejection(associate(node, calling="INTRUDER")) == (1, 1, 3)
    wait_for(lambda: "association rejected: INTRUDER@127.0.0.1" in node.log(), what="log line")


def test_known_ae_from_wrong_host_is_rejected(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(config=node_config(peers=[{"ae_title": "TESTSCU", "hosts": ["10.9.9.9"]}]))
    node.start()
    assert rejection(associate(node)) == (1, 1, 3)


def test_wrong_called_ae_is_rejected(node: Node) -> None:
    assert rejection(associate(node, called="NOT_PACSNODE")) == (1, 1, 7)


def test_no_peers_configured_means_nobody(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(config=node_config(peers=[])).start()
    assert rejection(associate(node)) == (1, 1, 3)


def test_association_limit(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(config=node_config(max_associations=2, scp_processes=2)).start()
    held = [associate(node) for _ in range(2)]
    assert all(a.is_established for a in held)
    # Transient, service-provider (presentation), local-limit-exceeded.
    assert rejection(associate(node)) == (2, 3, 2)
    for assoc in held:
        assoc.release()
    wait_for(lambda: associate_and_release(node), what="a slot to free up")


def associate_and_release(node: Node) -> bool:
    assoc = associate(node)
    if assoc.is_established:
        assoc.release()
        return True
    return False


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_hostile_uid_is_refused_and_nothing_written(node: Node, keyword: str) -> None:
    ds = ct_series_datasets(SeriesSpec(slices=1, rows=16, columns=16))[0]
    setattr(ds, keyword, "../../../../tmp/pwned")
    assoc = associate(node)
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        rsp = assoc.send_c_store(ds)
    finally:
        pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
        assoc.release()
    assert rsp.Status == 0xA900
    assert "not a valid UID" in rsp.ErrorComment
    assert not list(node.data_dir.rglob("*.dcm"))
    assert not Path("/tmp/pwned").exists()
    assert indexed_uids(node) == set()
    # The node keeps serving.
    assert associate_and_release(node)


def test_hostile_sop_instance_uid_from_dcmtk(node: Node, tmp_path: Path) -> None:
    """A file whose SOP Instance UID is a path, sent by storescu (no UID checks)."""
    ds = ct_series_datasets(SeriesSpec(slices=1, rows=16, columns=16))[0]
    hostile = "../../../../../tmp/pacsnode-pwned"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = hostile
    path = tmp_path / "hostile.dcm"
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        ds.save_as(path, enforce_file_format=True)
    finally:
        pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    result = subprocess.run(
        [
            require_binary("storescu"),
            "-v",
            "-aec",
            "PACSNODE",
            "127.0.0.1",
            str(node.port),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "DataSetDoesNotMatchSOPClass" in result.stderr  # 0xA900
    assert not list(node.data_dir.rglob("*.dcm"))
    assert not Path("/tmp/pacsnode-pwned.dcm").exists()


@pytest.mark.faults
def test_disk_watermark_gives_out_of_resources(make_node, fault_report) -> None:  # type: ignore[no-untyped-def]
    node = make_node(config=node_config(min_free_disk_mb=1 << 40)).start()
    assoc = associate(node)
    rsp = assoc.send_c_store(ct_series_datasets(SeriesSpec(slices=1, rows=16, columns=16))[0])
    assoc.release()
    assert rsp.Status == 0xA700
    assert "watermark" in rsp.ErrorComment
    assert not list(node.data_dir.rglob("*.dcm"))
    book = ledger(node.database_url)
    # Refused with a transient status: the sender keeps it and retries later.
    fault_report("disk watermark reached (0xA700)", sent=1, stored=len(book.instances))
    assert associate_and_release(node)  # still serving


@pytest.mark.faults
def test_kill9_during_associations_then_the_sender_resends(make_node, fault_report) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL of the whole node while three associations send: every
    acknowledged instance survives; the senders resend what was not
    acknowledged, and each instance ends up stored exactly once."""
    started = time.monotonic()
    node = make_node().start()
    datasets = ct_series_datasets(SeriesSpec(slices=60, rows=64, columns=64))
    acknowledged: list[str] = []
    sent = 0
    stop = threading.Event()

    def sender(chunk: list[pydicom.Dataset]) -> None:
        nonlocal sent
        assoc = associate(node)
        for ds in chunk:
            if stop.is_set():
                break
            try:
                sent += 1
                rsp = assoc.send_c_store(ds)
            except Exception:
                break
            if rsp and rsp.Status == 0x0000:
                acknowledged.append(str(ds.SOPInstanceUID))
        assoc.abort()

    threads = [threading.Thread(target=sender, args=(datasets[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    # Kill the whole node while the burst is in flight.
    wait_for(lambda: len(acknowledged) >= 30, what="30 acknowledged instances")
    node.kill9()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(acknowledged) >= 30
    node.start()  # restart on the same data folder and database
    stored = indexed_uids(node)
    missing = set(acknowledged) - stored
    assert not missing, f"{len(missing)} acknowledged instances lost"
    spool = node.data_dir / "spool"
    for ds in datasets:
        if str(ds.SOPInstanceUID) in acknowledged:
            path = spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
            assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert associate_and_release(node)
    # The sender resends everything it has no Success for (PS3.4 B.2.3: an
    # unanswered C-STORE is not stored, as far as the sender knows).
    unacked = [ds for ds in datasets if str(ds.SOPInstanceUID) not in set(acknowledged)]
    assoc = associate(node)
    for ds in unacked:
        sent += 1
        assert assoc.send_c_store(ds).Status == 0x0000
        acknowledged.append(str(ds.SOPInstanceUID))
    assoc.release()
    book = ledger(node.database_url)
    files = Counter(p.stem for p in spool.rglob("*.dcm"))
    lost, duplicated = lost_and_duplicated(acknowledged, book.instances)
    fault_report(
        "SCP SIGKILL mid-association, sender resends",
        sent=sent,
        acked=len(set(acknowledged)),
        stored=len(book.instances),
        lost=lost + len(set(acknowledged) - set(files)),
        duplicated=duplicated + sum(n - 1 for n in files.values()),
        seconds=time.monotonic() - started,
    )
    assert len(book.instances) == len(datasets)


def test_cli_echo(node: Node) -> None:
    exe = require_binary("storescp")
    port = free_port()
    peer = subprocess.Popen([exe, "-aet", "REMOTE", str(port)], stderr=subprocess.DEVNULL)
    try:
        result = wait_for(
            lambda: (r := node.cli("echo", f"REMOTE@127.0.0.1:{port}")).returncode == 0 and r,
            what="pacsnode echo to storescp",
        )
        assert "success" in result.stdout
    finally:
        peer.terminate()
        peer.wait(timeout=10)
    closed = node.cli("echo", f"REMOTE@127.0.0.1:{free_port()}", "--timeout", "3")
    assert closed.returncode == 1
    assert "cannot connect to" in closed.stderr  # scp.scu.NoAssociation
    assert node.cli("echo", "not-a-target").returncode == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sigterm_right_after_start_stops_every_process(node: Node) -> None:
    """A stop request that reaches a child process before it has set up its
    own signal handling must not be lost (the node would hang on exit)."""
    assert node.process is not None
    children = subprocess.run(
        ["pgrep", "-P", str(node.process.pid)], capture_output=True, text=True
    ).stdout.split()
    node.process.terminate()
    assert node.process.wait(timeout=25) == 0
    for pid in children:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        ), f"child {pid} outlived the node"
