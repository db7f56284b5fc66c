"""CTN ``simple_storage`` (RSNA Central Test Node 3.2, Debian ``ctn``) as a *legacy archive*.

Why it is useful: its Storage SCP accepts only the SOP classes compiled into it (CTN's
SRV table, frozen around 2003-2005). It takes Secondary Capture (1.2.840.10008.5.1.4.1.1.7),
Basic Text / Enhanced / Comprehensive SR (...88.11 / .22 / .33), Key Object Selection
(...88.59), CR, DX, CT, MR... and refuses at the presentation-context level everything
newer, among them Comprehensive 3D SR (...88.34) and Parametric Map (...1.30). Nothing
configures that list: ``ctn_cfg.txt`` (``-C``) only sets the accepted transfer syntaxes
(``ACCEPT/XFER/STORAGE``) and the storage format (``STORAGE/PART10FLAG``).

What it answers for a refused SOP class: the A-ASSOCIATE-AC carries result **1
(user-rejection)** for that presentation context - not 3 (abstract-syntax-not-supported,
what DCMTK, dcmjs-dimse and pynetdicom answer) - and the association is accepted for the
other contexts. Seen by storescu as "No presentation context for: (SR3) ...88.34" and by
pynetdicom as ``rejected_contexts[i].result == 1`` ("User Rejected").

Storage: ``-x DIR`` puts classes it has a directory name for under DIR/<SC|CR|DX|CT|MR...>/
<SOPInstanceUID>; classes without one (all SR classes) are written to the *current
directory* as <SOPInstanceUID> after the message "could not map SOP Class to a directory
name" - so the harness runs it with cwd = the store folder. Files are written before the
C-STORE response is sent, so once a sender has its Success response the file is complete.
With our config (``STORAGE/PART10FLAG 1``) every file is DICOM Part 10 (the default, 0,
writes the headerless CTN format for implicit VR little endian).

Two traps, both handled here:
- a TCP connection that closes without an A-ASSOCIATE-RQ makes simple_storage *exit*
  (status 0, silently), so readiness is read from /proc/net/tcp, never by a connect probe;
- it checks the called AE title against ``-c`` and rejects others (permanent, service user,
  called AE title not recognised), so senders must call :attr:`CtnStoreSCP.aet`.
It serves one association at a time (no ``-f``); its main loop has a trip limit (2048 in
the CTN source), far above what a test needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from support.peers._proc import Receiver, tool

SIMPLE_STORAGE = tool("simple_storage", "/usr/bin/simple_storage")
STDBUF = tool("stdbuf")
DEFAULT_CTN_CONFIG = Path("/etc/ctn/runtime/ctn_cfg.txt")

_CONFIG = """\
# written by tests/support/peers/ctn.py
PROPOSE/XFER/STORAGE 1.2.840.10008.1.2.1;1.2.840.10008.1.2
PROPOSE/SINGLE_PRESENTATION 1
ACCEPT/XFER/STORAGE {accept_ts}
STORAGE/PART10FLAG 1
CFIND/SORT/IMANUM 1
CMOVE/SORT/IMANUM 1
"""

#: SOP classes this build refuses (checked by the harness test) and some it accepts.
REFUSED_BY_CTN = ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.30")
ACCEPTED_BY_CTN = (
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.88.11",
    "1.2.840.10008.5.1.4.1.1.88.33",
)


def ctn_available() -> bool:
    return SIMPLE_STORAGE is not None


@dataclass
class CtnStoreSCP(Receiver):
    aet: str = "CTN_ARCHIVE"
    #: transfer syntaxes it accepts, in its order of preference.
    accept_transfer_syntaxes: tuple[str, ...] = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")

    name = "ctn-simple-storage"

    @property
    def config_path(self) -> Path:
        return self.folder / "ctn_cfg.txt"

    def prepare(self) -> None:
        self.config_path.write_text(
            _CONFIG.format(accept_ts=";".join(self.accept_transfer_syntaxes))
        )

    def command(self) -> list[str]:
        assert SIMPLE_STORAGE, "simple_storage (CTN) not installed"
        # -s: do not dump every received object; -C: our config; -x .: base directory for
        # mapped classes = cwd = store_dir, where unmapped classes land too.
        argv = [
            SIMPLE_STORAGE,
            "-s",
            "-C",
            str(self.config_path),
            "-x",
            ".",
            "-c",
            self.aet,
            str(self.port),
        ]
        # CTN prints with stdio: into a pipe that is block-buffered, so its lines would only
        # show up at exit. stdbuf (coreutils) makes them line-buffered; it execs in place,
        # so the pid is still simple_storage's.
        return [STDBUF, "-oL", "-eL", *argv] if STDBUF else argv

    def cwd(self) -> Path:
        return self.store_dir

    def received_files(self) -> list[Path]:
        """Files stored so far (complete once the sender got its C-STORE response)."""
        return sorted(p for p in self.store_dir.rglob("*") if p.is_file())

    def refused_sop_classes(self) -> list[str]:
        """SOP classes it logged as refused ("Simple server rejects SOP Class with UID")."""
        if self.process is None:
            return []
        marker = "Simple server rejects SOP Class with UID: "
        return sorted(
            {line.split(marker, 1)[1].strip() for line in self.process.lines if marker in line}
        )
