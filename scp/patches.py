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
6. :class:`WakingDUL` (set in :class:`RequestHandler`): the DUL thread
   sleeps 1 ms between looks at the socket and the outgoing queue; it now
   waits on both at once. :class:`QuickReactor`: the acceptor's reactor
   sleeps 1 ms before every look for a DIMSE message.

7. ``PreboundServer.service_actions``: the server runs a full garbage
   collection every 60 loops; :func:`freeze_heap` takes the start-up heap out
   of the collector instead.

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
import gc
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
from importlib.metadata import version as installed_version
from typing import Any, cast

from packaging.specifiers import SpecifierSet
from packaging.version import Version
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider, _QueueItem
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer
from pynetdicom.transport import RequestHandler as _PynetdicomHandler
from pynetdicom.utils import make_target

from pacsnode.core.errors import ConfigError

log = logging.getLogger(__name__)

#: The pynetdicom releases these patches were written and tested against.
TESTED = SpecifierSet(">=3.0.4,<3.1")

_REACTOR_WAIT_S = 0.02
_DUL_WAIT_S = 0.05
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
# 6. (below RequestHandler) the DUL's and the reactor's polling sleeps.


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
        # Same objects, with the waiting loops (6); neither thread runs yet.
        assoc.__class__ = QuickReactor
        assoc.dul.__class__ = WakingDUL
        cast(WakingDUL, assoc.dul).arm()
        return assoc


# -- 6. the DUL and the reactor wait instead of polling ---------------------------
#
# Upstream: the DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever a loop
# found nothing to do, then looks at its outgoing queue and polls the socket
# with a zero select(); the acceptor's reactor sleeps 1 ms before each look
# for a DIMSE message. So a C-STORE response waits up to 1 ms before it
# leaves, and a shorter sleep (0.2 ms, what the node used before) costs a
# core's worth of wake-ups and GIL hand-offs per association: a third of the
# SCP process's samples while receiving 2,000 small images (py-spy). PR 139
# proposed a shorter sleep; issue 650 / PR 651 sleeping only when idle. The
# form here could go upstream as is: one wake-up pipe per association,
# written by ``send_pdu`` / ``kill_dul``, selected together with the socket.


class WakingDUL(DULServiceProvider):
    """The DUL reactor blocks in select() on the peer's socket and a wake-up
    pipe that every primitive queued for sending writes to."""

    _wake_r: int | None
    _wake_w: int | None
    _wake_lock: threading.Lock

    def arm(self) -> None:
        """Create the wake-up pipe and retarget the thread (before it starts:
        pynetdicom binds the thread's target when it creates the DUL)."""
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._target = make_target(self.run_reactor)

    def _wake(self) -> None:
        # Under the lock: a descriptor closed by the reactor may already be
        # reused by a file, which must never receive this byte.
        with self._wake_lock:
            if self._wake_w is not None:
                with contextlib.suppress(BlockingIOError):  # a wake-up is pending
                    os.write(self._wake_w, b"\0")

    def _disarm(self) -> None:
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                if fd is not None:
                    os.close(fd)
            self._wake_r = self._wake_w = None

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._wake()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        return True

    def _wait(self) -> None:
        """Until the socket is readable, a primitive is queued or 50 ms
        (the ARTIM timer and the kill flag are checked between waits)."""
        raw = self.socket.socket if self.socket is not None else None
        if raw is None or self._wake_r is None:
            time.sleep(self._run_loop_delay)
            return
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return  # decrypted bytes select() cannot see (pynetdicom issue 528)
        try:
            select.select([raw.fileno(), self._wake_r], [], [], _DUL_WAIT_S)
        except (OSError, ValueError):
            return  # a closed socket: the loop's own check reports it (Evt17)
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's loop, with :meth:`_wait` for its sleep."""
        self._idle_timer.start()
        sleep = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    sleep = True
                if sleep:
                    self._wait()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception:
                    log.error("DICOM upper layer failed; aborting the association")
                    log.debug("DUL failure", exc_info=True)
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    if self.socket is not None:
                        self.socket.send(abort_pdu.encode())
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    sleep = True
                    continue
                self.state_machine.do_action(event)
                sleep = False
        finally:
            self._disarm()


class QuickReactor(Association):
    """The acceptor's reactor without its 1 ms sleep per loop: it waits in
    :meth:`WaitingDIMSE.get_msg` instead (pynetdicom 3.0.4's loop otherwise)."""

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                log.warning("DICOM network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


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

    def service_actions(self) -> None:
        """Upstream runs a full ``gc.collect()`` every 60 loops of
        ``serve_forever`` (0.1 s with a large heap: 7 % of an SCP process's
        time while receiving small images, py-spy). The collector's own
        generations suffice; the start-up heap is frozen (:func:`freeze_heap`)."""

    def register(self) -> None:
        """Make the AE know this server, as ``AE.start_server`` does (its
        shutdown and active-association bookkeeping read ``AE._servers``)."""
        self.ae._servers.append(self)


def freeze_heap() -> None:
    """Move everything allocated at start-up (modules, tables, settings) out
    of the collector's generations: each collection then walks only what was
    allocated since (``gc.freeze``, Python 3.7+)."""
    gc.collect()
    gc.freeze()
