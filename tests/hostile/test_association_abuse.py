"""Association abuse against a running node: idle and half-open connections, trickled and
oversized requests, malformed PDUs, hostile AE titles, and more associations than allowed.

tests/ingest/test_association.py covers the allow-list with DCMTK's echoscu (wrong called
AE, unknown calling AE, allowed AE from an unknown host); this file works at the PDU level.
The node runs with short timeouts (ACSE 2 s, network / DIMSE 3 s) and four association
slots, and every test checks that it keeps serving others while it is being abused.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile_pdus import (
    ABORT,
    RELEASE_RP,
    associate_rq,
    associated,
    connect,
    echo_rq,
    exchange,
    item,
    pdu,
    read_pdu,
    read_until_closed,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from support.net import echo, wait_for
from support.node import NodeProcess, base_config, deep_merge

pytestmark = pytest.mark.slow

ACSE_S, NETWORK_S, MAX_ASSOC = 2, 3, 4
NODE = {
    "acse_timeout_s": ACSE_S,
    "dimse_timeout_s": NETWORK_S,
    "network_timeout_s": NETWORK_S,
    "max_associations": MAX_ASSOC,
}
SLACK_S = 2.5  # scheduling on a shared 2-core machine, the reactor's polling


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One node for the module (each start costs seconds on a shared 2-core machine);
    every test leaves it with its slots free, which the tests check for themselves."""
    home = tmp_path_factory.mktemp("abuse")
    config = deep_merge(base_config(home, f"sqlite:///{home / 'ddn.sqlite'}"), {"node": NODE})
    with NodeProcess(home, config, ("scp",)) as n:
        yield n
    assert n.proc is not None and n.proc.returncode == 0, "the node did not stop cleanly"


