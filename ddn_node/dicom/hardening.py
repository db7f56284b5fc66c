"""Where the node reaches into pynetdicom's internals, all in one module.

pynetdicom (pinned to :data:`PYNETDICOM_VERSION` in pyproject.toml) offers no public way to
do what a node facing hospital networks must: close connections from unknown addresses
before they take a thread or an association slot, limit connections per address, bound what
a peer may make it buffer (before the association and after: the negotiated maximum PDU
length), bound how long an association request may take to arrive, free an association slot
when a connection closes before its request, turn Nagle off, move the TLS handshake off the
accept loop, read the client certificate of an association, and stream datasets to and from
files. Each of those uses a private attribute
or class here; ``tests/ingest/test_hardening.py`` checks that every one still exists, so a
pynetdicom upgrade is checked in one place, and the rest of ``dicom/`` uses only
pynetdicom's public API plus the functions below.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import itertools
import logging
import os
import queue
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import structlog
from pydicom.uid import UID
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    dimse_messages,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = structlog.get_logger("ddn_node.scp")

# pynetdicom's own, before stream_received_datasets replaces them in its dimse_messages.
_original_create_file_meta = dimse_messages.create_file_meta
_original_write_file_meta_info = dimse_messages.write_file_meta_info

PYNETDICOM_VERSION = "3.0.4"

# The largest PDU accepted before an association is established. An A-ASSOCIATE-RQ with
# 128 presentation contexts of ten transfer syntaxes each is ~100 kB; user identity
# tokens add a few kB more.
MAX_REQUEST_PDU_BYTES = 1 << 20

P_DATA_TF = 0x04
# How much more of a PDU's declared length is allocated at a time as it arrives (the
# node's 128 KiB PDUs: at once).
_RECV_STEP = 1 << 20
# A-ABORT, source 2 (service provider), reason 6 (invalid PDU parameter value), PS3.8 9.3.8.
_ABORT_INVALID_PDU = struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x06)


class RequestGuard(AssociationSocket):
    """The DUL socket of an acceptor, stricter while the peer is still anonymous.

    pynetdicom reads a whole PDU into memory, whatever length its header declares, and
    only then decodes it; the allow-list is checked after that. Until the association is
    established this socket therefore refuses (i) a PDU declaring more than
    ``MAX_REQUEST_PDU_BYTES`` (an anonymous peer could otherwise make the node buffer up
    to 4 GiB), and (ii) taking longer than the first-PDU timeout (``first_pdu_timeout_s``,
    at most the ACSE timeout) in all to arrive (the ARTIM rule of PS3.8 9.1.2; the
    network timeout alone bounds each read, so a peer trickling one byte a second held a
    thread and an association slot indefinitely; the ACSE timeout alone let idle
    connections hold a slot for 30 s each). Either ends
    in an OSError, which pynetdicom treats as the connection closing.

    (iii) When the connection ends before an A-ASSOCIATE-RQ arrived (a port probe, a
    health check, junk), pynetdicom's association thread would go on waiting for the
    request until the ACSE timeout, holding one of ``max_associations`` slots all that
    time: a TCP health check every 2 s filled 16 slots with the default 30 s. The guard
    wakes it with the same "no request" it gets on a timeout.

    (iv) Once the association is established, pynetdicom still buffers whatever length a
    PDU declares (one 256 MiB P-DATA-TF raised the node's peak memory by ~740 MB although
    128 KiB was negotiated). A P-DATA-TF declaring more than the node's Maximum Length
    Received (PS3.8 D.1; plus the 6-byte header as slack), or another PDU declaring more
    than ``MAX_REQUEST_PDU_BYTES``, is answered with an A-ABORT as soon as its header
    arrives and the connection is closed; nothing of its body is read.
    """

    _deadline: float
    _limit_s: float
    _acse_timeout: float | None
    _host: str
    # pynetdicom reads every PDU as two recv() calls: the 6-byte header, then the length
    # it declares. Which of the two comes next, so that a header is recognised as one.
    _at_header: bool = True

    def guard(self, acse_timeout: float | None, host: str, first_pdu_timeout: float) -> None:
        self._limit_s = min(acse_timeout or 30.0, first_pdu_timeout)
        self._deadline = time.monotonic() + self._limit_s
        self._host = host
        # A connection that sends nothing never reaches recv(): the association thread
        # waits for its request for the association's ACSE timeout (and the DUL's ARTIM
        # timer, PS3.8 9.1.2, runs as long). Both get the first-PDU limit until the
        # request is in; then the configured ACSE timeout again.
        self._acse_timeout = acse_timeout
        self.assoc.acse_timeout = self._limit_s

    def recv(self, nr_bytes: int) -> bytearray:
        at_header, self._at_header = self._at_header, not self._at_header
        if self.socket is None:
            return super().recv(nr_bytes)
        if self.assoc.is_established:
            out = self._recv_established(nr_bytes)
            if at_header and nr_bytes == 6 and len(out) == 6 and self._oversized(out):
                return bytearray()  # as if closed: pynetdicom ends the association (Evt17)
            return out
        try:
            out = self._recv_before_association(nr_bytes)
        except OSError:  # TimeoutError included
            self._no_request()
            raise
        if len(out) < nr_bytes:  # closed by the peer
            self._no_request()
        elif not at_header and self.assoc.acse_timeout != self._acse_timeout:
            self.assoc.acse_timeout = self._acse_timeout  # the first PDU is in
        return out

    def _recv_established(self, nr_bytes: int) -> bytearray:
        """``nr_bytes`` from the socket, fewer only if the peer closes (as pynetdicom's
        recv). pynetdicom reads at most 4096 bytes per call: a 512x512 instance took ~140
        recv calls (each a poll and a recv, the socket having a timeout) and as many turns
        of a Python loop. Here each call takes whatever has arrived, into a buffer grown
        ``_RECV_STEP`` at a time (what a peer declares is only allocated as it arrives,
        also where no PDU limit was negotiated). Timeouts and errors propagate as from
        pynetdicom's."""
        assert self.socket is not None
        out = bytearray()
        got = 0
        while got < nr_bytes:
            if got == len(out):
                out.extend(bytes(min(nr_bytes - got, _RECV_STEP)))
            view = memoryview(out)
            try:
                count = self.socket.recv_into(view[got:])
            finally:
                view.release()
            if not count:  # closed by the peer: what there is, as pynetdicom does
                break
            got += count
        del out[got:]
        return out

    def _recv_before_association(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        if nr_bytes > MAX_REQUEST_PDU_BYTES:
            log.warning("scp.request_too_large", host=self._host, declared=nr_bytes)
            raise OSError(f"a PDU of {nr_bytes} bytes before association")
        out = bytearray()
        network_timeout = self.socket.gettimeout()
        try:
            while len(out) < nr_bytes:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    log.warning(
                        "scp.request_too_slow",
                        host=self._host,
                        received=len(out),
                        wanted=nr_bytes,
                        limit_s=self._limit_s,
                    )
                    raise TimeoutError(
                        "the association request did not arrive within the first-PDU timeout"
                    )
                self.socket.settimeout(min(left, network_timeout) if network_timeout else left)
                try:
                    chunk = self.socket.recv(min(4096, nr_bytes - len(out)))
                except TimeoutError:
                    if time.monotonic() >= self._deadline:
                        log.warning(
                            "scp.request_too_slow",
                            host=self._host,
                            received=len(out),
                            wanted=nr_bytes,
                            limit_s=self._limit_s,
                        )
                    raise
                if not chunk:  # closed by the peer: return what there is, as pynetdicom does
                    break
                out += chunk
        finally:
            if self.socket is not None:
                self.socket.settimeout(network_timeout)
        return out

    def _oversized(self, header: bytearray) -> bool:
        """Abort (and True) if the PDU this header starts declares more than allowed."""
        pdu_type, _, declared = struct.unpack(">BBL", header)
        negotiated = int(self.assoc.acceptor.maximum_length or 0)  # 0: no limit
        if pdu_type == P_DATA_TF:
            limit = negotiated + 6 if negotiated else None
        else:
            limit = MAX_REQUEST_PDU_BYTES
        if limit is None or declared <= limit:
            return False
        log.warning(
            "scp.pdu_too_large", host=self._host, pdu_type=pdu_type, declared=declared, limit=limit
        )
        assert self.socket is not None
        try:
            self.socket.sendall(_ABORT_INVALID_PDU)
            # Shut down, not closed: pynetdicom closes the socket itself when the
            # association ends, and reads only end-of-file from it until then.
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer is gone already: the association ends all the same
        return True

    def close(self) -> None:
        # The DUL closes the transport itself after aborting a bad first PDU (A-ABORT,
        # then close): no A-ASSOCIATE-RQ will come on this connection either.
        super().close()
        self._no_request()

    def _no_request(self) -> None:
        """Wake the association thread if it is still waiting for an A-ASSOCIATE-RQ that
        can no longer come. None is what its wait returns on the ACSE timeout; it then
        stops the DUL once that has seen the close (Sta1) and shuts the socket down."""
        if self.assoc.requestor.primitive is not None:
            return  # the request arrived: the association thread is past that wait
        queued = list(self.assoc.dul.to_user_queue.queue)
        if any(isinstance(p, A_ASSOCIATE) or p is None for p in queued):
            return  # a request, or the wake-up, is already on its way
        # None is what the wait gets on its timeout; the queue's annotation omits it (Any:
        # pynetdicom's annotations of it differ between releases).
        waiting: Any = self.assoc.dul.to_user_queue
        waiting.put(None)


# How long a reactor waits for a wake-up before it looks again regardless: what bounds how
# late it notices a timer (ARTIM, the network idle timeout) or a peer thread's death. Every
# event it must react to at once (a PDU arriving, a primitive to send, a decoded DIMSE
# message, a release or abort, a kill) wakes it immediately.
REACTOR_TICK_S = 0.05


class _Bell:
    """One wake-up per association for both of its reactor threads.

    pynetdicom's DUL thread polls its socket (``select`` with no timeout) and sleeps 1 ms
    between empty looks, and the association thread sleeps 1 ms before every look at its
    queues: two threads per association waking 1000 times a second each, each wake taking
    the GIL. With eight associations that was ~28% of the SCP's busy time, and it grew with
    every association (the GIL serialises them). Here each thread sleeps until there is
    something to do: the DUL thread in ``select`` on its socket and a pipe that the queues
    it serves write to, the association thread on an Event the same queues set.
    """

    def __init__(self) -> None:
        self.event = threading.Event()  # the association thread's
        # Socket objects, not bare pipe fds: once closed, a late ring() fails on the
        # object (fd -1) instead of writing into whatever file reused the number.
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)

    # Whether the DUL thread is (about to be) in select(): set before it last looks at its
    # queue, so a put after that look sees it and writes; one before is seen by the look.
    # Otherwise a put costs no system call.
    dul_waiting = False

    def ring(self) -> None:
        """Wake both threads (a kill, the end of the DUL)."""
        self.event.set()
        self._wake_dul()

    def ring_association(self) -> None:
        if not self.event.is_set():
            self.event.set()

    def ring_dul(self) -> None:
        if self.dul_waiting:
            self._wake_dul()

    def _wake_dul(self) -> None:
        # OSError: full (a wake-up is pending anyway) or closed (the DUL has ended).
        with contextlib.suppress(OSError):
            self._write.send(b"\0")

    def wait_dul(self, sock: socket.socket | None, timeout: float) -> None:
        """Until the socket is readable or the bell rings (or ``timeout``)."""
        watched: list[socket.socket] = [self._read]
        if sock is not None and sock.fileno() >= 0:
            watched.append(sock)
        try:
            readable, _, _ = select.select(watched, [], [], timeout)
        except (OSError, ValueError):
            time.sleep(0.001)  # a socket was closed meanwhile: pynetdicom's own pace
            return
        if self._read in readable:
            try:
                while self._read.recv(4096):
                    pass
            except OSError:
                pass  # drained (BlockingIOError) or closed

    def close(self) -> None:
        """By the DUL thread as it ends (it alone selects on the pair)."""
        self.event.set()
        self._read.close()
        self._write.close()


