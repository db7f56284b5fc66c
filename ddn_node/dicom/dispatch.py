"""Several SCP processes behind one port: one process accepts, the others serve.

Python runs one thread at a time per process (the GIL), so however many associations a
single SCP process serves, it uses one core: more associations made it *slower* (each
thread's turn costs the others). With ``[node] scp_processes`` above 1, the node's SCP is a
group: the process that ``ddn-node serve`` started listens on the ports and accepts, and
hands each connection it admits to the serving process with the fewest open connections,
which does everything else (TLS, the association, every C-STORE) as a single-process SCP
does.

A connection is handed over as its file descriptor on a Unix socket pair (SCM_RIGHTS), one
pair per serving process and port. The serving process says on the same pair when the
connection has ended, so the accepting process knows what each one serves.

Why accept in one process instead of letting each serving process accept on the port
(SO_REUSEPORT): the kernel then spreads connections by a hash of their addresses, which
with four associations over two processes leaves one process with three of them half the
time; and the allow-list gate and the per-host connection limit (``ConnectionGate``) must
count every connection from a host, whichever process serves it. Here the one gate sees
them all, on accept, before a byte of the peer's is read.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog

from ddn_node.dicom.hardening import (
    ConnectionGate,
    HardenedServer,
    wait_association_over,
    when_over,
)

log = structlog.get_logger("ddn_node.scp")

# Messages on a pair (SOCK_SEQPACKET keeps each one whole): the accepting process sends
# HAND + a connection token with the connection's descriptor; the serving process answers
# DONE + the token once the connection has ended, READY once it serves, and WORK when a
# study it received has completed (its completion timers run there): the worker in the
# accepting process claims it at once instead of at its next poll.
HAND = b"H"
DONE = b"D"
READY = b"R"
WORK = b"W"
_TOKEN = struct.Struct("!Q")
_MESSAGE_BYTES = 1 + _TOKEN.size


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(the accepting process's end, the serving process's end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


@dataclass
class _Server:
    """One serving process, as the accepting process sees it."""

    index: int
    channels: list[socket.socket]  # one per port, in the order of the listening ports
    open: dict[int, Any] = field(default_factory=dict)  # token -> the peer's address
    ready: threading.Event = field(default_factory=threading.Event)
    alive: bool = True
    send_lock: threading.Lock = field(default_factory=threading.Lock)


class Dispatcher:
    """The accepting process's side: who serves what, and handing connections over."""

    def __init__(
        self,
        gate: ConnectionGate,
        on_lost: Callable[[int], None] | None = None,
        on_work: Callable[[], None] | None = None,
    ):
        self.gate = gate
        self._on_lost = on_lost
        self._on_work = on_work
        self._lock = threading.Lock()
        self._servers: dict[int, _Server] = {}
        self._next_token = 0
        self._turn = 0  # which of equally loaded processes is next (round robin)

    def add(self, index: int, channels: list[socket.socket]) -> threading.Event:
        """A serving process (new, or started again in place of a lost one); returns the
        Event set once it says it serves."""
        server = _Server(index, channels)
        with self._lock:
            self._servers[index] = server
        for port_index, channel in enumerate(channels):
            threading.Thread(
                target=self._listen,
                args=(server, channel),
                name=f"scp-dispatch-{index}.{port_index}",
                daemon=True,
            ).start()
        return server.ready

    def load(self) -> dict[int, int]:
        """Open connections per serving process (for logs and tests)."""
        with self._lock:
            return {i: len(s.open) for i, s in self._servers.items() if s.alive}

    def hand(self, port_index: int, request: socket.socket, address: Any) -> bool:
        """Give an admitted connection to the least busy serving process; False if none
        could take it (the caller closes it)."""
        while True:
            with self._lock:
                candidates = [s for s in self._servers.values() if s.alive and s.ready.is_set()]
                if not candidates:
                    return False
                fewest = min(len(s.open) for s in candidates)
                tied = sorted(
                    (s for s in candidates if len(s.open) == fewest), key=lambda s: s.index
                )
                server = tied[self._turn % len(tied)]
                self._turn += 1
                self._next_token += 1
                token = self._next_token
                server.open[token] = address
            try:
                with server.send_lock:
                    socket.send_fds(
                        server.channels[port_index], [HAND + _TOKEN.pack(token)], [request.fileno()]
                    )
                return True
            except OSError as exc:
                # The process has died and its pair is closed: the next one is tried.
                log.warning("scp.handover_failed", process=server.index, error=str(exc))
                with self._lock:
                    server.open.pop(token, None)
                self._lost(server)

    def _listen(self, server: _Server, channel: socket.socket) -> None:
        """What a serving process says on one pair: READY, DONE per ended connection, and
        WORK per completed study."""
        while True:
            try:
                message = channel.recv(_MESSAGE_BYTES)
            except OSError:
                message = b""
            if not message:
                self._lost(server)  # end of file: the process has exited (or was killed)
                return
            self._heard(server, message)

    def _heard(self, server: _Server, message: bytes) -> None:
        if message[:1] == READY:
            server.ready.set()
        elif message[:1] == WORK:
            if self._on_work is not None:
                self._on_work()
        elif message[:1] == DONE and len(message) == _MESSAGE_BYTES:
            (token,) = _TOKEN.unpack(message[1:])
            with self._lock:
                address = server.open.pop(token, None)
            if address is not None:
                self.gate.handled(address)

    def drain(self) -> None:
        """Take in what the serving processes have said already (on the accept loop,
        before the gate decides): a peer whose association just ended, and which
        connects again at once, finds its earlier connection counted off."""
        with self._lock:
            servers = [s for s in self._servers.values() if s.alive]
        for server in servers:
            for channel in server.channels:
                while True:
                    try:
                        message = channel.recv(_MESSAGE_BYTES, socket.MSG_DONTWAIT)
                    except OSError:  # BlockingIOError: nothing more; or closed
                        break
                    if not message:
                        break  # end of file: its listener sees it too and handles it
                    self._heard(server, message)

    def _lost(self, server: _Server) -> None:
        """A serving process is gone: its connections died with it (their descriptors
        were closed with the process), so they no longer count against their hosts."""
        with self._lock:
            if not server.alive:
                return
            server.alive = False
            addresses = list(server.open.values())
            server.open.clear()
            if self._servers.get(server.index) is server:
                del self._servers[server.index]
        for address in addresses:
            self.gate.handled(address)
        for channel in server.channels:
            channel.close()
        if self._on_lost is not None:
            self._on_lost(server.index)

    def close(self) -> None:
        with self._lock:
            servers = list(self._servers.values())
            self._servers.clear()
        for server in servers:
            server.alive = False
            for channel in server.channels:
                channel.close()


