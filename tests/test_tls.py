"""DICOM over TLS (PS3.15 B.9): the SCP against dcmtk's storescu/echoscu
``+tls``, the export SCU against dcmtk's storescp ``+tls``, and certificate
errors at start-up. Certificates are made per test session with openssl."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest

from pacsnode.core.errors import ConfigError
from pacsnode.core.settings import Destination, load_settings
from pacsnode.db.migrate import upgrade
from pacsnode.db.session import create_db_engine
from pacsnode.lab.phantom import SeriesSpec, write_ct_series
from pacsnode.scp.export import run_due, send_batch
from tests.support import Node, free_port, node_config, require_binary, wait_for
from tests.test_exports import enqueue, listening, rows, spool
from tests.test_policy_and_faults import indexed_uids
from tests.tlscerts import Certificates, make_certificates

SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def tls_node(make_node: Any, certs: Certificates, require_client_cert: bool = True) -> Node:
    tls = {
        "cert_file": str(certs.server.cert),
        "key_file": str(certs.server.key),
        "ca_file": str(certs.ca.cert),
        "require_client_cert": require_client_cert,
    }
    node: Node = make_node(config=node_config(tls=tls)).start()
    return node


def dcmtk(
    tool: str, node: Node, *args: str, files: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary(tool), "-aet", "STORESCU", "-aec", "PACSNODE", *args,
         "127.0.0.1", str(node.port), *files],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def sop_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def tls_args(certs: Certificates, client: bool = True) -> list[str]:
    own = ["+tls", str(certs.client.key), str(certs.client.cert), "-pw"] if client else ["+tla"]
    return [*own, "+cf", str(certs.ca.cert)]


def echo_ok(node: Node, certs: Certificates) -> bool:
    return dcmtk("echoscu", node, *tls_args(certs)).returncode == 0


@SQLITE_ONLY
def test_storescu_over_tls_with_client_certificate(
    make_node: Any, certs: Certificates, tmp_path: Path
) -> None:
    node = tls_node(make_node, certs)
    series = sop_uids(write_ct_series(tmp_path / "ct", SeriesSpec(slices=3, rows=16, columns=16)))
    result = dcmtk("storescu", node, *tls_args(certs), "+sd", files=(str(tmp_path / "ct"),))
    assert result.returncode == 0, result.stderr
    assert indexed_uids(node) == series
    assert echo_ok(node, certs)
    assert "(TLS, client certificate required)" in node.log()


@SQLITE_ONLY
def test_client_without_or_with_untrusted_certificate_is_refused(
    make_node: Any, certs: Certificates
) -> None:
    node = tls_node(make_node, certs)
    anonymous = dcmtk("echoscu", node, *tls_args(certs, client=False))
    assert anonymous.returncode != 0
    rogue = dcmtk(
        "echoscu", node, "+tls", str(certs.rogue_client.key), str(certs.rogue_client.cert),
        "-pw", "+cf", str(certs.ca.cert),
    )  # fmt: skip
    assert rogue.returncode != 0
    wait_for(lambda: node.log().count("TLS handshake with 127.0.0.1") >= 2, what="log lines")
    assert echo_ok(node, certs)


@SQLITE_ONLY
def test_client_certificate_optional(make_node: Any, certs: Certificates) -> None:
    node = tls_node(make_node, certs, require_client_cert=False)
    assert dcmtk("echoscu", node, *tls_args(certs, client=False)).returncode == 0


@SQLITE_ONLY
def test_plain_tcp_client_on_tls_port_fails_cleanly(make_node: Any, certs: Certificates) -> None:
    node = tls_node(make_node, certs)
    plain = dcmtk("echoscu", node, "-to", "10")
    assert plain.returncode != 0
    # A peer that connects and says nothing holds only its own thread.
    with socket.create_connection(("127.0.0.1", node.port)) as silent:
        assert echo_ok(node, certs)
        silent.sendall(b"\x01\x00garbage")
    wait_for(lambda: "TLS handshake with 127.0.0.1" in node.log(), what="handshake log line")
    assert echo_ok(node, certs)
    assert node.process is not None and node.process.poll() is None


def storescp_tls(certs: Certificates, folder: Path, port: int) -> subprocess.Popen[str]:
    folder.mkdir()
    return subprocess.Popen(
        [require_binary("storescp"), "-aet", "TLSPACS", "+tls", str(certs.server.key),
         str(certs.server.cert), "-pw", "+cf", str(certs.ca.cert), "-rc", "-od", str(folder),
         "-fe", ".dcm", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_export_scu_to_storescp_over_tls(certs: Certificates, tmp_path: Path) -> None:
    port = free_port()
    received = tmp_path / "received"
    peer = storescp_tls(certs, received, port)
    try:
        series = sop_uids(
            write_ct_series(tmp_path / "out", SeriesSpec(slices=2, rows=16, columns=16))
        )
        files = sorted((tmp_path / "out").rglob("*.dcm"))
        settings = load_settings(ae_title="PACSNODE", data_dir=tmp_path / "data")

        def destination(**tls: Any) -> Destination:
            return Destination(
                name="tlspacs", ae_title="TLSPACS", host="127.0.0.1", port=port, tls=tls
            )

        good = destination(
            ca_file=certs.ca.cert, cert_file=certs.client.cert, key_file=certs.client.key
        )
        outcomes = wait_for(
            lambda: (
                (o := send_batch(settings, good, list(enumerate(files)))) and o[0].reached and o
            ),
            what="storescp +tls to accept",
        )
        assert all(o.sent for o in outcomes.values()), outcomes
        assert sop_uids(list(received.iterdir())) == series
        # storescp requires a client certificate (-rc): without one, no association.
        anonymous = destination(ca_file=certs.ca.cert)
        (refused,) = send_batch(settings, anonymous, [(9, files[0])]).values()
        assert not refused.sent and not refused.reached
        assert "TLS" in refused.reason
        # A server certificate from a CA we do not trust is refused too.
        untrusted = destination(
            ca_file=certs.rogue_ca.cert, cert_file=certs.client.cert, key_file=certs.client.key
        )
        (refused,) = send_batch(settings, untrusted, [(10, files[0])]).values()
        assert not refused.sent and not refused.reached
    finally:
        peer.terminate()
        peer.wait(timeout=10)


@SQLITE_ONLY
def test_queued_exports_keep_their_destinations_tls(
    certs: Certificates, database_url: str, tmp_path: Path
) -> None:
    """Export rows store the address, not the TLS settings: the worker takes
    them from the configured destination of that name when it sends, so a
    queued export to a TLS destination goes over TLS (with the client
    certificate storescp requires), never plain TCP."""
    port = free_port()
    received = tmp_path / "received"
    peer = storescp_tls(certs, received, port)
    engine = create_db_engine(database_url)
    upgrade(engine)
    try:
        tls = {
            "ca_file": certs.ca.cert,
            "cert_file": certs.client.cert,
            "key_file": certs.client.key,
        }
        dest = Destination(name="tlspacs", ae_title="TLSPACS", host="127.0.0.1", port=port, tls=tls)
        settings = load_settings(
            ae_title="PACSNODE", data_dir=tmp_path / "data", database_url=database_url,
            destinations=[dest.model_dump()],
        )  # fmt: skip
        uids = spool(engine, settings.spool_dir, 2, seed=41)
        enqueue(engine, sorted(uids), [dest], now=datetime.now(UTC))
        wait_for(lambda: listening(port), what="storescp +tls to listen")
        summary = run_due(engine, settings)
        assert (summary.sent, summary.failed) == (2, 0), rows(engine)
        assert sop_uids(list(received.iterdir())) == set(uids.values())
    finally:
        engine.dispose()
        peer.terminate()
        peer.wait(timeout=10)


def test_missing_or_bad_certificate_is_a_config_error_naming_the_key(
    certs: Certificates, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=r"tls\.cert_file: .*nope\.pem does not exist"):
        load_settings(tls={"cert_file": missing, "key_file": certs.server.key})
    with pytest.raises(ConfigError, match=r"tls: .*cert_file .* key_file .* not a PEM"):
        load_settings(tls={"cert_file": certs.server.cert, "key_file": certs.client.key})
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"destinations\.0\.tls: .*ca_file .*garbage\.pem"):
        load_settings(
            destinations=[
                {"name": "p", "ae_title": "P", "host": "127.0.0.1", "port": 104,
                 "tls": {"ca_file": garbage}},
            ]
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"require_client_cert needs ca_file"):
        load_settings(
            tls={
                "cert_file": certs.server.cert,
                "key_file": certs.server.key,
                "require_client_cert": True,
            }
        )


@SQLITE_ONLY
def test_serve_refuses_to_start_with_a_missing_key(make_node: Any, tmp_path: Path) -> None:
    node: Node = make_node(
        config=node_config(tls={"cert_file": str(tmp_path / "x.pem"), "key_file": "/nonexistent"})
    )
    result = subprocess.run(
        [sys.executable, "-m", "pacsnode", "serve"],
        env=node.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "tls.cert_file" in result.stderr and "tls.key_file" in result.stderr