class _RingingQueue(queue.Queue[Any]):
    """A queue whose every put wakes the thread that takes from it."""

    wake: Callable[[], None]

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wake()


def _ringing(old: queue.Queue[Any], wake: Callable[[], None]) -> _RingingQueue:
    assert old.empty()  # swapped before the threads that fill it start
    new = _RingingQueue()
    new.wake = wake
    return new


class QuietDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, woken by events instead of polling every millisecond.

    The loop is pynetdicom 3.0.4's ``run_reactor`` with its ``time.sleep`` replaced by
    :meth:`_Bell.wait_dul`; ``tests/ingest/test_hardening.py`` checks that loop is unchanged.
    """

    bell: _Bell

    def kill_dul(self) -> None:
        super().kill_dul()
        self.bell.ring()

    def stop_dul(self) -> bool:
        # As pynetdicom's, but woken: its 1 ms poll would notice the flag at once, the
        # quiet reactor only at its next tick.
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self.bell.ring()
            while self.is_alive():
                time.sleep(0.001)
            return True
        return False

    def _wait_for_work(self) -> None:
        if self.state_machine.current_state == "Sta13":
            # Waiting for the connection to close (after a release or abort): pynetdicom
            # closes it itself as soon as no more data is pending, which nothing would
            # wake this loop for; at pynetdicom's own pace, so that the association ends
            # (and stops counting against its host) as soon as it did.
            time.sleep(self._run_loop_delay)
            return
        bell = self.bell
        bell.dul_waiting = True  # before the look at the queue (see _Bell.dul_waiting)
        try:
            if not self.to_provider_queue.empty():
                return  # a primitive to send is waiting already
            sock = self.socket.socket if self.socket is not None else None
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes buffered in the SSL object: select cannot see them
            bell.wait_dul(sock, REACTOR_TICK_S)
        finally:
            bell.dul_waiting = False

    def run_reactor(self) -> None:
        try:
            self._quiet_reactor()
        finally:
            # Wakes the association thread, which watches whether the DUL is alive.
            self.bell.close()

    def _quiet_reactor(self) -> None:
        self._idle_timer.start()
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                self._wait_for_work()
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
                log.exception("scp.dul_failed")
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


class QuietAssociation(Association):
    """pynetdicom's acceptor reactor, woken by its queues instead of every millisecond.

    The loop is pynetdicom 3.0.4's ``Association._run_reactor`` with its
    ``time.sleep(0.001)`` replaced by a wait on the association's bell.
    """

    bell: _Bell
    # Set once the association is over (released, aborted, killed), which is when its
    # connection stops counting against its host: the peer may connect again as soon as
    # it has the A-RELEASE-RP, not only once this thread has wound down (and logged and
    # audited the close) some milliseconds later.
    ended: threading.Event
    # Called once, in this thread, as the association ends, before the A-RELEASE-RP is
    # queued: whoever counts connections hears of it before the peer can connect again.
    on_over: Callable[[], None] | None = None

    def _over(self) -> None:
        if not self.ended.is_set():
            self.ended.set()
            if self.on_over is not None:
                self.on_over()

    def kill(self) -> None:
        # pynetdicom 3.0.4's kill(), but looking every 1 ms, not 10, whether the DUL has
        # stopped.
        self._over()
        self.bell.ring()
        self._reactor_checkpoint.set()
        self._kill = True
        self.is_established = False
        self._is_paused = True
        while self.dul.is_alive() and not self.dul.stop_dul():
            time.sleep(0.001)

    def _run_reactor(self) -> None:
        self._is_paused = False
        bell = self.bell.event
        while not self._kill:
            bell.wait(REACTOR_TICK_S)
            bell.clear()  # before looking: a put from now on rings again
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                bell.set()  # more may be queued: look again at once
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self._over()
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self._over()
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def quieten(assoc: Association) -> None:
    """Make a freshly built acceptor's two reactor threads sleep until woken (before they
    start)."""
    bell = _Bell()
    dul = assoc.dul
    # Filled by the association thread for the DUL, and by the DUL for the association.
    dul.to_provider_queue = _ringing(dul.to_provider_queue, bell.ring_dul)
    dul.to_user_queue = _ringing(dul.to_user_queue, bell.ring_association)
    assoc.dimse.msg_queue = _ringing(assoc.dimse.msg_queue, bell.ring_association)
    dul.__class__ = QuietDUL
    cast(QuietDUL, dul).bell = bell
    # Thread.__init__ bound the original run_reactor as the thread's target.
    dul._target = dul.run_reactor  # type: ignore[attr-defined]
    assoc.__class__ = QuietAssociation
    cast(QuietAssociation, assoc).bell = bell
    cast(QuietAssociation, assoc).ended = threading.Event()


def when_over(assoc: Association, callback: Callable[[], None]) -> bool:
    """Have ``callback`` called as the association ends (see QuietAssociation.on_over);
    False if it is not a quiet one (the caller waits for its thread instead)."""
    if not isinstance(assoc, QuietAssociation):
        return False
    assoc.on_over = callback
    return True


def association_over(assoc: Association) -> bool:
    """Whether an acceptor's association is over (its thread may still be winding down)."""
    ended = getattr(assoc, "ended", None)
    return not assoc.is_alive() or (ended is not None and ended.is_set())


