"""Every change pacsnode makes to pynetdicom's private behaviour, in one place.

pynetdicom 3.0 serves the node well but has a few behaviours that cost
correctness (one) or throughput and robustness (the rest) at the node's
load. Each is worked around here, next to the upstream behaviour it
concerns; nothing else in pacsnode touches pynetdicom's private attributes.
They depend on pynetdicom's internals, so they are tested against one
release line: :data:`TESTED` (the range pinned in ``pyproject.toml``).

1. :class:`Checkpoint` (global, installed by :func:`install`): the race
   between an association's reactor and a ``send_c_*`` call (pynetdicom issue
   875; the checkpoint itself came with PR 351 and still leaves a window).
2. :class:`WaitingDIMSE`: the acceptor's reactor polls for DIMSE messages
   with a 1 ms sleep.
3. :class:`BulkRecvSocket`: PDUs are read 4 KiB per ``recv()``; and a PDU's
   length field is trusted up to 4 GiB.
4. :class:`RequestHandler`: the TLS handshake runs in the server's accepting
   thread; plus items 3 and 6 are attached to each accepted association.
5. :class:`Contexts`: the server's supported contexts are deep-copied for
   every association.
6. ``DUL._run_loop_delay`` (set in :class:`RequestHandler`): the DUL thread
   sleeps 1 ms between looks at the socket.

Besides these, :class:`PreboundServer` lets several processes accept on one
listening socket (socketserver's own hooks plus ``AE._servers``).

Installation is explicit: :func:`install` is called by ``pacsnode serve``,
by Celery worker start-up (``workers.celery_app``), by the SCU helper
(:mod:`scp.scu`), the load generator and the tests. Importing :mod:`scp`
patches nothing. See docs/architecture.md (DICOM networking).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import socket
import ssl
import threading
from importlib.metadata import version as installed_version
from typing import Any, cast

from packaging.specifiers import SpecifierSet
from packaging.version import Version
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider, _QueueItem
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer
from pynetdicom.transport import RequestHandler as _PynetdicomHandler

from pacsnode.core.errors import ConfigError

log = logging.getLogger(__name__)

#: The pynetdicom releases these patches were written and tested against.
TESTED = SpecifierSet(">=3.0.4,<3.1")

_REACTOR_WAIT_S = 0.02
_DUL_IDLE_SLEEP_S = 0.0002
_MIN_PDU_LIMIT = 1 << 20
_lock = threading.Lock()
_installed = False


def check_version(found: str | None = None) -> str:
    """The installed pynetdicom version; :class:`ConfigError` when it lies
    outside :data:`TESTED` (the patches rely on its internals)."""
    found = found or installed_version("pynetdicom")
    if Version(found) not in TESTED:
        raise ConfigError(
            f"pynetdicom {found} is installed, but pacsnode's networking patches are "
            f"tested with pynetdicom {TESTED} only (scp/patches.py); install a "
            f"pynetdicom {TESTED}"
        )
    return found


def install() -> None:
    """Check the pynetdicom version, then give every association created
    from now on a :class:`Checkpoint`. Idempotent and thread-safe; raises
    :class:`ConfigError` for a pynetdicom outside :data:`TESTED`."""
    global _installed
    with _lock:
        if _installed:
            return
        check_version()
        _install_checkpoint()
        _installed = True


def installed() -> bool:
    """Whether :func:`install` has run in this process."""
    return _installed


# -- 1. the reactor checkpoint (global) ----------------------------------------
#
# Upstream: pynetdicom issue 875 ("Received unexpected C-FIND service
# message"), after PR 351 added the checkpoint; issue 435 reports the same
# race. Each Association runs a reactor thread that takes incoming DIMSE
# messages off the queue and serves them as requests. Before a send_c_*()
# call sends a request, it pauses the reactor so the response reaches the
# caller, not the reactor:
#
#     sender                               reactor loop
#     checkpoint.clear()                   _is_paused = True
#     while not _is_paused: sleep          checkpoint.wait()
#     send request; wait for response      _is_paused = False
#                                          take a message off the queue
#
# When the sender clears the checkpoint just after the reactor's wait() has
# returned but before _is_paused = False, the sender sees "paused" and
# sends, and the reactor may take the C-STORE response for itself; the
# sender waits for the DIMSE timeout and the sub-operation or export fails.
# Measured here: one C-STORE in about 2,800 to a local storescp over one
# association (pynetdicom 3.0.4).


class Checkpoint:
    """The subset of :class:`threading.Event` the reactor uses, with the
    reactor's ``_is_paused`` flag cleared under the event's own lock.

    ``wait()`` marks the reactor as running while it still holds the lock
    that ``clear()`` takes, so once ``clear()`` has returned, ``_is_paused``
    is true only for a reactor that is stopped at (or about to enter) the
    checkpoint. The reactor itself may clear the checkpoint too (it releases
    the association on a network timeout when ``network_timeout_response``
    is "A-RELEASE"): it is not taking messages then, so that ``clear()``
    marks it paused."""

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


def _install_checkpoint() -> None:
    original = Association.__init__

    def __init__(self: Association, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._reactor_checkpoint = Checkpoint(self)  # type: ignore[assignment]

    Association.__init__ = __init__  # type: ignore[method-assign]


# -- 2. the acceptor's reactor waits instead of polling --------------------------
#
# Upstream: the reactor calls DIMSEServiceProvider.get_msg() without blocking
# and sleeps 1 ms between polls (issue 650 measured most of a transfer's time
# there). No upstream fix for the acceptor's loop was found.


class WaitingDIMSE(DIMSEServiceProvider):
    """Waits on the message queue instead: the reactor wakes the moment a
    C-STORE has arrived; the wait is short so A-RELEASE and A-ABORT, which
    the reactor checks between polls, are still seen promptly."""

    def get_msg(self, block: bool = False) -> _QueueItem:
        if block:
            return super().get_msg(block=True)
        try:
            return self.msg_queue.get(timeout=_REACTOR_WAIT_S)
        except queue.Empty:
            return None, None


# -- 3. whole-PDU reads, with a limit ------------------------------------------
#
# Upstream: AssociationSocket.recv() is called for at most 4 KiB at a time by
# the DUL (about 130 calls and buffer extensions per 512x512 CT image; related
# report: issue 684), and the DUL allocates whatever a PDU's length field
# claims. No upstream issue about either was found.


class BulkRecvSocket(AssociationSocket):
    """Reads straight into one buffer of the requested size."""

    # The largest PDU accepted, 0: any. A PDU's length field is read before
    # its body, and this class allocates the body's buffer at once: a hostile
    # length (up to 4 GiB) must be refused before that, not allocated.
    pdu_limit = 0

    def recv(self, nr_bytes: int) -> bytearray:
        if self.pdu_limit and nr_bytes > self.pdu_limit:
            # pynetdicom treats this as the transport closing (Evt17): the
            # association ends without reading the body.
            raise ConnectionAbortedError(
                f"PDU of {nr_bytes} bytes is over the limit of {self.pdu_limit}"
            )
        sock = cast(socket.socket, self.socket)
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        while received < nr_bytes:
            n = sock.recv_into(view[received:], nr_bytes - received)
            if n == 0:  # connection closed: return what arrived, as pynetdicom does
                del view
                return buffer[:received]
            received += n
        return buffer


# -- 4. the TLS handshake in the connection's thread (and 3, 6 attached) -------
#
# Upstream: ThreadedAssociationServer.get_request() wraps the accepted socket
# with the handshake on connect, in the one accepting thread, so a silent or
# plain-TCP client stalls every other connection. No pynetdicom issue was
# found (fo-dicom issue 1766 reports the same behaviour in that toolkit).
#
# 6. Upstream: the DUL thread sleeps _run_loop_delay (1 ms) whenever it found
# nothing to do; it is the delay before a C-STORE response leaves (PR 139
# proposed a shorter sleep, issue 650 / PR 651 sleeping only when idle).


class RequestHandler(_PynetdicomHandler):
    def handle(self) -> None:
        if isinstance(self.request, ssl.SSLSocket) and not self._handshake(self.request):
            return
        super().handle()

    def _handshake(self, sock: ssl.SSLSocket) -> bool:
        """The TLS handshake, in this connection's own thread: a peer that
        speaks plain DICOM, a bad certificate or a silent client costs this
        thread at most the ACSE timeout, never the accepting loop."""
        sock.settimeout(self.server.ae.acse_timeout)
        try:
            sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, ssl.SSLError) else None
            log.warning(
                "TLS handshake with %s:%d failed: %s",
                *self.client_address[:2],
                reason or type(exc).__name__,
            )
            with contextlib.suppress(OSError):
                sock.close()
            return False
        sock.settimeout(None)
        return True

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # Same object, with the faster recv() (pynetdicom creates the socket
        # inside this method and offers no hook for its class).
        assoc.dul.socket.__class__ = BulkRecvSocket
        # PS3.8 9.3.1: P-DATA-TF PDUs stay within the Maximum Length the node
        # announces; other PDUs are small (an A-ASSOCIATE-RQ with 128
        # contexts is tens of kilobytes).
        if self.server.ae.maximum_pdu_size:
            limit = max(self.server.ae.maximum_pdu_size, _MIN_PDU_LIMIT)
            cast(BulkRecvSocket, assoc.dul.socket).pdu_limit = limit
        assoc.dimse = WaitingDIMSE(assoc)
        # A lone association gets a short sleep (latency bound); beside others
        # the default, as then the process is CPU bound and spinning costs.
        if not self.server.active_associations:
            assoc.dul._run_loop_delay = _DUL_IDLE_SLEEP_S
        return assoc


# -- 5. a cheaper copy of the supported contexts -----------------------------------
#
# Upstream: the server deep-copies its supported contexts for every
# association: 36 ms for 121 storage classes x 45 transfer syntaxes. No
# upstream issue was found (issue 16 is about context negotiation's speed
# in general).


class Contexts(list[PresentationContext]):
    """A context holds immutable UIDs besides its list of transfer syntaxes,
    so copying each context and that list is an equally independent copy."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            duplicate._transfer_syntax = list(context._transfer_syntax)
            copies.append(duplicate)
        return copies


# -- one listening socket, several processes -------------------------------------


class PreboundServer(ThreadedAssociationServer):
    """A pynetdicom server that accepts on a socket bound by the parent.

    pynetdicom binds its own socket in ``server_bind``; the node binds once,
    in the supervisor, so pre-forked processes share it."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, listener: socket.socket, *args: Any, **kwargs: Any) -> None:
        self._listener = listener
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.socket = self._listener
        self.server_address = self._listener.getsockname()

    def server_activate(self) -> None:
        """Already listening (the parent called listen())."""

    def server_close(self) -> None:
        # Close this process's descriptor only: shutdown() would stop the
        # socket the sibling workers are still accepting on.
        self._listener.close()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # All workers wait on the same socket; the ones that lose the race for
        # a connection get BlockingIOError, which socketserver ignores.
        client, address = self._listener.accept()
        client.setblocking(True)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            # The handshake happens in the connection's thread (RequestHandler).
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def register(self) -> None:
        """Make the AE know this server, as ``AE.start_server`` does (its
        shutdown and active-association bookkeeping read ``AE._servers``)."""
        self.ae._servers.append(self)
