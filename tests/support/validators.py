"""Typed wrappers around the external DICOM validators the result tests rely on.

Each wrapper runs one tool on files, parses what it prints into structured messages and
returns a :class:`Report` (errors, warnings, anything else it said, the raw output).
A tool that *ran* but gave no verdict (a Java exception, "Abort -", an unreadable
dataset, a timeout) raises :class:`ValidatorCrashed` rather than passing as "no errors";
a file that does not exist raises ``FileNotFoundError`` before anything runs.

=====================  =======================  =========================================
function               tool (package)           what it checks
=====================  =======================  =========================================
:func:`dciodvfy`       dciodvfy (dicom3tools)   one file against its IOD (modules, types,
                                                VRs, enumerated values)
:func:`dcentvfy`       dcentvfy (dicom3tools)   a *set* of files: patient / study / series
                                                attributes agree for the same entity
:func:`pixelmed_sr`    DicomSRValidator         an SR against its IOD and its root template
                       (PixelMed, Java)         (TID 1500 ...) and context groups
:func:`dsr2html`       dsr2html (DCMTK)         renders an SR as HTML (fails on exit != 0)
:func:`dsrdump`        dsrdump (DCMTK)          renders an SR as text (fails on exit != 0)
=====================  =======================  =========================================

Skipping: :func:`available` says whether a tool is installed, :func:`require` calls
``pytest.skip`` with a clear reason when it is not, and :func:`skip_unless` is the same as
a ``pytest.mark.skipif`` marker::

    from support import validators as V

    @V.skip_unless("dciodvfy", "pixelmed")
    def test_sr_validates(tmp_path):
        report = V.pixelmed_sr(path)
        assert report.ok, report.summary()

Notes on the tools (found while writing these wrappers):

- dciodvfy and dcentvfy write everything to *stderr*; both exit 1 on errors *and* on
  "Abort -" (unreadable file), 0 otherwise, so the exit status alone cannot tell a bad
  object from a failed run.
- ``/usr/bin/DicomSRValidator`` (Debian's pixelmed-apps) fails on Java 17 and later with
  ``TransformerConfigurationException: JAXP0801003 ... '10,000' limit`` (its compiled
  XSLT exceeds the JDK's default XPath operator limits) - and still exits 0, printing no
  verdict. :func:`pixelmed_sr` therefore calls ``java`` itself with the three
  ``jdk.xml.xpath*Limit`` properties set to 0 (no limit). PixelMed always exits 0; a
  verdict is recognised by its closing "IOD validation complete" line.
- A PixelMed run costs 10-80 s on a shared 2-core machine (the XSLT is compiled on every
  start); run it on few files, and mark such tests ``slow``.
- PixelMed 20220618 chooses TID 1410 / 1411 / 1501 for the whole Imaging Measurements
  container, not per group: TID 1410 only when the container holds exactly one "Image
  Region" SCOORD in all. A report with two or more planar ROI groups is checked against
  TID 1501, which lacks TID 1410-only rows such as "Geometric purpose of region".
- dcentvfy warns "Different information entities for attribute - Element=<AccessionNumber>
  IE <Study> versus <Series>" between an SR or PM and an SC or DX: dicom3tools files
  Accession Number under the series for some IODs. The values agree; see
  :func:`accession_number_ie_quirk`.
- Messages may quote attribute values (dcentvfy prints both differing values): fine for
  synthetic test data, but do not log reports of real patient files.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

__all__ = [
    "TOOLS",
    "EntityMessage",
    "IODMessage",
    "Report",
    "SRMessage",
    "Severity",
    "ToolNotInstalled",
    "ValidatorCrashed",
    "accession_number_ie_quirk",
    "available",
    "dcentvfy",
    "dciodvfy",
    "dsr2html",
    "dsrdump",
    "missing",
    "parse_dcentvfy",
    "parse_dciodvfy",
    "parse_pixelmed",
    "pixelmed_jar",
    "pixelmed_sr",
    "require",
    "skip_unless",
    "vr_error_tags",
]

PathLike = str | os.PathLike[str]


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


class ToolNotInstalled(RuntimeError):
    """The validator is not installed (see :func:`available` / :func:`require`)."""


class ValidatorCrashed(RuntimeError):
    """The validator ran but produced no verdict (exception, abort, timeout, bad exit)."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message if not output else f"{message}\n--- output ---\n{output[-4000:]}")
        self.output = output