class AcceptingServer(socketserver.TCPServer):
    """The listening port of a group of SCP processes: admits through the gate, then
    hands over; it never reads from a connection."""

    allow_reuse_address = True
    # Connections the kernel holds before accept(): socketserver's 5 is small when a
    # PACS opens its parallel associations at once.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        dispatcher: Dispatcher,
        port_index: int,
        network_timeout: float | None,
    ):
        self.dispatcher = dispatcher
        self.port_index = port_index
        self.network_timeout = network_timeout
        # "::" listens on IPv6 (and, dual stack, IPv4-mapped), as pynetdicom's servers do.
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        # Bound now (the port is known, and taken), listening only once activate() is
        # called: until the serving processes are up a peer is refused, not kept waiting.
        super().__init__(address, socketserver.BaseRequestHandler, bind_and_activate=False)
        try:
            self.server_bind()
        except BaseException:
            self.server_close()
            raise

    def activate(self) -> None:
        self.server_activate()

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = self.socket.accept()
        # As HardenedServer: Nagle off, every read bounded. The options belong to the
        # connection, so they hold in the serving process too.
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.settimeout(self.network_timeout)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.dispatcher.drain()
        return self.dispatcher.gate.admit(client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.dispatcher.hand(self.port_index, request, client_address):
            log.error("scp.no_process_to_serve", host=client_address[0])
            self.dispatcher.gate.handled(client_address)
            self.shutdown_request(request)
            return
        # Closed, not shut down: the connection lives on in the serving process.
        request.close()


class HandedServer(HardenedServer):
    """A serving process's server: it does not listen; its connections arrive over a
    pair from the accepting process (which has already applied the gate)."""

    channel: socket.socket
    parent_gone: threading.Event

    def server_bind(self) -> None:
        # No socket of its own on the port: attach() gives it the pair to read from.
        pass

    def server_activate(self) -> None:
        pass

    def attach(self, channel: socket.socket, parent_gone: threading.Event) -> None:
        if self.socket is not None:
            self.socket.close()  # the unbound TCP socket socketserver made
        self.socket = channel
        self.channel = channel
        self.parent_gone = parent_gone
        self._tokens: dict[Any, int] = {}
        self._assocs: dict[Any, Any] = {}
        self._said: set[int] = set()  # tokens whose DONE has been said
        self._mutex = threading.Lock()

    def say(self, message: bytes) -> None:
        with self._mutex:
            try:
                self.channel.send(message)
            except OSError:
                self.parent_gone.set()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        message, fds, _flags, _addr = socket.recv_fds(self.channel, _MESSAGE_BYTES, 1)
        if not message or message[:1] != HAND or len(fds) != 1:
            for fd in fds:
                socket.close(fd)
            if not message:
                # The accepting process has gone: no connection will come any more.
                self.parent_gone.set()
                self.parent_gone.wait(0.05)  # serve_forever would spin on the readable end
            raise OSError("no connection handed over")
        (token,) = _TOKEN.unpack(message[1:])
        client = socket.socket(fileno=fds[0])
        client.settimeout(self.ae.network_timeout)
        try:
            address = client.getpeername()
        except OSError:
            client.close()
            self.say(DONE + _TOKEN.pack(token))
            raise
        with self._mutex:
            self._tokens[address] = token
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return True  # admitted by the accepting process's gate

    def associated(self, address: Any, assoc: Any) -> None:
        with self._mutex:
            self._assocs[address] = assoc
            token = self._tokens.get(address)
        if token is not None:
            # DONE is said by the association's own thread as it ends, before its
            # A-RELEASE-RP leaves: the accepting process has it before the peer can
            # connect again (and reads it before admitting: Dispatcher.drain).
            when_over(assoc, partial(self._done, token))

    def _done(self, token: int) -> None:
        with self._mutex:
            if token in self._said:
                return
            self._said.add(token)
        self.say(DONE + _TOKEN.pack(token))

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self._mutex:
            token = self._tokens.get(client_address)
        try:
            super().finish_request(request, client_address)
            with self._mutex:
                assoc = self._assocs.pop(client_address, None)
            if assoc is not None:
                # The association runs in its own thread; the connection counts against
                # its host until it is over.
                wait_association_over(assoc)
        finally:
            with self._mutex:
                self._tokens.pop(client_address, None)
            if token is not None:
                self._done(token)
                with self._mutex:
                    self._said.discard(token)
