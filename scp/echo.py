"""C-ECHO SCU: verify that a peer is reachable and accepts pacsnode."""

from __future__ import annotations

import re
import time
from typing import cast

from pynetdicom import AE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsnode.core.errors import PacsnodeError
from pacsnode.scp.status import explain_reject

_TARGET = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d{1,5})$")


class EchoError(PacsnodeError):
    """The peer did not answer the verification with Success."""


def parse_target(target: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` → (AE title, host, port)."""
    match = _TARGET.match(target)
    if not match or not 0 < int(match["port"]) < 65536:
        raise ValueError("expected AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
    return match["ae"], match["host"].strip("[]"), int(match["port"])


def echo(calling_ae: str, called_ae: str, host: str, port: int, timeout: float = 10.0) -> float:
    """Send one C-ECHO; return the round-trip time in seconds."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    start = time.perf_counter()
    assoc = ae.associate(host, port, ae_title=called_ae)
    if assoc.is_rejected:
        rj = cast(A_ASSOCIATE, assoc.acceptor.primitive)
        raise EchoError(
            explain_reject(rj.result, rj.result_source, rj.diagnostic, calling_ae, called_ae)
        )
    if not assoc.is_established:
        raise EchoError(
            f"no association with {called_ae}@{host}:{port} "
            "(nothing listens there, or the peer aborted or timed out)"
        )
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or status.Status != 0x0000:
        code = f"0x{status.Status:04X}" if status else "no response"
        raise EchoError(f"C-ECHO failed: {code}")
    return time.perf_counter() - start
