"""A race-free pause for pynetdicom's association reactor.

Each pynetdicom :class:`~pynetdicom.association.Association` runs a reactor
thread that takes incoming DIMSE messages off the queue and serves them as
requests. Before a ``send_c_*`` call sends a request, it pauses the reactor so
that the response reaches the caller, not the reactor::

    sender                               reactor loop
    checkpoint.clear()                   _is_paused = True
    while not _is_paused: sleep          checkpoint.wait()
    send request; wait for response      _is_paused = False
                                         take a message off the queue

When the sender clears the checkpoint just after the reactor's ``wait()`` has
returned but before ``_is_paused = False``, the sender sees "paused" and
sends, and the reactor may then take the C-STORE response for itself
("Received unexpected C-STORE service message"); the sender waits for the
DIMSE timeout and the sub-operation or export fails. Measured here: one
C-STORE in about 2,800 to a local storescp over one association (pynetdicom
3.0.4).

:class:`Checkpoint` closes that window: ``wait()`` marks the reactor as
running while it still holds the lock that ``clear()`` takes, so once
``clear()`` has returned, ``_is_paused`` is true only for a reactor that is
stopped at (or about to enter) the checkpoint. The reactor itself may clear
the checkpoint too (it releases the association on a network timeout when
``network_timeout_response`` is "A-RELEASE"): it is not taking messages
then, so that ``clear()`` marks it paused. :func:`install` gives every new
association one; importing :mod:`scp` calls it.
"""

from __future__ import annotations

import threading
from typing import Any

from pynetdicom.association import Association

_INSTALLED = False


class Checkpoint:
    """The subset of :class:`threading.Event` the reactor uses, with the
    reactor's ``_is_paused`` flag cleared under the event's own lock."""

    def __init__(self, assoc: Association) -> None:
        self._assoc = assoc
        self._cond = threading.Condition(threading.Lock())
        self._flag = True  # pynetdicom starts with the reactor running
        self._reactor: int | None = None  # the thread that waits here

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._flag = False
            if threading.get_ident() == self._reactor:
                self._assoc._is_paused = True

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            self._reactor = threading.get_ident()
            signalled = self._cond.wait_for(lambda: self._flag, timeout)
            if signalled:
                self._assoc._is_paused = False
            return signalled


def install() -> None:
    """Give every association created from now on a :class:`Checkpoint`."""
    global _INSTALLED
    if _INSTALLED:
        return
    original = Association.__init__

    def __init__(self: Association, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._reactor_checkpoint = Checkpoint(self)  # type: ignore[assignment]

    Association.__init__ = __init__  # type: ignore[method-assign]
    _INSTALLED = True