@pytest.fixture(autouse=True)
def _node_alive_after(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "node" in request.fixturenames:
        n = request.getfixturevalue("node")
        assert n.proc.poll() is None, "the node process died"


def events(node: Any, name: str) -> list[dict[str, Any]]:
    return [e for e in node.events() if e.get("event") == name]


def rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise KeyError("VmRSS")


# -- slowloris: idle, half-open, trickling ------------------------------------------------


def test_connection_that_never_requests_is_closed_by_the_acse_timeout(node: Any) -> None:
    with connect(node.port) as idle:
        t0 = time.monotonic()
        assert echo(node.port) == 0x0000  # served meanwhile
        result = read_until_closed(idle, ACSE_S + NETWORK_S + SLACK_S + 5)
    assert result.closed_by_peer, "an idle connection is still open"
    assert result.seconds + (time.monotonic() - t0 - result.seconds) <= ACSE_S + SLACK_S
    assert result.received == b""


def test_association_that_goes_idle_is_aborted_by_the_network_timeout(node: Any) -> None:
    with associated(node.port) as sock:
        t0 = time.monotonic()
        assert echo(node.port) == 0x0000
        result = read_until_closed(sock, NETWORK_S + SLACK_S + 5)
        waited = time.monotonic() - t0
    assert result.closed_by_peer
    assert result.pdu_types == [0x07], "expected an A-ABORT before the close"
    assert NETWORK_S - 0.5 <= waited <= NETWORK_S + SLACK_S
    wait_for(
        lambda: any(e.get("how") == "aborted" for e in events(node, "scp.association_closed")),
        10,
        "association_closed",
    )


@pytest.mark.parametrize("cut", [1, 6, 30])
def test_half_a_request_then_silence_is_closed(node: Any, cut: int) -> None:
    """A-ASSOCIATE-RQ cut after ``cut`` bytes: the rest never comes."""
    with connect(node.port) as sock:
        sock.sendall(associate_rq()[:cut])
        t0 = time.monotonic()
        assert echo(node.port) == 0x0000
        result = read_until_closed(sock, ACSE_S + NETWORK_S + SLACK_S + 5)
        waited = time.monotonic() - t0
    assert result.closed_by_peer
    assert waited <= max(ACSE_S, NETWORK_S) + SLACK_S


def test_half_a_pdata_then_silence_is_closed(node: Any) -> None:
    with associated(node.port) as sock:
        sock.sendall(echo_rq()[:20])
        t0 = time.monotonic()
        assert echo(node.port) == 0x0000
        result = read_until_closed(sock, NETWORK_S + SLACK_S + 5)
        waited = time.monotonic() - t0
    assert result.closed_by_peer
    assert waited <= NETWORK_S + SLACK_S


def test_trickled_request_is_cut_at_the_acse_timeout(node: Any) -> None:
    """One byte every 0.4 s: each read completes within the network timeout, so only a
    deadline on the whole request (ARTIM) stops it."""
    rq = associate_rq()
    with connect(node.port) as sock:
        t0 = time.monotonic()
        closed_after = None
        for byte in rq:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - t0
                break
            time.sleep(0.4)
            if time.monotonic() - t0 > ACSE_S + NETWORK_S + SLACK_S + 5:
                break
        if closed_after is None:
            result = read_until_closed(sock, 1)
            assert result.closed_by_peer, "a trickling client still holds its connection"
            closed_after = time.monotonic() - t0
    assert closed_after <= ACSE_S + SLACK_S
    wait_for(lambda: events(node, "scp.request_too_slow"), 10, "scp.request_too_slow")
    assert echo(node.port) == 0x0000


def test_idle_connections_take_slots_until_the_acse_timeout_frees_them(node: Any) -> None:
    """Connections that never associate count against max_associations (pynetdicom counts
    every acceptor thread), so they lock others out, but only for the ACSE timeout."""
    wait_for(
        lambda: _all_slots_free(node.port), 15, "every slot free before the test", interval=0.5
    )
    idle = [connect(node.port) for _ in range(MAX_ASSOC)]
    try:
        t0 = time.monotonic()
        wait_for(
            lambda: echo(node.port) == 0x0000,
            ACSE_S + SLACK_S + 5,
            "a slot freed by the ACSE timeout",
            interval=0.2,
        )
        assert time.monotonic() - t0 <= ACSE_S + SLACK_S
    finally:
        for sock in idle:
            sock.close()


def test_oversized_request_is_refused_before_it_is_buffered(node: Any) -> None:
    """A PDU header declaring 2 GiB, then data as fast as the node takes it: it must not
    buffer it (pynetdicom would, before checking who is calling)."""
    before = rss_mb(node.proc.pid)
    sent = 0
    with connect(node.port) as sock:
        sock.sendall(struct.pack(">BBI", 0x01, 0, 0x7FFFFFFF))
        chunk = b"\0" * (1 << 20)
        t0 = time.monotonic()
        try:
            while sent < 256 and time.monotonic() - t0 < 20:
                sock.sendall(chunk)
                sent += 1
        except OSError:
            pass  # closed by the node: the answer we want
        result = read_until_closed(sock, 5)
    assert result.closed_by_peer
    assert sent < 64, f"the node took {sent} MiB of an anonymous request"
    assert rss_mb(node.proc.pid) - before < 32
    wait_for(lambda: events(node, "scp.request_too_large"), 10, "scp.request_too_large")
    assert echo(node.port) == 0x0000


# -- the association limit ----------------------------------------------------------------


def _all_slots_free(port: int) -> bool:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    again = [ae.associate("127.0.0.1", port, ae_title="DDN_NODE") for _ in range(MAX_ASSOC)]
    ok = all(a.is_established for a in again)
    for a in again:
        if a.is_established:
            a.release()
    return ok


def test_more_associations_than_the_limit_are_rejected_transiently_and_recover(node: Any) -> None:
    # Earlier tests' connections may still be closing (a slot is held up to ARTIM).
    wait_for(
        lambda: _all_slots_free(node.port), 15, "every slot free before the test", interval=0.5
    )
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", node.port, ae_title="DDN_NODE") for _ in range(MAX_ASSOC)]
    try:
        assert all(a.is_established for a in held)
        # One more, on the wire: A-ASSOCIATE-RJ, result 2 (rejected-transient), source 3
        # (service-provider, presentation related), reason 2 (local-limit-exceeded).
        with connect(node.port) as sock:
            sock.sendall(associate_rq())
            pdu_type, body = read_pdu(sock)
            assert (pdu_type, body[1], body[2], body[3]) == (0x03, 0x02, 0x03, 0x02)
            assert read_until_closed(sock, 10).closed_by_peer
        # The held ones still work.
        assert all(int(a.send_c_echo().Status) == 0 for a in held)
        held.pop().release()
        wait_for(lambda: echo(node.port) == 0x0000, 10, "a slot after one release", interval=0.2)
    finally:
        for a in held:
            if a.is_established:
                a.release()
    wait_for(lambda: _all_slots_free(node.port), 15, "every slot free again", interval=0.5)


# -- malformed PDUs and hostile AE titles -------------------------------------------------


def _rq_with(
    header_patch: dict[int, bytes] | None = None, items: bytes | None = None, length_delta: int = 0
) -> bytes:
    rq = bytearray(associate_rq())
    for at, data in (header_patch or {}).items():
        rq[at : at + len(data)] = data
    if items is not None:
        rq = rq[:74] + bytearray(items)
    body_len = len(rq) - 6 + length_delta
    rq[2:6] = struct.pack(">I", body_len & 0xFFFFFFFF)
    return bytes(rq)


def _called(title: bytes) -> bytes:
    return _rq_with({10: title.ljust(16, b" ")[:16]})


def _calling(title: bytes) -> bytes:
    return _rq_with({26: title.ljust(16, b" ")[:16]})


MALFORMED: dict[str, tuple[list[bytes], set[int]]] = {
    # name: (what to send, PDU types the node may answer with before closing)
    "unknown PDU type": ([pdu(0x09, b"\0" * 10)], {0x07}),
    "A-ABORT first": ([ABORT], set()),
    "A-RELEASE-RP first": ([RELEASE_RP], {0x07}),
    "P-DATA-TF first": ([echo_rq()], {0x07}),
    "A-ASSOCIATE-AC from the requestor": ([pdu(0x02, associate_rq()[6:])], {0x07}),
    "PDU length 0": ([pdu(0x01, b"")], {0x07}),
    "PDU length shorter than the fixed fields": ([_rq_with(length_delta=-200)], {0x03, 0x07}),
    "protocol version 0": ([_rq_with({6: b"\0\0"})], {0x03, 0x07}),
    # pynetdicom accepts an RQ without any item (no context is usable), then aborts it.
    "no items at all": ([_rq_with(items=b"")], {0x02, 0x03, 0x07}),
    "item length past the PDU end": (
        [_rq_with(items=item(0x10, b"1.2.840.10008.3.1.1.1")[:4] + b"\x00")],
        {0x03, 0x07},
    ),
    "presentation context item of length 0": (
        [_rq_with(items=item(0x10, b"1.2.840.10008.3.1.1.1") + item(0x20, b""))],
        {0x03, 0x07},
    ),
    "unknown item type": (
        [_rq_with(items=item(0x10, b"1.2.840.10008.3.1.1.1") + item(0x77, b"\0" * 8))],
        {0x02, 0x03, 0x07},
    ),
    "user information with a 0-byte max length": (
        [_rq_with(items=item(0x10, b"1.2.840.10008.3.1.1.1") + item(0x50, item(0x51, b"")))],
        {0x03, 0x07},
    ),
    "two A-ASSOCIATE-RQ": ([associate_rq(), associate_rq()], {0x02, 0x07}),
    "called AE with control characters": ([_called(b"DDN\x00\x1b[2J\x07")], {0x03, 0x07}),
    "called AE all spaces": ([_called(b" " * 16)], {0x03, 0x07}),
    "calling AE with bytes above 0x7F": ([_calling(b"\xff\xfe\xc3(EVIL")], {0x03, 0x07}),
    "calling AE with a backslash and NUL": ([_calling(b"EV\\IL\x00AE")], {0x03, 0x07}),
    "calling AE that looks like a log line": ([_calling(b'"}{"event":"x')], {0x03, 0x07}),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_pdu_is_answered_and_closed(node: Any, name: str) -> None:
    chunks, allowed = MALFORMED[name]
    # No half-close: the node must end the connection on its own.
    result = exchange(node.port, chunks, timeout=ACSE_S + NETWORK_S + SLACK_S + 5, half_close=False)
    assert result.closed_by_peer, f"{name}: still open after {result.seconds:.1f} s"
    assert set(result.pdu_types) <= allowed, f"{name}: answered {result.pdu_types}"
    assert result.seconds <= max(ACSE_S, NETWORK_S) + SLACK_S
    assert echo(node.port) == 0x0000
    assert node.proc.poll() is None


def test_closed_probes_free_their_slot_at_once(node: Any) -> None:
    """A TCP connect-and-close (port probe, load-balancer health check) or junk then close
    must not hold an association slot until the ACSE timeout."""
    wait_for(
        lambda: _all_slots_free(node.port), 15, "every slot free before the test", interval=0.5
    )
    for _ in range(MAX_ASSOC * 2):
        exchange(node.port, [], timeout=5)
        exchange(node.port, [b"\x99" * 10], timeout=5)
    t0 = time.monotonic()
    wait_for(lambda: _all_slots_free(node.port), 10, "slots after probes", interval=0.1)
    assert time.monotonic() - t0 < ACSE_S, "closed probes held association slots"


def test_rejections_with_hostile_ae_titles_are_logged_as_data(make_node: Any, db_url: str) -> None:
    """Rejected callers whose AE titles carry control characters, NUL, non-ASCII bytes or
    JSON are rejected, audited and logged without breaking the log format or the audit
    table (NUL in a PostgreSQL text column is an error of its own)."""
    with make_node(db_url, node=NODE) as n:
        for title in (b"EV\\IL\x00AE", b"\xff\xfe\xc3(EVIL", b'"}{"event":"x', b"\x1b[31mRED"):
            result = exchange(n.port, [_calling(title)], timeout=10, half_close=False)
            assert result.closed_by_peer
        assert echo(n.port) == 0x0000
        assert n.proc.poll() is None
    # Every line of the log is still one JSON object (no injected lines).
    lines = [line for line in n.log_path.read_text(errors="replace").splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines), [
        line for line in lines if not line.startswith("{")
    ][:3]
    assert not [e for e in n.events() if e.get("event") == "x"]


def test_the_socket_helper_sees_a_reset_as_a_close() -> None:
    """read_until_closed treats a reset connection as closed (the node may RST after an
    A-ABORT); checked here against a local listener, no node needed."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # RST
    assert read_until_closed(client, 5).closed_by_peer
    client.close()
    server.close()


# -- unknown host, beyond tests/ingest/test_association.py -------------------------------


def _echo_from(host: str, port: int, calling: str = "TESTSCU") -> int | None:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title="DDN_NODE")
    if not assoc.is_established:
        return None if not assoc.is_rejected else -1
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) if "Status" in status else None


def test_the_same_machine_over_ipv6_is_another_host(make_node: Any, sqlite_url: str) -> None:
    """A node listening on all IPv6 addresses (dual stack): TESTSCU is allowed from
    127.0.0.1 only. Over IPv4 the peer address arrives IPv4-mapped (::ffff:127.0.0.1)
    and is allowed; from ::1 it is another host and is rejected, and audited as such.
    (Another peer is allowed from ::1, so that ::1 gets past the check on accept, which
    closes connections from addresses no peer has, and meets the AE title check.)"""
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    peers = [
        {"ae_title": "TESTSCU", "hosts": ["127.0.0.1"]},
        {"ae_title": "V6SCU", "hosts": ["::1"]},
    ]
    with make_node(sqlite_url, node={**NODE, "host": "::"}, peers=peers) as n:
        wait_for(lambda: _echo_from("::1", n.port) is not None, 10, "the node on IPv6")
        assert _echo_from("127.0.0.1", n.port) == 0x0000
        assert _echo_from("::1", n.port) == -1  # A-ASSOCIATE-RJ
        wait_for(
            lambda: any(e.get("host") == "::1" for e in events(n, "scp.association_rejected")),
            10,
            "the rejection logged",
        )