# --- Messages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class IODMessage:
    """One ``Error -`` / ``Warning -`` line of dciodvfy."""

    severity: Severity
    text: str  # the line without the "Error - " / "Warning - " prefix
    iod: str | None = None  # the IOD heading dciodvfy printed before it, e.g. "Comprehensive3DSR"
    tag: tuple[int, int] | None = None  # (group, element) when the line names one
    element: str | None = None  # "Element=<Keyword>"
    module: str | None = None  # "Module=<Name>"

    def __str__(self) -> str:
        return f"{self.severity.value}: {self.text}"


@dataclass(frozen=True)
class EntityMessage:
    """One ``Error -`` / ``Warning -`` line of dcentvfy (an inconsistency between files)."""

    severity: Severity
    text: str
    element: str | None = None  # attribute keyword, e.g. "PatientName"
    entity: str | None = None  # information entity, e.g. "Patient", "Study"
    files: tuple[str, ...] = ()  # the two files compared
    values: tuple[str, ...] = ()  # the two differing values, when printed

    def __str__(self) -> str:
        return f"{self.severity.value}: {self.text}"


@dataclass(frozen=True)
class SRMessage:
    """One message of PixelMed's DicomSRValidator, with the offending content item.

    ``location`` is the content item's position in the tree ("1.9.1.6": 6th child of the
    1st child of the 9th child of the root), ``item_path`` its concept path
    (``/CONTAINER (126000,DCM,"Imaging Measurement Report")/CODE (...)``) and ``template``
    the template row it was checked against, when the validator names one.
    """

    severity: Severity
    text: str  # the message proper, e.g. "Content Item not in template"
    location: str | None = None
    item_path: str | None = None
    template: str | None = None
    line: str = ""  # the whole line as printed

    @property
    def item(self) -> str | None:
        """The last segment of :attr:`item_path`, e.g. ``CODE (260870009,SCT,"Priority")``."""
        if not self.item_path:
            return None
        segments = _SR_SEGMENT.findall(self.item_path)
        return segments[-1].lstrip("/") if segments else self.item_path

    def __str__(self) -> str:
        where = f" at {self.location} {self.item_path}" if self.location else ""
        return f"{self.severity.value}{where}: {self.text}"


M = TypeVar("M", IODMessage, EntityMessage, SRMessage)


@dataclass(frozen=True)
class Report(Generic[M]):
    """What one validator run said."""

    tool: str
    files: tuple[str, ...]
    errors: tuple[M, ...]
    warnings: tuple[M, ...]
    other: tuple[str, ...] = ()  # lines that are neither (headings, progress, unknown)
    output: str = ""  # everything the tool printed (stdout then stderr)
    returncode: int = 0
    command: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def of_run(
        cls,
        tool: str,
        files: tuple[str, ...],
        parsed: tuple[tuple[M, ...], tuple[M, ...], tuple[str, ...]],
        text: str,
        proc: subprocess.CompletedProcess[bytes],
        command: tuple[str, ...],
    ) -> Report[M]:
        """The report of one run: its parsed (errors, warnings, other lines) and output."""
        errors, warnings, other = parsed
        return cls(tool, files, errors, warnings, other, text, proc.returncode, command)

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not self.errors

    @property
    def clean(self) -> bool:
        """No errors and no warnings."""
        return not self.errors and not self.warnings

    @property
    def messages(self) -> tuple[M, ...]:
        return (*self.errors, *self.warnings)

    def without(self, predicate: Callable[[M], bool]) -> Report[M]:
        """The same report minus the messages ``predicate`` accepts (known, tolerated ones)."""
        return dataclasses.replace(
            self,
            errors=tuple(m for m in self.errors if not predicate(m)),
            warnings=tuple(m for m in self.warnings if not predicate(m)),
        )

    def summary(self, limit: int = 40) -> str:
        """A readable block for assertion messages."""
        head = (
            f"{self.tool} on {', '.join(Path(f).name for f in self.files)}: "
            f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        )
        lines = [str(m) for m in self.messages]
        if len(lines) > limit:
            lines = [*lines[:limit], f"... {len(lines) - limit} more"]
        return "\n  ".join([head, *lines])

    def __str__(self) -> str:
        return self.summary()


