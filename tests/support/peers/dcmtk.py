"""DCMTK command-line peers (storescp, storescu, echoscu), plain or over TLS.

- :class:`DcmtkStoreSCP`: ``storescp`` storing into a folder; each stored file is announced
  by ``--exec-on-reception`` (run by storescp after the file is written and closed), so
  :meth:`DcmtkStoreSCP.stored` only ever lists complete files.
- :func:`storescu_send`: one association, one C-STORE per file, per-file DIMSE status read
  from ``storescu --debug`` ("DIMSE Status : 0xa700: ..."); files whose SOP class had its
  presentation context refused come back with ``context_refused``.
  ``storescu`` is always run with ``-R`` (propose only the files' own SOP classes): without
  it DCMTK proposes its built-in list of 128 contexts, in which Comprehensive 3D SR and
  Parametric Map do not fit, and reports "No presentation context" although the SCP would
  accept them.
- :func:`echoscu_echo`: a C-ECHO, True when it succeeded.

With ``tls=`` (a :class:`support.peers.tls.TlsIdentity`) the same calls use DICOM TLS; see
:mod:`support.peers.tls` for the flags.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from support.peers._proc import SEND_TIMEOUT_S, Receiver, StoreResult, run_to_end, tool
from support.peers.tls import TlsIdentity

STORESCP = tool("storescp")
STORESCU = tool("storescu")
ECHOSCU = tool("echoscu")

_STORED_MARK = "DDN-PEER-STORED "


def dcmtk_available() -> bool:
    return bool(STORESCP and STORESCU and ECHOSCU)


@dataclass
class DcmtkStoreSCP(Receiver):
    """``storescp`` as a receiver (plain TCP or TLS).

    ``tls``: our identity (server key/cert + trusted CAs). ``peer_cert``: require (default:
    a client certificate signed by a trusted CA is mandatory) | verify | ignore.
    ``accept_all``: ``+xa`` accept every transfer syntax storescp knows (default: its
    uncompressed preference list).
    """

    aet: str = "STORESCP"
    tls: TlsIdentity | None = None
    peer_cert: str = "require"
    accept_all: bool = True
    extra_args: list[str] = field(default_factory=list)

    name = "storescp"

    def command(self) -> list[str]:
        assert STORESCP, "storescp (DCMTK) not installed"
        argv = [STORESCP, "-v", "--aetitle", self.aet, "-od", str(self.store_dir)]
        if self.accept_all:
            argv.append("+xa")
        # storescp runs this with /bin/sh after the file is saved: our completion signal.
        argv += ["-xcr", f"echo {_STORED_MARK}#p/#f"]
        if self.tls is not None:
            argv += self.tls.dcmtk_args(self.peer_cert)
        return [*argv, *self.extra_args, str(self.port)]

    def stored(self) -> list[Path]:
        """Files storescp finished writing (announced by --exec-on-reception)."""
        if self.process is None:
            return []
        return [
            Path(line.split(_STORED_MARK, 1)[1])
            for line in self.process.lines
            if _STORED_MARK in line
        ]

    def received_files(self) -> list[Path]:
        return sorted(set(self.stored()))

    def handshake_failures(self) -> list[str]:
        """storescp log lines that report a refused TLS handshake / association."""
        if self.process is None:
            return []
        pattern = re.compile(r"TLS|certificate|handshake|Association Request Failed", re.IGNORECASE)
        return [
            line
            for line in self.process.lines
            if pattern.search(line) and not line.startswith("$ ")
        ]


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    detail: str
    output: str


def _tls_args(tls: TlsIdentity | None, peer_cert: str) -> list[str]:
    return [] if tls is None else tls.dcmtk_args(peer_cert)


def echoscu_echo(
    port: int,
    *,
    host: str = "127.0.0.1",
    called: str = "ANY-SCP",
    calling: str = "ECHOSCU",
    tls: TlsIdentity | None = None,
    peer_cert: str = "require",
    log_path: Path,
    timeout: float = SEND_TIMEOUT_S,
) -> EchoResult:
    """One C-ECHO with ``echoscu``; ok when the response status was Success."""
    assert ECHOSCU, "echoscu (DCMTK) not installed"
    argv = [ECHOSCU, "-v", "-aet", calling, "-aec", called, "-to", "60", "-ta", "60", "-td", "60"]
    argv += _tls_args(tls, peer_cert)
    rc, lines = run_to_end([*argv, host, str(port)], log_path, timeout=timeout)
    ok = rc == 0 and any("Received Echo Response (Success)" in line for line in lines)
    problems = [line for line in lines if line.startswith(("E:", "F:"))]
    return EchoResult(ok=ok, detail="; ".join(problems), output="\n".join(lines))


_SENDING = re.compile(r"^I: Sending file: (?P<path>.+)$")
_STATUS = re.compile(r"^D: DIMSE Status\s*:\s*0x(?P<hex>[0-9a-fA-F]{4})(?::\s*(?P<text>.*))?$")
_NO_CONTEXT = re.compile(r"^E: No presentation context for: (?P<what>.+)$")


def parse_storescu(files: Sequence[Path], lines: Sequence[str]) -> list[StoreResult]:
    """Per-file results from ``storescu -d`` output (files in the order given)."""
    by_path: dict[str, dict[str, object]] = {}
    current: dict[str, object] | None = None
    for line in lines:
        if m := _SENDING.match(line):
            current = by_path.setdefault(m["path"], {})
            continue
        if current is None:
            continue
        if (m := _STATUS.match(line)) and not current.get("context_refused"):
            current["status"] = int(m["hex"], 16)
            current["detail"] = (m["text"] or "").strip()
        elif m := _NO_CONTEXT.match(line):
            current["context_refused"] = True
            current["detail"] = f"no presentation context for {m['what']}"
        elif line.startswith("E: Store SCU Failed") and "detail" not in current:
            current["detail"] = line[3:]
    fatal = "; ".join(line[3:] for line in lines if line.startswith("F:"))
    results: list[StoreResult] = []
    for path in files:
        info = by_path.get(str(path))
        if info is None:
            results.append(StoreResult(file=path, ok=False, detail=fatal or "not sent"))
            continue
        status = info.get("status")
        assert status is None or isinstance(status, int)
        ok = status is not None and (status == 0 or (status & 0xF000) == 0xB000)
        results.append(
            StoreResult(
                file=path,
                ok=ok,
                status=status,
                context_refused=bool(info.get("context_refused")),
                detail=str(info.get("detail", ""))
                or ("" if status is not None else fatal or "no response"),
            )
        )
    return results


@dataclass(frozen=True)
class StorescuRun:
    results: list[StoreResult]
    association_rejected: bool
    output: str


def storescu_send(
    port: int,
    files: Sequence[Path],
    *,
    host: str = "127.0.0.1",
    called: str = "ANY-SCP",
    calling: str = "STORESCU",
    tls: TlsIdentity | None = None,
    peer_cert: str = "require",
    log_path: Path,
    timeout: float = SEND_TIMEOUT_S,
    extra_args: Sequence[str] = (),
) -> StorescuRun:
    """C-STORE ``files`` on one association with ``storescu``; per-file results."""
    assert STORESCU, "storescu (DCMTK) not installed"
    paths = [Path(f).resolve() for f in files]
    argv = [
        STORESCU,
        "-d",
        "-R",
        "-nh",
        "-aet",
        calling,
        "-aec",
        called,
        "-to",
        "60",
        "-ta",
        "60",
        "-td",
        "60",
    ]
    argv += _tls_args(tls, peer_cert)
    argv += list(extra_args)
    _rc, lines = run_to_end([*argv, host, str(port), *map(str, paths)], log_path, timeout=timeout)
    rejected = any(line.startswith("F: Association Rejected") for line in lines)
    return StorescuRun(
        results=parse_storescu(paths, lines), association_rejected=rejected, output="\n".join(lines)
    )