def wait_association_over(assoc: Association) -> None:
    ended = getattr(assoc, "ended", None)
    if ended is None:
        assoc.join()
        return
    # A thread that died without kill() (a bug) never sets it: look at the thread too.
    while not ended.wait(1.0) and assoc.is_alive():
        pass


class SharedContexts(list[Any]):
    """A server's supported presentation contexts, shared by its associations.

    pynetdicom deep-copies them for every association (``deepcopy(self.server.contexts)``
    in ``RequestHandler._create_association``): with the ~130 storage SOP classes of ten
    transfer syntaxes each, ~100 ms of CPU per association, held under the GIL while other
    associations wait. Negotiation (``negotiate_as_acceptor``) only reads them, so every
    association may use the same objects; the copy is a new list of them.
    """

    def __deepcopy__(self, _memo: dict[int, Any]) -> list[Any]:
        return list(self)


def share_contexts(server: ThreadedAssociationServer) -> None:
    """Let a server's associations share its supported contexts (see SharedContexts)."""
    server.contexts = SharedContexts(server.contexts)


class GuardedRequestHandler(RequestHandler):
    def _create_association(self) -> Association:
        assoc = super()._create_association()
        quieten(assoc)
        sock = assoc.dul.socket
        # pynetdicom builds the AssociationSocket itself (and queues the transport event
        # in its constructor, so it cannot be built twice); give it the guard's recv.
        assert type(sock) is AssociationSocket
        sock.__class__ = RequestGuard
        server = self.server
        first_pdu = server.first_pdu_timeout_s if isinstance(server, HardenedServer) else 30.0
        cast(RequestGuard, sock).guard(self.ae.acse_timeout, str(self.client_address[0]), first_pdu)
        if isinstance(server, HardenedServer):
            server.associated(self.client_address, assoc)
        return assoc


