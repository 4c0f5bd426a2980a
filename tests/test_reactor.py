"""The race-free reactor checkpoint (scp.patches) on pynetdicom associations,
and how the patches are installed: explicitly, for a tested pynetdicom only.

The race it closes is a thread interleaving that real traffic hits about
once in 2,800 C-STOREs, so the first test forces that interleaving; the
others check that associations built with it still send, release on a
network timeout and hold up over many C-STOREs to dcmtk's storescp.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association

from pacsnode.core.errors import ConfigError
from pacsnode.scp import patches
from pacsnode.scp.patches import Checkpoint
from tests.support import free_port, require_binary, wait_for

# The session fixture of tests/conftest.py installed the patches already;
# installing is idempotent.
patches.install()


def test_sender_never_sees_paused_after_the_reactor_has_passed_the_checkpoint() -> None:
    assoc = Association(AE("RACE"), "requestor")
    checkpoint = assoc._reactor_checkpoint
    assert isinstance(checkpoint, Checkpoint)
    passed, resume = threading.Event(), threading.Event()

    def reactor() -> None:  # one turn of pynetdicom's reactor loop, preempted
        assoc._is_paused = True
        checkpoint.wait()
        passed.set()
        resume.wait(10)  # ...before it sets _is_paused = False and reads the queue
        assoc._is_paused = False

    thread = threading.Thread(target=reactor)
    thread.start()
    try:
        assert passed.wait(10)
        checkpoint.clear()  # what a send_c_*() call does first
        # The sender spins while the reactor is not paused: it must not send now.
        assert assoc._is_paused is False
    finally:
        resume.set()
        thread.join(10)


def test_the_reactor_clearing_its_own_checkpoint_counts_as_paused() -> None:
    assoc = Association(AE("RACE"), "requestor")
    checkpoint = assoc._reactor_checkpoint
    seen: list[bool] = []

    def reactor() -> None:
        checkpoint.wait()
        checkpoint.clear()  # release() called from the reactor thread
        seen.append(assoc._is_paused)

    thread = threading.Thread(target=reactor)
    thread.start()
    thread.join(10)
    assert seen == [True]


@pytest.fixture
def storescp(tmp_path: os.PathLike[str]) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [require_binary("storescp"), "--ignore", "-aet", "DEST", str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    echoscu = require_binary("echoscu")
    wait_for(
        lambda: subprocess.run([echoscu, "-aec", "DEST", "127.0.0.1", str(port)]).returncode == 0,
        what="storescp",
    )
    yield port
    proc.terminate()
    proc.wait(10)


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _associate(port: int, **timeouts: object) -> Association:
    ae = AE("RACE")
    ae.dimse_timeout = 10
    for name, value in timeouts.items():
        setattr(ae, name, value)
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DEST")
    assert assoc.is_established
    assert isinstance(assoc._reactor_checkpoint, Checkpoint)
    return assoc


def test_many_c_stores_over_one_association(storescp: int) -> None:
    assoc = _associate(storescp)
    sock = assoc.dul.socket
    assert sock is not None and sock.socket is not None
    sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        statuses = [assoc.send_c_store(_dataset()).Status for _ in range(500)]
    finally:
        assoc.release()
    assert statuses == [0x0000] * 500


def test_release_on_network_timeout_from_the_reactor(storescp: int) -> None:
    assoc = _associate(storescp, network_timeout=1.0)
    assoc.network_timeout_response = "A-RELEASE"
    wait_for(lambda: assoc.is_released, timeout=10, what="release after the network timeout")


def test_importing_the_scp_patches_nothing() -> None:
    """In a fresh interpreter: importing every scp module (and serve, and the
    Celery app) leaves pynetdicom as it is; install() then patches."""
    code = """
import pynetdicom.association as a
from pynetdicom import AE
original = a.Association.__init__
import pacsnode.scp, pacsnode.scp.server, pacsnode.scp.export, pacsnode.scp.echo
import pacsnode.scp.scu, pacsnode.scp.patches, pacsnode.serve, pacsnode.workers.celery_app
assert a.Association.__init__ is original, "patched on import"
assert not pacsnode.scp.patches.installed()
assert not isinstance(a.Association(AE(), "requestor")._reactor_checkpoint,
                      pacsnode.scp.patches.Checkpoint)
pacsnode.scp.patches.install()
pacsnode.scp.patches.install()
assert a.Association.__init__ is not original
assert isinstance(a.Association(AE(), "requestor")._reactor_checkpoint,
                  pacsnode.scp.patches.Checkpoint)
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("found", ["3.0.3", "3.1.0", "4.0.0"])
def test_install_refuses_an_untested_pynetdicom(
    found: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(patches, "installed_version", lambda _name: found)
    monkeypatch.setattr(patches, "_installed", False)
    with pytest.raises(ConfigError) as caught:
        patches.install()
    message = str(caught.value)
    assert f"pynetdicom {found} is installed" in message
    assert ">=3.0.4" in message and "<3.1" in message
    assert not patches.installed()


def test_install_accepts_the_tested_range(monkeypatch: pytest.MonkeyPatch) -> None:
    for found in ("3.0.4", "3.0.9"):
        assert patches.check_version(found) == found
    monkeypatch.setattr(patches, "installed_version", lambda _name: "3.0.5")
    assert patches.check_version() == "3.0.5"