# --- Availability -------------------------------------------------------------------------

TOOLS = ("dciodvfy", "dcentvfy", "pixelmed", "dsr2html", "dsrdump")

_JAR_CANDIDATES = ("/usr/share/java/pixelmed.jar",)


def pixelmed_jar() -> Path | None:
    """The PixelMed jar: ``$DDN_PIXELMED_JAR``, Debian's location, or None."""
    env = os.environ.get("DDN_PIXELMED_JAR")
    candidates = [env] if env else []
    candidates.extend(_JAR_CANDIDATES)
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    java_dir = Path("/usr/share/java")
    found = sorted(java_dir.glob("pixelmed*.jar")) if java_dir.is_dir() else []
    return found[-1] if found else None


def missing(tool: str) -> str | None:
    """Why ``tool`` (one of :data:`TOOLS`) cannot run here, or None when it can."""
    if tool not in TOOLS:
        raise ValueError(f"unknown validator {tool!r}; known: {', '.join(TOOLS)}")
    if tool == "pixelmed":
        if shutil.which("java") is None:
            return "java is not installed (needed by PixelMed's DicomSRValidator)"
        if pixelmed_jar() is None:
            return "pixelmed.jar not found (apt install pixelmed-apps, or set DDN_PIXELMED_JAR)"
        return None
    if shutil.which(tool) is None:
        package = "dicom3tools" if tool in ("dciodvfy", "dcentvfy") else "dcmtk"
        return f"{tool} ({package}) is not installed"
    return None


def available(*tools: str) -> bool:
    """Whether all ``tools`` are installed."""
    return all(missing(tool) is None for tool in tools)


def require(*tools: str) -> None:
    """``pytest.skip`` (with the reason) unless all ``tools`` are installed."""
    reasons = [r for r in (missing(tool) for tool in tools) if r]
    if reasons:
        import pytest

        pytest.skip("; ".join(reasons))


def skip_unless(*tools: str) -> Any:
    """A ``pytest.mark.skipif`` marker for tests that need ``tools``."""
    import pytest

    reasons = [r for r in (missing(tool) for tool in tools) if r]
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "validators present")


def _need(tool: str) -> None:
    reason = missing(tool)
    if reason:
        raise ToolNotInstalled(reason)


