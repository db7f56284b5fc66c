"""The figures of issue 15 item 3, measured on a real node (a tool, not a test):

    .venv/bin/python tests/hostile/port_abuse_figures.py

(1) 64 idle TCP connections from 127.0.0.2 (on no allow-list), then C-ECHOs from
127.0.0.1 until one succeeds: how long the first took, and whether DCMTK echoscu gets
through too. (2) An allowed peer declares a 64 MiB and a 256 MiB P-DATA-TF after
association (128 KiB negotiated) and streams it: how much it could send, whether the node
aborted, and how far the node's peak memory (VmHWM) rose. On the commit before the
accept-time checks the same script printed 28.05 s, and +254 / +821 MiB.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from hostile_pdus import associated, read_until_closed  # noqa: E402
from support.net import echo  # noqa: E402
from support.node import NodeProcess, base_config, deep_merge  # noqa: E402


def peak_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM")


def idle_connections(port: int) -> None:
    idle = [
        socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
        for _ in range(64)
    ]
    start, tries, first_ok = time.monotonic(), 0, None
    while time.monotonic() - start < 60:
        tries += 1
        if echo(port) == 0:
            first_ok = time.monotonic() - start
            break
    dcmtk = subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", "DDN_NODE", "127.0.0.1", str(port)],
        capture_output=True,
        timeout=60,
    )
    closed = sum(read_until_closed(s, 0.5).closed_by_peer for s in idle)
    for s in idle:
        s.close()
    took = "never" if first_ok is None else f"{first_ok:.2f} s"
    print(
        f"64 idle connections from 127.0.0.2: first C-ECHO from 127.0.0.1 after {took} "
        f"({tries} tries); echoscu exit {dcmtk.returncode}; {closed}/64 closed by the node"
    )


def oversized_pdu(node: NodeProcess, mib: int) -> None:
    assert node.proc is not None
    before = peak_mib(node.proc.pid)
    sock = associated(node.port, patience=60)
    declared, sent = mib << 20, 0
    chunk = b"\0" * (1 << 20)
    try:
        # P-DATA-TF header, then one PDV item header, then the body a MiB at a time.
        sock.sendall(
            struct.pack(">BBI", 0x04, 0, declared) + struct.pack(">IBB", declared - 4, 1, 0)
        )
        while sent < mib:
            sock.sendall(chunk if sent < mib - 1 else chunk[:-6])
            sent += 1
    except OSError:
        pass  # the node closed the connection: the point
    answer = read_until_closed(sock, 30)
    sock.close()
    after = peak_mib(node.proc.pid)
    print(
        f"P-DATA-TF declaring {mib} MiB: the client sent {sent} MiB; node answered "
        f"{answer.pdu_types} and closed={answer.closed_by_peer}; VmHWM {before} -> {after} MiB "
        f"(+{after - before})"
    )


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="ddn-abuse-"))
    config = deep_merge(
        base_config(home, f"sqlite:///{home / 'db.sqlite'}"), {"node": {"acse_timeout_s": 30}}
    )
    with NodeProcess(home, config, ("scp",)) as node:
        assert echo(node.port) == 0
        idle_connections(node.port)
        for mib in (64, 256):
            oversized_pdu(node, mib)


if __name__ == "__main__":
    main()
