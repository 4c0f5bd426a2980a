"""Send data sets to a peer in one association (C-STORE SCU, PS3.4 Annex B).

Used by ``pacsnode demo send``. A Success or Warning status counts as stored
(PS3.4 B.2.3: a Warning means the peer stored the instance); anything else,
or no answer at all, counts as failed and is reported by SOP Instance UID.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom.status import code_to_category

from pacsnode.scp import scu

#: No association: :class:`scu.AssociationRejected` (with the A-ASSOCIATE-RJ
#: result, source and reason) or :class:`scu.NoAssociation`.
SendError = scu.ScuError


@dataclass
class SendResult:
    stored: int = 0
    warnings: int = 0  # stored with a Warning status (included in ``stored``)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (SOP Instance UID, status)

    @property
    def ok(self) -> bool:
        return not self.failed


def send_datasets(
    datasets: Iterable[Dataset],
    sop_classes: Sequence[str],
    called_ae: str,
    host: str,
    port: int,
    calling_ae: str,
    progress: Callable[[int], None] | None = None,
    timeout: float = 30.0,
) -> SendResult:
    """C-STORE every data set over one association; ``progress(1)`` after each.

    ``sop_classes`` are proposed up front (one presentation context each);
    ``datasets`` may be a generator, so a large study need not be in memory at once.
    Raises :class:`SendError` when there is no association.
    """
    peer = scu.Peer(called_ae, host, port)
    contexts = [(sop_class, scu.UNCOMPRESSED) for sop_class in sop_classes]
    result = SendResult()
    with scu.associate(calling_ae, peer, contexts, timeout=timeout) as assoc:
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if not assoc.is_established:
                result.failed.append((uid, "association lost"))
            else:
                status = assoc.send_c_store(ds)
                code = int(status.Status) if status and "Status" in status else None
                category = code_to_category(code) if code is not None else "no response"
                if category in ("Success", "Warning"):
                    result.stored += 1
                    result.warnings += category == "Warning"
                else:
                    shown = f"0x{code:04X} ({category})" if code is not None else category
                    result.failed.append((uid, shown))
            if progress is not None:
                progress(1)
    return result
