"""Outgoing associations: the one place pacsnode acts as a requestor (SCU).

:func:`associate` builds the Application Entity (the requested presentation
contexts, TLS from the destination's settings, timeouts), installs the
networking patches (:mod:`scp.patches`), requests the association and always
releases it. When there is no association it raises, in words an operator
can act on:

- :class:`AssociationRejected` for an A-ASSOCIATE-RJ (PS3.8 §7.1.1.9 and
  Table 9-21): ``result``, ``source`` and ``reason`` as the PDU carries them,
  and in words (``result_text``, ``source_text``, ``reason_text``);
- :class:`NoAssociation` when the peer cannot be reached, aborted during
  negotiation or did not answer in time.

Used by the export SCU (:mod:`scp.export`), ``pacsnode echo``
(:mod:`scp.echo`) and ``pacsnode demo send`` (``lab.phantom.send``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import build_context

from pacsnode.core.errors import AssociationRejected, ConfigError, NoAssociation, ScuError
from pacsnode.core.settings import Destination
from pacsnode.core.tls import ClientTLS, client_context
from pacsnode.scp import patches

# PS3.8 §9.3.2.2: at most 128 presentation contexts (odd ids 1-255) per association.
MAX_CONTEXTS = 128
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

#: A requested presentation context: (abstract syntax, transfer syntaxes).
Context = tuple[UID, tuple[UID, ...]]


@dataclass(frozen=True, slots=True)
class Peer:
    """The AE to associate with; ``tls``: TLS with these client settings."""

    ae_title: str
    host: str
    port: int
    tls: ClientTLS | None = None

    @classmethod
    def of(cls, destination: Destination) -> Peer:
        """The AE of a DICOM destination (a ``url`` destination has none)."""
        ae_title, host, port = destination.ae_title, destination.host, destination.port
        if ae_title is None or host is None or port is None:
            raise ConfigError(f"destination {destination.name} is a DICOMweb url, not a DICOM AE")
        return cls(ae_title, host, port, destination.tls)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def contexts_for(sent: Iterable[tuple[str, str]]) -> list[Context]:
    """The contexts that carry objects of these (SOP Class UID, Transfer
    Syntax UID) pairs, in first-seen order: each object's own syntax, plus
    Explicit and Implicit VR Little Endian for an uncompressed one (PS3.5
    §10.1: every SCP takes Implicit VR Little Endian), so it may be
    re-encoded when its own syntax is refused."""
    contexts: dict[Context, None] = {}
    for sop_class, syntax in sent:
        sop, ts = UID(sop_class), UID(syntax)
        contexts[(sop, (ts,))] = None
        if not ts.is_compressed and not ts.is_deflated:
            contexts[(sop, UNCOMPRESSED)] = None
    return list(contexts)


def _refusal(assoc: Association, peer: Peer, connected: bool, timeout: float) -> ScuError:
    if assoc.is_rejected:
        rj = cast(A_ASSOCIATE, assoc.acceptor.primitive)
        return AssociationRejected(
            peer, int(rj.result or 0), int(rj.result_source or 0), int(rj.diagnostic or 0),
            rj.reason_str,
        )  # fmt: skip
    tls = peer.tls is not None
    if not connected:
        message = (
            f"cannot connect to {peer} (connection refused, host unreachable, "
            f"no answer within {timeout:g} s{', or TLS handshake failed' if tls else ''})"
        )
    elif assoc.is_aborted:
        message = f"association aborted by {peer} during negotiation"
        if tls:  # TLS 1.3 reports a refused client certificate only after the handshake
            message += " (TLS: is our client certificate accepted there?)"
    else:
        message = f"no association with {peer} (no answer within {timeout:g} s)"
    return NoAssociation(message, peer=peer, connected=connected)


@contextmanager
def associate(
    calling_ae: str,
    peer: Peer,
    contexts: Sequence[tuple[str, Sequence[str]]],
    *,
    timeout: float,
    max_pdu: int | None = None,
) -> Iterator[Association]:
    """An established association from ``calling_ae`` to ``peer`` proposing
    ``contexts`` (at most :data:`MAX_CONTEXTS`); released when the block ends,
    however it ends (an association the peer aborted needs no release).

    ``timeout`` bounds the TCP connect, the ACSE negotiation, each DIMSE
    response and network silence. ``max_pdu``: the Maximum Length announced
    (PS3.8 D.1; pynetdicom's default when None).

    Raises :class:`AssociationRejected` or :class:`NoAssociation` when no
    association is made, :class:`~pacsnode.core.errors.ConfigError` for an
    untested pynetdicom (:func:`scp.patches.install`), ``ValueError`` for
    more than :data:`MAX_CONTEXTS` contexts or TLS files that cannot be
    loaded (:func:`pacsnode.core.tls.client_context`).
    """
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts; at most {MAX_CONTEXTS}")
    patches.install()
    ae = AE(ae_title=calling_ae)
    if max_pdu is not None:
        ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.requested_contexts = [build_context(sop, list(ts)) for sop, ts in contexts]
    connected: list[bool] = []
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: connected.append(True))],
        tls_args=(client_context(peer.tls), peer.host) if peer.tls else None,
    )
    if not assoc.is_established:
        raise _refusal(assoc, peer, bool(connected), timeout)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
