"""dcmjs-dimse (Node.js) as a DICOM peer: no code shared with pynetdicom or DCMTK.

The scripts live in ``tests/support/peers/dcmjs/`` (``send.js``, ``receive.js``; the
package pinned exactly in package.json / package-lock.json); ``fetch-dcmjs.sh`` runs
``npm ci`` there. Both print one JSON object per line, which this module reads.

- :class:`DcmjsStoreSCP`: a Storage SCP storing OUT/<SOPInstanceUID>.dcm (written to a
  dot-file, then renamed: a ``.dcm`` that exists is complete), accepting the given SOP
  classes (``accept``, default all), refusing others at the presentation-context level
  (result 3, abstract-syntax-not-supported; ``reject_contexts`` forces it for classes it
  would otherwise take), answering a chosen failure status for some classes (``fail``:
  ``{sop_class_or_"*": 0xA700}``), rejecting associations (``reject_association``:
  "permanent" / "transient", or ``allow_calling``), optionally over TLS.
- :func:`dcmjs_send`: one association, optional C-ECHO, one C-STORE per file; per-file
  DIMSE status, or ``context_refused`` when the SCP refused the SOP class's context.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.peers._proc import (
    SEND_TIMEOUT_S,
    Receiver,
    StoreResult,
    WatchedProcess,
    run_to_end,
    tool,
)
from support.peers.tls import TlsIdentity

DCMJS_DIR = Path(__file__).resolve().parent / "dcmjs"
NODE = tool("node", "nodejs")


def dcmjs_available() -> bool:
    return (
        NODE is not None and (DCMJS_DIR / "node_modules" / "dcmjs-dimse" / "package.json").is_file()
    )


def dcmjs_missing_reason() -> str:
    if NODE is None:
        return "node (Node.js) not installed"
    return (
        f"dcmjs-dimse not installed: run tests/support/peers/fetch-dcmjs.sh (npm ci in {DCMJS_DIR})"
    )


def json_events(lines: Sequence[str]) -> list[dict[str, Any]]:
    """The JSON-object lines of a dcmjs script's output (anything else is log noise)."""
    events: list[dict[str, Any]] = []
    for line in lines:
        text = line.strip()
        if text.startswith("{") and text.endswith("}"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "event" in obj:
                events.append(obj)
    return events


@dataclass
class DcmjsStoreSCP(Receiver):
    aet: str = "DCMJS_SCP"
    accept: Sequence[str] = ("*",)
    reject_contexts: Sequence[str] = ()
    fail: Mapping[str, int] = field(default_factory=dict)
    allow_calling: Sequence[str] | None = None
    reject_association: str | None = None
    check_called: bool = False
    tls: TlsIdentity | None = None
    #: with TLS: require a client certificate signed by one of ``tls.trusted``.
    require_client_cert: bool = True
    #: Storage Commitment SCP: send each report to ``AET@HOST:PORT`` before answering the
    #: N-ACTION, listing instances of ``commit_fail`` classes as failed.
    commit_to: str | None = None
    commit_fail: Sequence[str] = ()

    name = "dcmjs-scp"

    def command(self) -> list[str]:
        assert NODE, dcmjs_missing_reason()
        argv = [
            NODE,
            str(DCMJS_DIR / "receive.js"),
            "--port",
            str(self.port),
            "--aet",
            self.aet,
            "--out",
            str(self.store_dir),
        ]
        argv += ["--accept", ",".join(self.accept)]
        if self.reject_contexts:
            argv += ["--reject-context", ",".join(self.reject_contexts)]
        for sop_class, status in self.fail.items():
            argv += ["--fail", f"{sop_class}=0x{status:04X}"]
        if self.allow_calling is not None:
            argv += ["--allow-calling", ",".join(self.allow_calling)]
        if self.reject_association:
            argv += ["--reject-association", self.reject_association]
        if self.check_called:
            argv.append("--check-called")
        if self.commit_to:
            argv += ["--commit-to", self.commit_to]
        if self.commit_fail:
            argv += ["--commit-fail", ",".join(self.commit_fail)]
        if self.tls is not None:
            argv += ["--tls-key", str(self.tls.key), "--tls-cert", str(self.tls.cert)]
            if self.require_client_cert:
                argv += ["--tls-ca", str(self.tls.trusted[0])]
        return argv

    def wait_ready(self, proc: WatchedProcess) -> None:
        proc.wait_until(
            lambda lines: any(e["event"] == "listening" for e in json_events(lines)),
            self.start_timeout,
            f"{self.name} listening on {self.port}",
        )

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if self.process is None:
            return []
        return [e for e in json_events(self.process.lines) if kind is None or e["event"] == kind]

    def received_files(self) -> list[Path]:
        return sorted({Path(e["path"]) for e in self.events("stored")})

    def refused(self) -> list[dict[str, Any]]:
        """C-STORE requests answered with a configured failure status."""
        return self.events("refused")


@dataclass(frozen=True)
class DcmjsRun:
    results: list[StoreResult]
    association: dict[str, Any] | None
    echo_status: int | None
    network_error: str | None
    events: list[dict[str, Any]]

    @property
    def association_accepted(self) -> bool:
        return bool(self.association and self.association.get("accepted"))


def dcmjs_send(
    port: int,
    files: Sequence[Path],
    *,
    host: str = "127.0.0.1",
    called: str = "ANY-SCP",
    calling: str = "DCMJS_SCU",
    echo: bool = False,
    tls: TlsIdentity | None = None,
    log_path: Path,
    timeout: float = SEND_TIMEOUT_S,
) -> DcmjsRun:
    """C-ECHO (optional) and C-STORE ``files`` on one association with dcmjs-dimse."""
    assert NODE, dcmjs_missing_reason()
    paths = [Path(f).resolve() for f in files]
    argv = [
        NODE,
        str(DCMJS_DIR / "send.js"),
        "--host",
        host,
        "--port",
        str(port),
        "--calling",
        calling,
        "--called",
        called,
    ]
    argv += ["--timeout-ms", str(int(timeout * 1000 * 0.9))]
    if echo:
        argv.append("--echo")
    if tls is not None:
        argv += [
            "--tls-key",
            str(tls.key),
            "--tls-cert",
            str(tls.cert),
            "--tls-ca",
            str(tls.trusted[0]),
        ]
    rc, lines = run_to_end([*argv, "--", *map(str, paths)], log_path, timeout=timeout)
    events = json_events(lines)
    if rc == 2:
        raise RuntimeError("send.js usage error:\n" + "\n".join(lines))
    association = next((e for e in events if e["event"] == "association"), None)
    echo_status = next((e.get("status") for e in events if e["event"] == "echo"), None)
    done = next((e for e in events if e["event"] == "done"), None)
    network_error = done.get("network_error") if done else "send.js ended without a result"
    stores = {e["file"]: e for e in events if e["event"] == "store"}
    results: list[StoreResult] = []
    for path in paths:
        e = stores.get(str(path))
        if e is None:
            results.append(StoreResult(file=path, ok=False, detail=network_error or "not sent"))
            continue
        status = e.get("status")
        ok = status is not None and (status == 0 or (status & 0xF000) == 0xB000)
        detail = (
            e.get("error") or e.get("error_comment") or e.get("context_result_description") or ""
        )
        results.append(
            StoreResult(
                file=path,
                ok=ok,
                status=status,
                context_refused=e.get("context") == "rejected",
                detail=str(detail),
            )
        )
    return DcmjsRun(
        results=results,
        association=association,
        echo_status=echo_status,
        network_error=network_error,
        events=events,
    )
