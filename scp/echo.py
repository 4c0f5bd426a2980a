"""C-ECHO SCU: verify that a peer is reachable and accepts pacsnode."""

from __future__ import annotations

import re
import time

from pynetdicom import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsnode.scp import scu

_TARGET = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d{1,5})$")

#: No association (:class:`scu.AssociationRejected`, :class:`scu.NoAssociation`)
#: or no Success for the C-ECHO: the SCU helper's error class.
EchoError = scu.ScuError


def parse_target(target: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` → (AE title, host, port)."""
    match = _TARGET.match(target)
    if not match or not 0 < int(match["port"]) < 65536:
        raise ValueError("expected AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
    return match["ae"], match["host"].strip("[]"), int(match["port"])


def echo(calling_ae: str, called_ae: str, host: str, port: int, timeout: float = 10.0) -> float:
    """Send one C-ECHO (PS3.7 9.1.5); return the round-trip time in seconds.

    Raises :class:`EchoError`: :class:`scu.AssociationRejected` (with the
    A-ASSOCIATE-RJ result, source and reason), :class:`scu.NoAssociation`,
    or the base class for a C-ECHO without Success."""
    peer = scu.Peer(called_ae, host, port)
    start = time.perf_counter()
    contexts = [(Verification, DEFAULT_TRANSFER_SYNTAXES)]
    with scu.associate(calling_ae, peer, contexts, timeout=timeout) as assoc:
        status = assoc.send_c_echo()
    if not status or status.Status != 0x0000:
        code = f"0x{status.Status:04X}" if status else "no response"
        raise EchoError(f"C-ECHO {peer} failed: {code}")
    return time.perf_counter() - start