@dataclass
class _Connection:
    host: str
    handling: bool = True  # accepted, its request thread not done (TLS handshake included)
    assoc: Association | None = None

    def open(self) -> bool:
        # Once the request thread is done, the connection lives as long as the
        # association it started (none: the handshake failed, it is closed).
        return self.handling or (self.assoc is not None and not association_over(self.assoc))


class ConnectionGate:
    """Who may open a connection to the DICOM ports, and how many at once, decided on
    accept: before a thread, an association slot or a byte of the peer's is spent.

    pynetdicom checks the calling AE title and address only once an A-ASSOCIATE-RQ has
    arrived, in a thread that holds one of ``max_associations`` slots: 16 idle connections
    from any address locked every peer out. Here an address that no ``[[peers]]`` entry
    lists is closed at once, and an allowed one may hold ``max_per_host`` connections
    (both ports together; one gate serves both servers). The A-ASSOCIATE-RQ check of AE
    title *and* address still follows, in the SCP. Refusals are logged at most once per
    ``log_every_s`` per address and reason, with how many went unlogged: a connection
    flood must not become a log flood.
    """

    def __init__(
        self,
        host_allowed: Callable[[str], bool],
        max_per_host: int,
        *,
        log_every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._host_allowed = host_allowed
        self._max_per_host = max_per_host
        self._log_every_s = log_every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[Any, _Connection] = {}  # by the peer's address (host, port, ...)
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}  # last logged, unlogged

    def admit(self, address: Any) -> bool:
        host = str(address[0])
        reason = None
        with self._lock:
            self._open = {a: c for a, c in self._open.items() if c.open()}
            if not self._host_allowed(host):
                reason = "host not on the allow-list"
            elif sum(1 for c in self._open.values() if c.host == host) >= self._max_per_host:
                reason = "too many connections from this host"
            else:
                self._open[address] = _Connection(host)
                return True
            self._log_refusal(host, reason)
        return False

    def associated(self, address: Any, assoc: Association) -> None:
        with self._lock:
            connection = self._open.get(address)
            if connection is not None:
                connection.assoc = assoc

    def handled(self, address: Any) -> None:
        with self._lock:
            connection = self._open.get(address)
            if connection is not None:
                connection.handling = False

    def open_from(self, host: str) -> int:
        with self._lock:
            return sum(1 for c in self._open.values() if c.host == host and c.open())

    def _log_refusal(self, host: str, reason: str) -> None:
        now = self._clock()
        last, unlogged = self._logged.get((host, reason), (None, 0))
        if last is not None and now - last < self._log_every_s:
            self._logged[(host, reason)] = (last, unlogged + 1)
            return
        if len(self._logged) >= 4096:  # many addresses: forget, rather than grow
            self._logged.clear()
        self._logged[(host, reason)] = (now, 0)
        log.warning("scp.connection_refused", host=host, reason=reason, unlogged=unlogged)


class HardenedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the connection gate on accept, Nagle off and the
    TLS handshake off the accept loop."""

    handshake_timeout_s: float = 30.0
    first_pdu_timeout_s: float = 30.0
    tls: ssl.SSLContext | None = None
    gate: ConnectionGate | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        # Small DIMSE responses must not wait ~40 ms for a delayed ACK (Nagle's algorithm).
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # An accepted socket is blocking without a timeout (the listening socket's does not
        # carry over), and pynetdicom's reactor, once part of a PDU has arrived, blocks in
        # recv() for the rest: a peer that sends half a PDU and stalls would hold the
        # thread and its association slot forever. Bound every read by the network timeout.
        client.settimeout(self.ae.network_timeout)
        return client, address

    def associated(self, address: Any, assoc: Association) -> None:
        """The association a connection's request thread has built (not yet started)."""
        if self.gate is not None:
            self.gate.associated(address, assoc)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # On the accept loop, before a thread is started: a refused connection is closed
        # there and then (socketserver's shutdown_request).
        return self.gate is None or self.gate.admit(client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)  # starts the request thread
        except BaseException:
            # No thread (none could be started): the connection must not stay counted.
            if self.gate is not None:
                self.gate.handled(client_address)
            raise

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            self._finish_request(request, client_address)
        finally:
            if self.gate is not None:
                self.gate.handled(client_address)

    def _finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is not None:
            request.settimeout(self.handshake_timeout_s)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.warning("scp.tls_handshake_failed", host=client_address[0], error=str(exc))
                request.close()
                return
            request.settimeout(self.ae.network_timeout)
        super().finish_request(request, client_address)


