"""Who may associate: default-deny peers and the node-wide association limit.

Checked when the A-ASSOCIATE-RQ arrives (pynetdicom's EVT_REQUESTED), before
any presentation context is negotiated. A refusal is an A-ASSOCIATE-RJ with
the reason PS3.8 §9.3.4 defines, so the peer's log says why.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import MutableSequence
from typing import cast

from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE

from pacsnode.core.settings import Settings
from pacsnode.scp.status import (
    CALLED_AE_NOT_RECOGNIZED,
    CALLING_AE_NOT_RECOGNIZED,
    LOCAL_LIMIT_EXCEEDED,
    RejectReason,
)

log = logging.getLogger(__name__)


class AssociationGate:
    """Accepts or rejects association requests.

    ``live_counts`` holds one slot per SCP process (shared memory); this
    process writes its number of live associations into ``slot`` so the
    limit applies to the whole node, not to each process.
    """

    def __init__(
        self, settings: Settings, live_counts: MutableSequence[int] | None = None, slot: int = 0
    ) -> None:
        self.settings = settings
        self._counts: MutableSequence[int] = live_counts if live_counts is not None else [0]
        self._slot = slot
        self._live: weakref.WeakSet[Association] = weakref.WeakSet()

    def reason_to_reject(self, calling_ae: str, called_ae: str, host: str) -> RejectReason | None:
        refused = self.refusal(calling_ae, called_ae, host)
        return None if refused is None else refused[0]

    def refusal(
        self, calling_ae: str, called_ae: str, host: str
    ) -> tuple[RejectReason, str] | None:
        """None to accept, else the A-ASSOCIATE-RJ reason and, for the log,
        which rule refused and how to change it (AE titles and host only:
        an association request carries no patient data)."""
        called = called_ae.strip()
        if called != self.settings.ae_title:
            return CALLED_AE_NOT_RECOGNIZED, (
                f"called AE {called!r} is not this node's ae_title {self.settings.ae_title!r}: "
                f"the sender must call {self.settings.ae_title!r}"
            )
        peer = self.settings.peer(calling_ae)
        if peer is None:
            return CALLING_AE_NOT_RECOGNIZED, (
                f"calling AE {calling_ae!r} from {host} is not in peers: add it under `peers` "
                f"(ae_title: {calling_ae}, hosts: [{host}])"
            )
        if not peer.allows(host):
            return CALLING_AE_NOT_RECOGNIZED, (
                f"calling AE {calling_ae!r} is in peers but not allowed from {host}: "
                f"add {host} to its `hosts`"
            )
        if sum(self._counts) > self.settings.max_associations:
            return LOCAL_LIMIT_EXCEEDED, (
                f"{sum(self._counts) - 1} associations are open, max_associations is "
                f"{self.settings.max_associations}: the sender may retry later, or raise "
                "`max_associations`"
            )
        return None

    def check(self, assoc: Association) -> None:
        request = cast(A_ASSOCIATE, assoc.requestor.primitive)
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        host = assoc.requestor.address
        self._live.add(assoc)
        self._publish()
        refused = self.refusal(calling, called, host)
        if refused is None:
            log.info("association accepted: %s@%s -> %s", calling, host, called)
            return
        reason, why = refused
        # `pacsnode healthcheck` calls from the node's own AE title on
        # loopback (every 30 s in containers); its rejection is expected, not news.
        local_check = calling == self.settings.ae_title and host in ("127.0.0.1", "::1")
        log.log(
            logging.DEBUG if local_check else logging.WARNING,
            "association rejected: %s@%s -> %s (result %d, source %d, reason %d): %s",
            calling,
            host,
            called,
            *reason,
            why,
        )
        # As pynetdicom's own ACSE does when it rejects: send A-ASSOCIATE-RJ,
        # then stop the association.
        assoc.acse.send_reject(*reason)
        assoc.kill()

    def closed(self, assoc: Association) -> None:
        self._live.discard(assoc)
        self._publish()

    def _publish(self) -> None:
        self._counts[self._slot] = len(self._live)
