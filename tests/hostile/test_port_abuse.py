"""The DICOM port holds under abuse (issue 15, item 3): what a stranger or a misbehaving
peer can make the node spend before anyone checked who it is.

- 64 idle connections from an address no ``[[peers]]`` entry lists: each is closed on
  accept, so allowed peers (pynetdicom and DCMTK's echoscu) still associate while they
  are open. Before, 16 idle connections from anywhere locked every peer out for the ACSE
  timeout (pynetdicom fills its association slots before it checks anyone).
- ``max_connections_per_host``: one more connection from an allowed address is closed on
  accept while the others stay open; other addresses are unaffected.
- ``first_pdu_timeout_s``: a connection that never sends its A-ASSOCIATE-RQ is closed by
  that timeout, not the (longer) ACSE timeout.
- The negotiated maximum PDU length holds after the association: a P-DATA-TF declaring
  64 MiB is answered with an A-ABORT as its header arrives; the node's peak memory does
  not grow with it (before, pynetdicom buffered it: ~3x its size).

Loopback stands in for the hospital network: Linux routes all of 127/8 to ``lo``, so a
client socket bound to 127.0.0.2 reaches the node (listening on 127.0.0.1) from another
address.
"""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile_pdus import associate_rq, associated, read_until_closed
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from support.net import echo, wait_for
from support.node import NodeProcess, base_config, deep_merge

pytestmark = pytest.mark.slow

STRANGER = "127.0.0.2"  # in no [[peers]] entry
NEIGHBOUR = "127.0.0.3"  # allowed, as TESTSCU, beside 127.0.0.1
PER_HOST = 4
MIB = 1 << 20


def _loopback_aliases_work() -> bool:
    try:
        with socket.socket() as probe:
            probe.bind((STRANGER, 0))
        return True
    except OSError:
        return False


if not _loopback_aliases_work():
    pytest.skip("127.0.0.2 is not a loopback address here", allow_module_level=True)


def _config(home: Path, **node: Any) -> dict[str, Any]:
    config = base_config(home, f"sqlite:///{home / 'ddn.sqlite'}")
    config["peers"] = [
        {"ae_title": ae, "hosts": ["127.0.0.1"]} for ae in ("ECHOSCU", "STORESCU", "DDN_SEND")
    ] + [{"ae_title": "TESTSCU", "hosts": ["127.0.0.1", NEIGHBOUR]}]
    return deep_merge(config, {"node": node})


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """The default 16 association slots; idle connections may wait 30 s for their
    request, so that any the node closes sooner were closed on purpose."""
    home = tmp_path_factory.mktemp("port")
    config = _config(
        home,
        acse_timeout_s=30,
        first_pdu_timeout_s=30,
        max_connections_per_host=PER_HOST,
        max_pdu_size=131072,
    )
    with NodeProcess(home, config, ("scp",)) as n:
        yield n
    assert n.proc is not None and n.proc.returncode == 0, "the node did not stop cleanly"


def events(node: NodeProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in node.events() if e.get("event") == name]