def stream_received_datasets(incoming: Path) -> None:
    """Received C-STORE datasets go straight to files in ``incoming`` (never to memory),
    hashed as they arrive, their first bytes kept for the header read
    (:func:`take_received`).

    pynetdicom streams them to tempfile's directory: making it the spool's incoming/ keeps
    the final rename atomic (same filesystem). Process-wide, because pynetdicom offers no
    per-AE setting.
    """
    tempfile.tempdir = str(incoming)
    _INCOMING[0] = str(incoming)
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _hashing_temporary_file  # type: ignore[assignment]
    # The File Meta Information of each, encoded directly (see _write_file_meta).
    dimse_messages.create_file_meta = _file_meta  # type: ignore[assignment]
    dimse_messages.write_file_meta_info = _write_file_meta


# The data set bytes a received file keeps in memory from its first fragments: the
# indexed attributes sit in groups 0008-0028, a few kB into an image, so the header is
# parsed from memory, not read back from the file (and pydicom's tell() on a file is a
# system call, ~70 per instance). A longer header is read from the file.
HEAD_BYTES = 64 << 10


class _HashingFile:
    """pynetdicom's temporary file for one received data set, hashing the data set as it
    streams in, in the DUL thread while the rest is still on the wire: re-reading the file
    afterwards put ~6 ms per 2048x2048 instance on the path to the answer.

    pynetdicom writes the preamble and File Meta Information first (plain ``write``
    calls), then each data set fragment as ``write(fragment)`` followed by
    ``.file.flush()`` (``tests/ingest/test_hardening.py`` checks that it still does): a
    flush hashes the fragment just written, so the digest covers exactly the data set's
    bytes, what the spool's sha256 covers (from ``dataset_offset``), and keeps the first
    ``HEAD_BYTES`` of them (``head``).

    It stands in for ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")``: a
    new file in the incoming folder, which pynetdicom closes and unlinks itself once the
    C-STORE handler has returned. Named by a counter, not tempfile's random names (whose
    making was ~3% of the SCP's time).
    """

    def __init__(self, folder: str):
        while True:
            self.name = os.path.join(folder, f"{os.getpid()}-{next(_SEQUENCE)}.dcm")
            try:
                fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:
                continue  # a leftover of an earlier process with this pid
        self._raw = open(fd, "wb")  # noqa: SIM115 - closed by pynetdicom through close()
        self.digest = hashlib.sha256()
        self.hashed = 0
        self.written = 0  # bytes written, preamble and File Meta Information included
        self.dataset_start: int | None = None  # where the first fragment went
        self.head = bytearray()
        self._last: bytes | bytearray | memoryview | None = None

    @property
    def file(self) -> _HashingFile:
        """What pynetdicom flushes through (a property: an attribute naming itself would
        be a cycle, keeping a dropped file open until the garbage collector runs)."""
        return self

    def write(self, data: bytes | bytearray | memoryview) -> int:
        written = self._raw.write(data)
        self.written += len(data)
        self._last = data
        return written

    def flush(self) -> None:
        last = self._last
        if last is not None:
            if self.dataset_start is None:
                self.dataset_start = self.written - len(last)
            self.digest.update(last)  # releases the GIL for all but tiny fragments
            self.hashed += len(last)
            if len(self.head) < HEAD_BYTES:
                self.head += last[: HEAD_BYTES - len(self.head)]
            self._last = None
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        self._raw.close()


