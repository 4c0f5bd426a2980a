"""Test certificates made at test time with the ``openssl`` command line: a CA,
a server certificate for 127.0.0.1/localhost and client certificates."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support import require_binary


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def _run(*args: str) -> None:
    result = subprocess.run(
        [require_binary("openssl"), *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def make_ca(folder: Path, name: str) -> KeyPair:
    folder.mkdir(parents=True, exist_ok=True)
    pair = KeyPair(folder / f"{name}.pem", folder / f"{name}.key")
    _run(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(pair.key), "-out", str(pair.cert), "-days", "2",
        "-subj", f"/CN=pacsnode test CA {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return pair


def issue(ca: KeyPair, folder: Path, name: str, *, server: bool) -> KeyPair:
    """A leaf certificate signed by ``ca``; a server one names 127.0.0.1 and localhost."""
    pair = KeyPair(folder / f"{name}.pem", folder / f"{name}.key")
    csr = folder / f"{name}.csr"
    _run(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={name}",
    )  # fmt: skip
    ext = folder / f"{name}.ext"
    usage = "serverAuth" if server else "clientAuth"
    lines = [f"extendedKeyUsage={usage}", "basicConstraints=CA:FALSE"]
    if server:
        lines.append("subjectAltName=IP:127.0.0.1,DNS:localhost")
    ext.write_text("\n".join(lines) + "\n")
    _run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-out", str(pair.cert), "-days", "2", "-extfile", str(ext),
    )  # fmt: skip
    return pair


@dataclass(frozen=True)
class Certificates:
    ca: KeyPair
    server: KeyPair
    client: KeyPair
    rogue_ca: KeyPair
    rogue_client: KeyPair  # signed by a CA nobody trusts


def make_certificates(folder: Path) -> Certificates:
    ca = make_ca(folder, "ca")
    rogue_ca = make_ca(folder, "rogue-ca")
    return Certificates(
        ca=ca,
        server=issue(ca, folder, "server", server=True),
        client=issue(ca, folder, "client", server=False),
        rogue_ca=rogue_ca,
        rogue_client=issue(rogue_ca, folder, "rogue-client", server=False),
    )
