"""Several "hosts" on one machine: network namespaces on a bridge (iproute2), for tests of
what crosses a network. Needs root; callers skip otherwise."""

from __future__ import annotations

import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def netns_available() -> bool:
    probe = f"ddnprobe{uuid.uuid4().hex[:6]}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return False
    _ip("netns", "del", probe, check=False)
    return True


@dataclass
class Lan:
    """A bridge with the root namespace at .1 and one namespace per host."""

    prefix: str = "10.77.0"
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    hosts: dict[str, str] = field(default_factory=dict)  # name -> IP

    @property
    def bridge(self) -> str:
        return f"ddnbr{self.tag}"

    @property
    def gateway(self) -> str:
        return f"{self.prefix}.1"

    def up(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_host(self, name: str) -> str:
        n = len(self.hosts) + 2
        ns, veth, peer = self.ns(name), f"ddnv{self.tag}{n}", f"ddnp{self.tag}{n}"
        ip = f"{self.prefix}.{n}"
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", ns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", peer)
        _ip("-n", ns, "link", "set", peer, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.hosts[name] = ip
        return ip

    def ns(self, name: str) -> str:
        return f"ddn{self.tag}{name}"

    def exec_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name)]

    def down(self) -> None:
        for name in self.hosts:
            _ip("netns", "del", self.ns(name), check=False)
        _ip("link", "del", self.bridge, check=False)


@contextmanager
def lan(*names: str) -> Iterator[Lan]:
    net = Lan()
    try:
        net.up()
        for name in names:
            net.add_host(name)
        yield net
    finally:
        net.down()


@contextmanager
def forward(listen: tuple[str, int], target: tuple[str, int]) -> Iterator[None]:
    """A TCP forwarder: lets the namespaces reach a server that listens on loopback only."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(listen)
    server.listen(64)
    server.settimeout(0.2)
    stop = threading.Event()

    def pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(target)
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        server.close()
        thread.join(5)