@dataclass(frozen=True)
class Received:
    """What streaming a received file learned about it (see :func:`take_received`)."""

    fd: int  # the file, open until the C-STORE handler returns
    size: int  # of the whole file
    dataset_offset: int  # where the data set starts (after the File Meta Information)
    head: bytes  # the data set's first bytes (all of it when len(head) == dataset_bytes)
    sha256: str  # of the data set

    @property
    def dataset_bytes(self) -> int:
        return self.size - self.dataset_offset


_SEQUENCE = itertools.count(1)
_INCOMING = [tempfile.gettempdir()]  # set by stream_received_datasets

# Files being received or received and not yet stored, by path. Weakly: pynetdicom holds
# each one (its DIMSE message, then its C-STORE request) until the handler has returned,
# and an association aborted in the middle of a data set drops its file, which must then
# go (its descriptor closed, its first bytes freed), not stay here.
_STREAMED: weakref.WeakValueDictionary[str, _HashingFile] = weakref.WeakValueDictionary()
_STREAMED_LOCK = threading.Lock()


def _hashing_temporary_file(*_args: Any, **_kwargs: Any) -> _HashingFile:
    handle = _HashingFile(_INCOMING[0])
    with _STREAMED_LOCK:
        _STREAMED[handle.name] = handle
    return handle


def take_received(path: Path) -> Received | None:
    """What was learnt streaming the received file at ``path`` (once: it is forgotten
    then), for its C-STORE handler; None when it was not streamed so, or some of it was
    written without being hashed (the caller reads and hashes the file)."""
    with _STREAMED_LOCK:
        handle = _STREAMED.pop(str(path), None)
    if handle is None or handle._last is not None or handle._raw.closed:
        return None
    # Everything after the first fragment was hashed (as pynetdicom writes: fragments
    # only, each flushed), so the data set is exactly the hashed bytes.
    offset = handle.written - handle.hashed
    if handle.dataset_start is not None and handle.dataset_start != offset:
        return None
    return Received(
        fd=handle.fileno(),
        size=handle.written,
        dataset_offset=offset,
        head=bytes(handle.head),
        sha256=handle.digest.hexdigest(),
    )


