"""PixelMed (Java, Debian ``libpixelmed-java``) as a DICOM peer: no code shared with
pynetdicom or DCMTK.

- :class:`PixelMedStoreSCP`: ``com.pixelmed.network.StorageSOPClassSCPDispatcher PORT AET
  FOLDER`` - stores each instance flat as FOLDER/<SOPInstanceUID> (no extension) and logs
  ``DefaultReceivedObjectHandler.sendReceivedObjectIndication() fileName: F from AET in TS``
  once the file is complete; :meth:`PixelMedStoreSCP.received_files` lists only those.
  It accepts every storage SOP class it knows (the 2022 jar includes Comprehensive 3D SR
  and Parametric Map) with uncompressed transfer syntaxes.
- :func:`pixelmed_send`: ``com.pixelmed.network.StorageSOPClassSCU HOST PORT CALLED CALLING
  - 0`` with the file list on stdin: one association for all files. Per-file verdicts are
  read from its own log (java.util.logging via slf4j-jdk14, configured here at FINEST for
  that class): ``Send FILE succeeded|failed between ...``. PixelMed treats 0x0000 and the
  warnings 0xB000 / 0xB006 / 0xB007 as success and does not expose the status code, so
  ``StoreResult.status`` is None; ``context_refused`` is set when it said "No presentation
  context for Abstract Syntax". A file it cannot read aborts the whole run before any
  association (PixelMed builds all presentation contexts first), so unreadable files are
  screened out beforehand and reported as not sent.

Argument forms (from the jar's ``main``, Debian 20220618):
``StorageSOPClassSCU host port calledAET callingAET file|- [compressionLevel]`` or
``... file sopClass sopInstance [compressionLevel]``; ``-`` reads file names from stdin.
``StorageSOPClassSCPDispatcher port calledAET folder [SECURE [ANY]]`` (with no arguments
it reads ~/.com.pixelmed.network.StorageSOPClassSCPDispatcher.properties and stores into
./tmp on port 11112 - never do that in tests).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from support.peers._proc import SEND_TIMEOUT_S, Receiver, StoreResult, run_to_end, tool

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
JAVA = tool("java")

_JUL_CONFIG = """\
handlers=java.util.logging.ConsoleHandler
.level=WARNING
com.pixelmed.network.level=INFO
com.pixelmed.network.StorageSOPClassSCU.level=FINEST
com.pixelmed.network.StorageSOPClassSCPDispatcher.level=INFO
java.util.logging.ConsoleHandler.level=FINEST
java.util.logging.SimpleFormatter.format=PIXELMED %4$s %5$s%6$s%n
"""

_RECEIVED = re.compile(
    r"sendReceivedObjectIndication\(\) fileName: (?P<path>.+?) from (?P<aet>\S*) in (?P<ts>\S+)\s*$"
)
_SEND = re.compile(r"^PIXELMED \S+ Send (?P<path>.+) (?P<verdict>succeeded|failed) between ")
_SENDING = re.compile(r"^PIXELMED \S+ Sending (?P<path>.+)$")
_NO_CONTEXT = re.compile(r"No presentation context for Abstract Syntax (?P<uid>[0-9.]+)")


def pixelmed_available() -> bool:
    return JAVA is not None and PIXELMED_JAR.is_file()


def _java(folder: Path) -> list[str]:
    assert JAVA, "java not installed"
    config = folder / "pixelmed-logging.properties"
    folder.mkdir(parents=True, exist_ok=True)
    config.write_text(_JUL_CONFIG)
    return [
        JAVA,
        "-Xshare:auto",
        "-XX:TieredStopAtLevel=1",  # start faster; these runs are short
        f"-Djava.util.logging.config.file={config}",
        "-Djava.awt.headless=true",
        "-cp",
        str(PIXELMED_JAR),
    ]


@dataclass
class PixelMedStoreSCP(Receiver):
    aet: str = "PIXELMED"

    name = "pixelmed-scp"

    def command(self) -> list[str]:
        return [
            *_java(self.folder),
            "com.pixelmed.network.StorageSOPClassSCPDispatcher",
            str(self.port),
            self.aet,
            str(self.store_dir),
        ]

    def received_files(self) -> list[Path]:
        """Files PixelMed announced as received (complete)."""
        if self.process is None:
            return []
        found: list[Path] = []
        for line in self.process.lines:
            if m := _RECEIVED.search(line):
                path = Path(m["path"])
                found.append(path if path.is_absolute() else self.store_dir / path.name)
        return sorted(set(found))

    def received_calling_aets(self) -> list[str]:
        if self.process is None:
            return []
        return [m["aet"] for line in self.process.lines if (m := _RECEIVED.search(line))]


@dataclass(frozen=True)
class PixelMedRun:
    results: list[StoreResult]
    output: str


def pixelmed_send(
    port: int,
    files: Sequence[Path],
    *,
    host: str = "127.0.0.1",
    called: str = "ANY-SCP",
    calling: str = "PIXELMED_SCU",
    log_path: Path,
    timeout: float = SEND_TIMEOUT_S,
) -> PixelMedRun:
    """Send ``files`` on one association with PixelMed's StorageSOPClassSCU."""
    import pydicom

    paths = [Path(f).resolve() for f in files]
    sendable: list[Path] = []
    unreadable: dict[Path, str] = {}
    for path in paths:
        try:
            pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
            )
            sendable.append(path)
        except Exception as exc:  # noqa: BLE001 - anything unreadable is reported per file
            unreadable[path] = f"not sent: unreadable ({exc.__class__.__name__})"
    lines: list[str] = []
    if sendable:
        argv = [
            *_java(log_path.parent),
            "com.pixelmed.network.StorageSOPClassSCU",
            host,
            str(port),
            called,
            calling,
            "-",
            "0",  # compression level 0: propose what the files are in, plus uncompressed
        ]
        stdin = "".join(f"{p}\n" for p in sendable).encode()
        _rc, lines = run_to_end(argv, log_path, timeout=timeout, stdin_data=stdin)

    verdicts: dict[str, str] = {}
    refused: dict[str, str] = {}
    current: str | None = None
    for line in lines:
        if m := _SENDING.match(line):
            current = m["path"]
        elif m := _NO_CONTEXT.search(line):
            if current is not None:
                refused[current] = m["uid"]
        elif m := _SEND.match(line):
            verdicts[m["path"]] = m["verdict"]
    failure = next((line for line in lines if "Exception" in line), "")

    results: list[StoreResult] = []
    for path in paths:
        key = str(path)
        if path in unreadable:
            results.append(StoreResult(file=path, ok=False, detail=unreadable[path]))
        elif key in refused:
            results.append(
                StoreResult(
                    file=path,
                    ok=False,
                    context_refused=True,
                    detail=f"no presentation context for {refused[key]}",
                )
            )
        elif key in verdicts:
            ok = verdicts[key] == "succeeded"
            results.append(StoreResult(file=path, ok=ok, detail=verdicts[key]))
        else:
            results.append(StoreResult(file=path, ok=False, detail=failure or "not sent"))
    return PixelMedRun(results=results, output="\n".join(lines))