def connect_from(source: str, port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def still_open(sock: socket.socket) -> bool:
    """Nothing received and not closed: the node keeps the connection waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(10)


def echo_from(source: str, port: int, calling: str = "TESTSCU") -> int | None:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DDN_NODE", bind_address=(source, 0))
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) if "Status" in status else None


def echoscu(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", "DDN_NODE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident set (VmHWM), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise KeyError("VmHWM")


def test_allowed_peers_associate_while_64_idle_connections_from_a_stranger_are_open(
    node: NodeProcess,
) -> None:
    idle = [connect_from(STRANGER, node.port) for _ in range(64)]
    try:
        # Four times the association slots, none of them sending a byte: the node's
        # allowed peers are served all the same, by pynetdicom and by DCMTK.
        assert echo(node.port) == 0x0000
        done = echoscu(node.port)
        assert done.returncode == 0, done.stderr
        # Each was closed by the node (on accept: nothing was ever sent on them).
        assert all(read_until_closed(sock, 10).closed_by_peer for sock in idle)
    finally:
        for sock in idle:
            sock.close()
    refused = [e for e in events(node, "scp.connection_refused") if e["host"] == STRANGER]
    assert refused and all(e["reason"] == "host not on the allow-list" for e in refused)
    # Logged, but not once per connection: a flood of connections is no flood of logs.
    assert len(refused) < 64
    # Never got as far as an association, so nothing to reject or audit.
    assert not [e for e in events(node, "scp.association_rejected") if e["host"] == STRANGER]


def test_connections_beyond_the_per_host_limit_are_closed_on_accept(node: NodeProcess) -> None:
    wait_for(lambda: echo(node.port) == 0x0000, 30, "the node idle before the test")
    idle = [connect_from("127.0.0.1", node.port) for _ in range(PER_HOST)]
    try:
        # The node counts a connection once its accept loop has passed it: wait until all
        # four are counted (the next one from 127.0.0.1 is refused) ...
        def refused_once_more() -> bool:
            with connect_from("127.0.0.1", node.port) as extra:
                return read_until_closed(extra, 10).closed_by_peer

        wait_for(refused_once_more, 20, "a fifth connection from 127.0.0.1 refused")
        # ... while the four are still waiting for their request (30 s), and an allowed
        # peer from another address associates.
        assert all(still_open(sock) for sock in idle)
        assert echo_from(NEIGHBOUR, node.port) == 0x0000
        assert echo_from("127.0.0.1", node.port) is None
    finally:
        for sock in idle:
            sock.close()
    # Closing them gives the address its connections back.
    wait_for(lambda: echo_from("127.0.0.1", node.port) == 0x0000, 20, "127.0.0.1 served again")
    refusals = [e for e in events(node, "scp.connection_refused") if e["host"] == "127.0.0.1"]
    assert refusals and refusals[0]["reason"] == "too many connections from this host"


def test_a_pdata_pdu_over_the_negotiated_maximum_is_aborted_not_buffered(
    node: NodeProcess,
) -> None:
    assert node.proc is not None
    wait_for(lambda: echo(node.port) == 0x0000, 30, "the node idle before the test")
    declared = 64 * MIB  # 512 times the 128 KiB the node negotiated
    sent_mib = 0
    with associated(node.port) as sock:
        before = peak_rss_kib(node.proc.pid)
        sock.settimeout(10)
        try:
            sock.sendall(struct.pack(">BBI", 0x04, 0, declared))
            chunk = b"\0" * MIB
            while sent_mib < declared // MIB:
                sock.sendall(chunk)
                sent_mib += 1
        except OSError:
            pass  # the node closed the connection: the answer wanted
        result = read_until_closed(sock, 10)
    after = peak_rss_kib(node.proc.pid)
    assert result.closed_by_peer
    assert set(result.pdu_types) <= {0x07}, result.pdu_types  # an A-ABORT, if it arrived first
    assert sent_mib < declared // MIB, "the node took the whole PDU"
    growth_mib = (after - before) / 1024
    assert growth_mib < 16, f"peak memory grew by {growth_mib:.0f} MiB under a 64 MiB PDU"
    too_large = wait_for(lambda: events(node, "scp.pdu_too_large"), 10, "scp.pdu_too_large")
    assert too_large[-1]["declared"] == declared and too_large[-1]["limit"] == 131072 + 6
    wait_for(
        lambda: any(e.get("how") == "aborted" for e in events(node, "scp.association_closed")),
        10,
        "the association recorded as aborted",
    )
    assert echo(node.port) == 0x0000  # and the node serves on


def test_a_connection_without_a_request_is_closed_by_the_first_pdu_timeout(
    make_node: Any, sqlite_url: str
) -> None:
    """ACSE and network timeouts 60 s, first-PDU timeout 1 s: a connection from an allowed
    address that sends nothing, or half a request, is closed long before either of the
    other two could have (the test gives it 30 s); the node says which limit it applied
    to the one that started its request."""
    with make_node(
        sqlite_url, node={"acse_timeout_s": 60, "network_timeout_s": 60, "first_pdu_timeout_s": 1}
    ) as n:
        with connect_from("127.0.0.1", n.port) as idle, connect_from("127.0.0.1", n.port) as half:
            half.sendall(associate_rq()[:30])
            assert read_until_closed(idle, 30).closed_by_peer
            assert read_until_closed(half, 30).closed_by_peer
        slow = wait_for(lambda: events(n, "scp.request_too_slow"), 10, "scp.request_too_slow")
        assert slow[0]["limit_s"] == 1 and slow[0]["received"] == 24  # after the 6-byte header
        assert echo(n.port) == 0x0000
