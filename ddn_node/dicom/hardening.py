"""Where the node reaches into pynetdicom's internals, all in one module.

pynetdicom (pinned to :data:`PYNETDICOM_VERSION` in pyproject.toml) offers no public way to
do what a node facing hospital networks must: bound what an anonymous peer may make it
buffer, bound how long an association request may take to arrive, free an association slot
when a connection closes before its request, turn Nagle off, move the TLS handshake off the
accept loop, and stream datasets to and from files. Each of those uses a private attribute
or class here; ``tests/ingest/test_hardening.py`` checks that every one still exists, so a
pynetdicom upgrade is checked in one place, and the rest of ``dicom/`` uses only
pynetdicom's public API plus the functions below.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import structlog
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = structlog.get_logger("ddn_node.scp")

PYNETDICOM_VERSION = "3.0.4"

# The largest PDU accepted before an association is established. An A-ASSOCIATE-RQ with
# 128 presentation contexts of ten transfer syntaxes each is ~100 kB; user identity
# tokens add a few kB more.
MAX_REQUEST_PDU_BYTES = 1 << 20


class RequestGuard(AssociationSocket):
    """The DUL socket of an acceptor, stricter while the peer is still anonymous.

    pynetdicom reads a whole PDU into memory, whatever length its header declares, and
    only then decodes it; the allow-list is checked after that. Until the association is
    established this socket therefore refuses (i) a PDU declaring more than
    ``MAX_REQUEST_PDU_BYTES`` (an anonymous peer could otherwise make the node buffer up
    to 4 GiB), and (ii) taking longer than the ACSE timeout in all to arrive (the ARTIM
    rule of PS3.8 9.1.2; the network timeout alone bounds each read, so a peer trickling
    one byte a second held a thread and an association slot indefinitely). Either ends
    in an OSError, which pynetdicom treats as the connection closing.

    (iii) When the connection ends before an A-ASSOCIATE-RQ arrived (a port probe, a
    health check, junk), pynetdicom's association thread would go on waiting for the
    request until the ACSE timeout, holding one of ``max_associations`` slots all that
    time: a TCP health check every 2 s filled 16 slots with the default 30 s. The guard
    wakes it with the same "no request" it gets on a timeout.
    """

    _deadline: float
    _host: str

    def guard(self, acse_timeout: float | None, host: str) -> None:
        self._deadline = time.monotonic() + (acse_timeout or 30.0)
        self._host = host

    def recv(self, nr_bytes: int) -> bytearray:
        if self.assoc.is_established or self.socket is None:
            return super().recv(nr_bytes)
        try:
            out = self._recv_before_association(nr_bytes)
        except OSError:  # TimeoutError included
            self._no_request()
            raise
        if len(out) < nr_bytes:  # closed by the peer
            self._no_request()
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
                        "scp.request_too_slow", host=self._host, received=len(out), wanted=nr_bytes
                    )
                    raise TimeoutError(
                        "the association request did not arrive within the ACSE timeout"
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
                        )
                    raise
                if not chunk:  # closed by the peer: return what there is, as pynetdicom does
                    break
                out += chunk
        finally:
            if self.socket is not None:
                self.socket.settimeout(network_timeout)
        return out

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
        self.assoc.dul.to_user_queue.put(None)


class GuardedRequestHandler(RequestHandler):
    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        # pynetdicom builds the AssociationSocket itself (and queues the transport event
        # in its constructor, so it cannot be built twice); give it the guard's recv.
        assert type(sock) is AssociationSocket
        sock.__class__ = RequestGuard
        cast(RequestGuard, sock).guard(self.ae.acse_timeout, str(self.client_address[0]))
        return assoc


class HardenedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with Nagle off and the TLS handshake off the accept loop."""

    handshake_timeout_s: float = 30.0
    tls: ssl.SSLContext | None = None

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

    def finish_request(self, request: Any, client_address: Any) -> None:
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
    """Received C-STORE datasets go straight to files in ``incoming`` (never to memory).

    pynetdicom streams them to tempfile's directory: making it the spool's incoming/ keeps
    the final rename atomic (same filesystem). Process-wide, because pynetdicom offers no
    per-AE setting.
    """
    tempfile.tempdir = str(incoming)
    _config.STORE_RECV_CHUNKED_DATASET = True


def send_datasets_from_files() -> None:
    """C-STORE requests made from a file path stream its bytes from disk, as stored."""
    _config.STORE_SEND_CHUNKED_DATASET = True


def register_server(ae: AE, server: ThreadedAssociationServer) -> None:
    """Track a server made with ``make_server`` as ``start_server`` would, so that
    ``server_close()`` and ``AE.shutdown()`` find it."""
    ae._servers.append(server)


def nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler of a requestor: Nagle off on the association's socket."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