class _FileMeta:
    """What pynetdicom's ``create_file_meta`` is given for a received C-STORE data set,
    for :func:`_write_file_meta` to encode (see there)."""

    def __init__(
        self,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID,
        implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION,
    ):
        self.values = (sop_class_uid, sop_instance_uid, transfer_syntax, implementation_uid)
        self.version = implementation_version

    def encoded(self) -> bytes | None:
        """The File Meta Information, as pydicom's ``write_file_meta_info`` writes it;
        None where that could differ (an empty or non-ASCII value: pydicom then refuses
        or encodes it its own way)."""
        uids = [str(v) for v in self.values]
        if not all(v and v.isascii() for v in uids) or not (
            self.version and self.version.isascii()
        ):
            return None
        body = bytearray(b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01")
        for element, value in zip((0x0002, 0x0003, 0x0010, 0x0012), uids, strict=True):
            raw = value.encode("ascii")
            raw += b"\x00" * (len(raw) % 2)
            body += struct.pack("<HH2sH", 0x0002, element, b"UI", len(raw)) + raw
        raw = self.version.encode("ascii")
        raw += b" " * (len(raw) % 2)
        body += struct.pack("<HH2sH", 0x0002, 0x0013, b"SH", len(raw)) + raw
        return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body

    def dataset(self) -> Any:
        sop_class, sop_instance, syntax, implementation = (UID(v) for v in self.values)
        return _original_create_file_meta(
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            transfer_syntax=syntax,
            implementation_uid=implementation,
            implementation_version=self.version,
        )


def _file_meta(**kwargs: Any) -> _FileMeta:
    return _FileMeta(**kwargs)


def _write_file_meta(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    """pydicom's ``write_file_meta_info`` for the File Meta Information of a received
    data set, encoded directly: through pydicom it was ~10% of the SCP's Python time per
    512x512 instance. Anything it cannot encode byte for byte as pydicom does goes to
    pydicom (``tests/ingest/test_hardening.py`` compares the two)."""
    if isinstance(file_meta, _FileMeta):
        encoded = file_meta.encoded()
        if encoded is not None:
            fp.write(encoded)
            return
        file_meta = file_meta.dataset()
    _original_write_file_meta_info(fp, file_meta, enforce_standard)


def skip_discarded_logging() -> None:
    """Do not bind pynetdicom's standard logging handlers to the associations and servers
    made from now on, while its logger discards what they log (``logs.py`` holds it at
    WARNING; they log at DEBUG and INFO only): each PDU and DIMSE message sent or
    received otherwise builds an Event and runs a handler that formats its fields (UID
    names looked up) for nothing, on the path to every C-STORE answer. Process-wide,
    like every ``_config`` setting."""
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        _config.LOG_HANDLER_LEVEL = "none"


# The pynetdicom modules that took ``set_uid`` by name (``from pynetdicom.utils import``).
_SET_UID_USERS = ("ae", "dimse_primitives", "pdu_items", "pdu_primitives", "presentation")


def remember_valid_uids() -> None:
    """pynetdicom converts and checks every UID it meets with ``utils.set_uid``: each
    presentation context's abstract and transfer syntaxes as the A-ASSOCIATE-RQ is
    decoded, again as it is negotiated and answered, each C-STORE's two UIDs in the
    request and again in the answer. The check (pydicom's ``UID.is_valid``, a regular
    expression, run even where only its warning depends on it) was a fifth of a serving
    process's Python time per association (~130 contexts from storescu) and 5% per
    instance. The same few hundred UIDs recur: each is checked once and its result kept
    (at most 4096; a value that fails is not kept, and fails again as before).
    Process-wide, like every ``_config`` setting; idempotent."""
    from pynetdicom import utils

    original = getattr(utils.set_uid, "__wrapped__", utils.set_uid)

    @functools.lru_cache(maxsize=4096)
    def checked(
        value: str, name: str, allow_empty: bool, allow_none: bool, validate: bool
    ) -> UID | None:
        return cast("UID | None", original(value, name, allow_empty, allow_none, validate))

    @functools.wraps(original)
    def set_uid(
        value: str | bytes | UID | None,
        name: str,
        allow_empty: bool = True,
        allow_none: bool = True,
        validate: bool = True,
    ) -> UID | None:
        if isinstance(value, str):  # UID included: equal to, and hashed as, its str
            return checked(value, name, allow_empty, allow_none, validate)
        return cast("UID | None", original(value, name, allow_empty, allow_none, validate))

    for module_name in _SET_UID_USERS:
        module = importlib.import_module(f"pynetdicom.{module_name}")
        if getattr(module, "set_uid", None) in (original, utils.set_uid):
            module.set_uid = set_uid  # type: ignore[attr-defined]
    utils.set_uid = set_uid


def send_datasets_from_files() -> None:
    """C-STORE requests made from a file path stream its bytes from disk, as stored."""
    _config.STORE_SEND_CHUNKED_DATASET = True


def register_server(ae: AE, server: ThreadedAssociationServer) -> None:
    """Track a server made with ``make_server`` as ``start_server`` would, so that
    ``server_close()`` and ``AE.shutdown()`` find it."""
    ae._servers.append(server)


def peer_certificate(assoc: Association) -> dict[str, Any] | None:
    """The client certificate an acceptor's peer presented and the TLS context verified
    (``getpeercert()``'s dict), or None: plain TCP, or no certificate asked for."""
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        return sock.getpeercert() or None
    except (ValueError, OSError):  # the connection is gone already
        return None


def nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler of a requestor: Nagle off on the association's socket."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