def _run(command: Sequence[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(list(command), capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        raise ValidatorCrashed(
            f"{command[0]} timed out after {timeout:g} s", out.decode("utf-8", "replace")
        ) from None


def _text(proc: subprocess.CompletedProcess[bytes]) -> str:
    # dicom3tools print attribute values as the file's own bytes: UTF-8 when they are,
    # else latin-1 (which never fails).
    raw = proc.stdout + proc.stderr
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _existing(paths: Iterable[PathLike]) -> tuple[str, ...]:
    files = tuple(str(p) for p in paths)
    absent = [f for f in files if not Path(f).is_file()]
    if absent:
        raise FileNotFoundError(f"no such file(s): {absent}")
    return files


# --- dicom3tools --------------------------------------------------------------------------

_TAG = re.compile(r"\((0x[0-9a-fA-F]{4}),(0x[0-9a-fA-F]{4})\)")
_ELEMENT = re.compile(r"Element=<([^>]*)>")
_MODULE = re.compile(r"Module=<([^>]*)>")
_SEVERITY_DASH = re.compile(r"^(Error|Warning) - (.*)$")


def _dash_line(line: str) -> tuple[Severity, str] | None:
    match = _SEVERITY_DASH.match(line)
    if match is None:
        return None
    return (Severity.ERROR if match.group(1) == "Error" else Severity.WARNING), match.group(2)


def dciodvfy(
    path: PathLike, *, extra_args: Sequence[str] = (), timeout: float = 120
) -> Report[IODMessage]:
    """Run dciodvfy on one file.

    Raises:
        ToolNotInstalled: dciodvfy is absent.
        ValidatorCrashed: it aborted, could not read the file as DICOM, or timed out.
    """
    _need("dciodvfy")
    files = _existing([path])
    command = ("dciodvfy", *extra_args, files[0])
    proc = _run(command, timeout)
    text = _text(proc)
    return Report.of_run("dciodvfy", files, parse_dciodvfy(text, files[0]), text, proc, command)


def parse_dciodvfy(
    text: str, source: str = "the file"
) -> tuple[tuple[IODMessage, ...], tuple[IODMessage, ...], tuple[str, ...]]:
    """(errors, warnings, other lines) of dciodvfy output; raises :class:`ValidatorCrashed`
    on "Abort -" or an unreadable dataset."""
    errors: list[IODMessage] = []
    warnings: list[IODMessage] = []
    other: list[str] = []
    iod: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("Abort - ") or line == "Error - Dicom dataset read failed":
            raise ValidatorCrashed(f"dciodvfy could not read {source}", text)
        parsed = _dash_line(line)
        if parsed is None:
            other.append(line)
            if re.fullmatch(r"[A-Za-z0-9]+", line):
                iod = line  # the IOD heading, e.g. "Comprehensive3DSR"
            continue
        severity, body = parsed
        tag = _TAG.search(body)
        element = _ELEMENT.search(body)
        module = _MODULE.search(body)
        message = IODMessage(
            severity=severity,
            text=body,
            iod=iod,
            tag=(int(tag.group(1), 16), int(tag.group(2), 16)) if tag else None,
            element=element.group(1) if element else None,
            module=module.group(1) if module else None,
        )
        (errors if severity is Severity.ERROR else warnings).append(message)
    if iod is None and not errors:
        raise ValidatorCrashed(f"dciodvfy printed no IOD and no error for {source}", text)
    return tuple(errors), tuple(warnings), tuple(other)


def accession_number_ie_quirk(message: EntityMessage) -> bool:
    """dcentvfy's Accession Number IE warning (a dicom3tools modelling quirk, not a
    difference in values); for ``report.without(...)``."""
    return (
        message.severity is Severity.WARNING
        and message.element == "AccessionNumber"
        and message.text.startswith("Different information entities for attribute")
    )


def vr_error_tags(report: Report[IODMessage]) -> set[tuple[int, int]]:
    """Tags with a "Value invalid for this VR" error in a dciodvfy report.

    Run on a *source* file, it lists what the source already breaks; result objects copy
    some identifiers verbatim on purpose, so their tests drop those errors::

        inherited = V.vr_error_tags(V.dciodvfy(source_path))
        own = V.dciodvfy(result_path).without(
            lambda m: m.tag in inherited or m.text.startswith("Dicom dataset contains invalid")
        )
    """
    return {
        m.tag
        for m in report.errors
        if m.tag is not None and m.text.startswith("Value invalid for this VR")
    }


_ENTITY_IE = re.compile(r"\bIE=<([^>]*)>")
_ENTITY_IE_PAIR = re.compile(r"\bIE <([^>]*)> versus <([^>]*)>")
_ENTITY_FILES = re.compile(r"for file <([^>]*)> versus <([^>]*)>")
_ENTITY_VALUES = re.compile(r"Value \d+ <([^>]*)> versus <([^>]*)>")


def dcentvfy(paths: Iterable[PathLike], *, timeout: float = 120) -> Report[EntityMessage]:
    """Run dcentvfy over a set of files (for example source + SR + PM + SC).

    It reports attributes of the same patient / study / series that differ between files
    (errors), attributes filed under different entities by different IODs (warnings) and
    UIDs reused across parents.

    Raises:
        ToolNotInstalled: dcentvfy is absent.
        ValidatorCrashed: it aborted or timed out.
    """
    _need("dcentvfy")
    files = _existing(paths)
    if not files:
        raise ValueError("dcentvfy needs at least one file")
    command = ("dcentvfy", *files)
    proc = _run(command, timeout)
    text = _text(proc)
    return Report.of_run("dcentvfy", files, parse_dcentvfy(text), text, proc, command)


def parse_dcentvfy(
    text: str,
) -> tuple[tuple[EntityMessage, ...], tuple[EntityMessage, ...], tuple[str, ...]]:
    """(errors, warnings, other lines) of dcentvfy output; raises :class:`ValidatorCrashed`
    on "Abort -"."""
    errors: list[EntityMessage] = []
    warnings: list[EntityMessage] = []
    other: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("Abort - "):
            raise ValidatorCrashed("dcentvfy aborted", text)
        parsed = _dash_line(line)
        if parsed is None:
            other.append(line)
            continue
        severity, body = parsed
        element = _ELEMENT.search(body)
        entity = _ENTITY_IE.search(body)
        pair = _ENTITY_IE_PAIR.search(body)
        compared = _ENTITY_FILES.search(body)
        values = _ENTITY_VALUES.search(body)
        message = EntityMessage(
            severity=severity,
            text=body,
            element=element.group(1) if element else None,
            entity=(
                entity.group(1)
                if entity
                else (f"{pair.group(1)}/{pair.group(2)}" if pair else None)
            ),
            files=(compared.group(1), compared.group(2)) if compared else (),
            values=(values.group(1), values.group(2)) if values else (),
        )
        (errors if severity is Severity.ERROR else warnings).append(message)
    return tuple(errors), tuple(warnings), tuple(other)


# --- PixelMed DicomSRValidator ------------------------------------------------------------

# JDK 17+ limits XPath expressions to 10,000 operators; PixelMed's compiled XSLT needs more.
_JAXP_UNLIMITED = (
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)
_PIXELMED_OPTIONS = {
    "describe": "-describe",
    "donotmatchcase": "-donotmatchcase",
    "checkambiguoustemplate": "-checkambiguoustemplate",
    "checkcontentitemorder": "-checkcontentitemorder",
    "checktemplateid": "-checktemplateid",
}
_SR_SEGMENT = re.compile(r'/[A-Z0-9]+(?: \([^,()]*,[^,()]*,"[^"]*"\))?')
_SR_LINE = re.compile(
    r"^(?P<severity>Error|Warning): "
    r"(?:(?P<template>Template .+?): )?"
    r"(?P<location>\d+(?:\.\d+)*): "
    r'(?P<item>(?:/[A-Z0-9]+(?: \([^,()]*,[^,()]*,"[^"]*"\))?)+): '
    r"(?P<text>.*)$"
)
_SR_RELATIONSHIP = re.compile(r"^Parent content item \((?P<location>\d+(?:\.\d+)*):")
_SR_DONE = "IOD validation complete"


def pixelmed_sr(
    path: PathLike,
    *,
    check_content_item_order: bool = False,
    check_template_id: bool = False,
    check_ambiguous_template: bool = False,
    timeout: float = 300,
) -> Report[SRMessage]:
    """Run PixelMed's DicomSRValidator on one SR file.

    With the default options it checks the IOD, the root template found from the content
    (TID 1500 ...), the context groups of coded values (e.g. CID 100 for "Procedure
    reported") and lists content items that no template row accounts for ("Content Item
    not in template", a warning). The ``check_*`` flags turn on its stricter options
    (row order, Template Identifier, rows matched by more than one template).

    Raises:
        ToolNotInstalled: java or the jar is absent.
        ValidatorCrashed: a Java exception, a timeout, or output without a verdict.
    """
    _need("pixelmed")
    files = _existing([path])
    jar = pixelmed_jar()
    assert jar is not None
    flags = []
    if check_content_item_order:
        flags.append(_PIXELMED_OPTIONS["checkcontentitemorder"])
    if check_template_id:
        flags.append(_PIXELMED_OPTIONS["checktemplateid"])
    if check_ambiguous_template:
        flags.append(_PIXELMED_OPTIONS["checkambiguoustemplate"])
    command = (
        "java",
        *_JAXP_UNLIMITED,
        "-cp",
        str(jar),
        "com.pixelmed.validate.DicomSRValidator",
        *flags,
        files[0],
    )
    proc = _run(command, timeout)
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    return Report.of_run(
        "DicomSRValidator", files, parse_pixelmed(text, files[0]), text, proc, command
    )


def parse_pixelmed(
    text: str, source: str = "the file"
) -> tuple[tuple[SRMessage, ...], tuple[SRMessage, ...], tuple[str, ...]]:
    """(errors, warnings, other lines) of DicomSRValidator output; raises
    :class:`ValidatorCrashed` on a Java exception or output without a verdict."""
    if "Exception" in text and "\tat " in text:
        raise ValidatorCrashed(f"DicomSRValidator threw an exception on {source}", text)
    if _SR_DONE not in text:
        raise ValidatorCrashed(f"DicomSRValidator gave no verdict on {source}", text)
    errors: list[SRMessage] = []
    warnings: list[SRMessage] = []
    other: list[str] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line.strip():
            continue
        match = _SR_LINE.match(line)
        relationship = _SR_RELATIONSHIP.match(line)
        if match is not None:
            severity = Severity.ERROR if match.group("severity") == "Error" else Severity.WARNING
            message = SRMessage(
                severity=severity,
                text=match.group("text"),
                location=match.group("location"),
                item_path=match.group("item"),
                template=match.group("template"),
                line=line,
            )
        elif line.startswith(("Error: ", "Warning: ")):
            severity = Severity.ERROR if line.startswith("Error") else Severity.WARNING
            message = SRMessage(severity=severity, text=line.split(": ", 1)[1], line=line)
        elif relationship is not None:
            # "Parent content item (1.5.3.4: NUM) has illegal relationship ...": an error,
            # though printed without the "Error:" prefix.
            severity = Severity.ERROR
            message = SRMessage(
                severity=severity, text=line, location=relationship.group("location"), line=line
            )
        else:
            other.append(line)
            continue
        (errors if severity is Severity.ERROR else warnings).append(message)
    return tuple(errors), tuple(warnings), tuple(other)


# --- DCMTK --------------------------------------------------------------------------------


def _dcmtk_render(tool: str, path: PathLike, args: Sequence[str], timeout: float) -> str:
    _need(tool)
    files = _existing([path])
    command = (tool, *args, files[0])
    proc = _run(command, timeout)
    if proc.returncode != 0:
        raise ValidatorCrashed(
            f"{tool} exited with {proc.returncode} on {files[0]}",
            proc.stderr.decode("utf-8", "replace"),
        )
    out = proc.stdout
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        return out.decode("latin-1")


def dsr2html(path: PathLike, *, args: Sequence[str] = (), timeout: float = 60) -> str:
    """The SR rendered as HTML by DCMTK's dsr2html.

    Raises:
        ToolNotInstalled: dsr2html is absent.
        ValidatorCrashed: a non-zero exit status (DCMTK could not read or render it).
    """
    return _dcmtk_render("dsr2html", path, args, timeout)


def dsrdump(path: PathLike, *, args: Sequence[str] = ("-Ph",), timeout: float = 60) -> str:
    """The SR as text by DCMTK's dsrdump (``-Ph``: print the long code meanings).

    Raises:
        ToolNotInstalled: dsrdump is absent.
        ValidatorCrashed: a non-zero exit status.
    """
    return _dcmtk_render("dsrdump", path, args, timeout)
