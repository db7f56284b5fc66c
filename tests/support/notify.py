"""Support for the adapter tests: a study summary, settings and local receivers.

The receivers are an MLLP listener (a RIS) and an HTTP endpoint. Both are real servers
on 127.0.0.1 in a thread, bound to port 0 (the kernel picks a free port while the socket
is already listening, so there is no window for another process to take it). Nothing
here sleeps on a guess: a receiver that must stay silent waits on an event that
``stop()`` sets.

Also here: a small HL7 v2 reader written independently of ddn_node's encoder (splitting on
the delimiters and undoing the chapter 2.7 escapes), so the tests do not check the encoder
with itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fhir.resources.R4B.task import Task
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import ValidationError
from hl7apy.parser import parse_message as hl7apy_parse
from pydantic import ValidationError as PydanticError

from ddn_node.config import AdaptersSettings
from ddn_node.notify import StudySummary

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"

# -- a study summary and settings -----------------------------------------------------------

HOSTILE_NAME = "O'Brien^Anna|x~y\\z&w"

BASE: dict[str, Any] = {
    "study_uid": "1.2.826.0.1.3680043.8.498.12345678901234567890",
    "accession_number": "ACC2026-0042",
    "patient_id": "PAT-00731",
    "patient_name": "Doe^Jane^Q^Dr^III",
    "patient_birth_date": "19700315",
    "patient_sex": "F",
    "study_date": "20260102",
    "study_time": "101500.123456",
    "modalities": "CR",
    "study_description": "CHEST PA",
    "priority": "STAT",
    "priority_reason": "critical finding: Pneumothorax 0.91 >= 0.50",
    "abnormality_score": 0.8712,
    "findings": [("Pneumothorax", 0.91, True), ("Effusion", 0.40, False), ("Nodule", 0.05, False)],
    "model_name": "DDN chest X-ray",
    "model_version": "2026.11.27-ddn-cxr-r1",
    "is_demo": False,
    "analysed_at": dt.datetime(2026, 1, 2, 10, 16, 0, tzinfo=dt.UTC),
}


SummaryFactory = Callable[..., StudySummary]


def adapters(**sections: dict[str, Any]) -> AdaptersSettings:
    """AdaptersSettings with the given sections, e.g. adapters(hl7={"enabled": True, ...})."""
    return AdaptersSettings.model_validate(sections)


# -- an HL7 v2 reader -----------------------------------------------------------------------

_ESC = re.compile(r"\\(F|S|T|R|E|X[0-9A-Fa-f]+)\\")
_NAMED = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}


def unescape(value: str) -> str:
    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        return _NAMED[code] if code in _NAMED else bytes.fromhex(code[1:]).decode("latin-1")

    return _ESC.sub(one, value)


@dataclass
class Segment:
    name: str
    fields: list[str]  # raw (escaped) fields; index n is field n (MSH-1 is "|")

    def raw(self, n: int) -> str:
        return self.fields[n] if n < len(self.fields) else ""

    def components(self, n: int) -> list[str]:
        return [unescape(c) for c in self.raw(n).split("^")]

    def value(self, n: int) -> str:
        """Field n unescaped, when it has a single component."""
        assert "^" not in self.raw(n), f"{self.name}-{n} has components: {self.raw(n)!r}"
        return unescape(self.raw(n))


def parse_message(payload: bytes) -> list[Segment]:
    text = payload.decode("utf-8")
    assert text.startswith("MSH|^~\\&|"), text[:20]
    assert text.endswith("\r") and "\n" not in text, "segments end with CR only"
    segments = []
    for line in text[:-1].split("\r"):
        parts = line.split("|")
        if parts[0] == "MSH":
            parts = ["MSH", "|", *parts[1:]]
        segments.append(Segment(parts[0], parts))
    return segments


def segments_named(segments: list[Segment], name: str) -> list[Segment]:
    return [s for s in segments if s.name == name]


def one_segment(segments: list[Segment], name: str) -> Segment:
    found = segments_named(segments, name)
    assert len(found) == 1, f"expected one {name}, got {len(found)}"
    return found[0]


def ack_for(message: bytes, code: str = "AA", text: str = "", err: str = "") -> bytes:
    """An HL7 v2.5.1 ACK for ``message`` (MSA-2 = its MSH-10)."""
    control_id = parse_message(message)[0].raw(10)
    segments = [
        "MSH|^~\\&|RIS|RAD|DDN_NODE|RAD|20260102101601||ACK^R01^ACK|ACK1|P|2.5.1",
        f"MSA|{code}|{control_id}|{text}".rstrip("|"),
    ]
    if err:
        segments.append(err)
    return ("\r".join(segments) + "\r").encode("utf-8")


# -- MLLP listener --------------------------------------------------------------------------

Responder = Callable[[bytes], "bytes | list[bytes] | None"]


@dataclass
class MLLPListener:
    """A RIS on 127.0.0.1: reads MLLP frames, answers with ``respond(message)``.

    ``respond`` returns the ACK (framed here), a list of raw byte chunks sent as they are
    (to test framing split over reads), or None to stay silent until ``stop()``.
    """

    respond: Responder
    received: list[bytes] = field(default_factory=list)
    bad_frames: list[bytes] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            worker = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(worker)
            worker.start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            buffer = b""
            while FS + CR not in buffer:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            if not buffer.startswith(VT) or not buffer.endswith(FS + CR):
                self.bad_frames.append(buffer)
                return
            message = buffer[1:-2]
            self.received.append(message)
            reply = self.respond(message)
            if reply is None:
                self._stop.wait(10)  # silent: hold the connection open until the test ends
                return
            if isinstance(reply, list):
                for piece in reply:
                    conn.sendall(piece)
            else:
                conn.sendall(VT + reply + FS + CR)

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
        self._accept.join(5)
        for worker in self._threads:
            worker.join(5)


# -- HTTP receiver --------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class HTTPReceiver:
    """An HTTP endpoint on 127.0.0.1 that records requests and answers ``status`` + ``body``.

    With ``hang`` set it never answers (until ``stop()``), for timeout tests.
    """

    status: int = 201
    body: bytes = b""
    content_type: str = "application/json"
    hang: bool = False
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                receiver.requests.append(
                    Request(
                        "POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body
                    )
                )
                if receiver.hang:
                    receiver._stop.wait(10)
                    return
                self.send_response(receiver.status)
                self.send_header("Content-Type", receiver.content_type)
                self.send_header("Content-Length", str(len(receiver.body)))
                self.end_headers()
                self.wfile.write(receiver.body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/fhir/Task"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


# -- FHIR R4 Task shape ---------------------------------------------------------------------
# From http://hl7.org/fhir/R4/task.html (elements, cardinalities, required bindings) and
# R4 datatypes.html / json.html; enough to catch a malformed Task without a FHIR server.

TASK_ELEMENTS = {
    # Resource / DomainResource
    "resourceType", "id", "meta", "implicitRules", "language", "text", "contained",
    "extension", "modifierExtension",
    # Task
    "identifier", "instantiatesCanonical", "instantiatesUri", "basedOn", "groupIdentifier",
    "partOf", "status", "statusReason", "businessStatus", "intent", "priority", "code",
    "description", "focus", "for", "encounter", "executionPeriod", "authoredOn",
    "lastModified", "requester", "performerType", "owner", "location", "reasonCode",
    "reasonReference", "insurance", "note", "relevantHistory", "restriction", "input", "output",
}  # fmt: skip
TASK_STATUS = {
    "draft", "requested", "received", "accepted", "rejected", "ready", "cancelled",
    "in-progress", "on-hold", "failed", "completed", "entered-in-error",
}  # fmt: skip
TASK_INTENT = {
    "unknown", "proposal", "plan", "order", "original-order", "reflex-order", "filler-order",
    "instance-order", "option",
}  # fmt: skip
REQUEST_PRIORITY = {"routine", "urgent", "asap", "stat"}
DATETIME = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]"
    r"|3[0-1])(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3])"
    r":[0-5][0-9]|14:00)))?)?)?"
)
REFERENCE_KEYS = {"reference", "type", "identifier", "display"}
IDENTIFIER_KEYS = {"use", "type", "system", "value", "period", "assigner"}
CONCEPT_KEYS = {"coding", "text"}
CODING_KEYS = {"system", "version", "code", "display", "userSelected"}
ANNOTATION_KEYS = {"authorReference", "authorString", "time", "text"}


def _empty_values(node: object, path: str = "Task") -> list[str]:
    """R4 json.html: no nulls, empty strings, empty objects or empty arrays anywhere."""
    if node is None or node == "" or node == [] or node == {}:
        return [f"{path} is empty"]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _empty_values(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _empty_values(v, f"{path}[{i}]")]
    return []


def _keys(obj: object, allowed: set[str], path: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{path} is not an object"]
    extra = set(obj) - allowed
    return [f"{path} has unknown keys {sorted(extra)}"] if extra else []


def _concept(obj: object, path: str) -> list[str]:
    problems = _keys(obj, CONCEPT_KEYS, path)
    if isinstance(obj, dict):
        for i, coding in enumerate(obj.get("coding", [])):
            problems += _keys(coding, CODING_KEYS, f"{path}.coding[{i}]")
    return problems


def _identifier(obj: object, path: str) -> list[str]:
    problems = _keys(obj, IDENTIFIER_KEYS, path)
    if isinstance(obj, dict) and "type" in obj:
        problems += _concept(obj["type"], f"{path}.type")
    return problems


def _reference(obj: object, path: str) -> list[str]:
    problems = _keys(obj, REFERENCE_KEYS, path)
    if isinstance(obj, dict) and "identifier" in obj:
        problems += _identifier(obj["identifier"], f"{path}.identifier")
    return problems


def task_problems(task: dict[str, Any]) -> list[str]:
    """Everything wrong with ``task`` as an R4 Task (an empty list for a valid one)."""
    problems = _empty_values(task)
    if task.get("resourceType") != "Task":
        problems.append("resourceType is not Task")
    problems += _keys(task, TASK_ELEMENTS, "Task")
    if task.get("status") not in TASK_STATUS:
        problems.append(f"status {task.get('status')!r} not in TaskStatus (1..1)")
    if task.get("intent") not in TASK_INTENT:
        problems.append(f"intent {task.get('intent')!r} not in TaskIntent (1..1)")
    if "priority" in task and task["priority"] not in REQUEST_PRIORITY:
        problems.append(f"priority {task['priority']!r} not in RequestPriority")
    for name in ("authoredOn", "lastModified"):
        if name in task and not DATETIME.fullmatch(str(task[name])):
            problems.append(f"{name} is not an R4 dateTime")
    # inv-1; both are written in the same UTC format here, so string order is time order.
    if "authoredOn" in task and str(task.get("lastModified", "~")) < str(task["authoredOn"]):
        problems.append("inv-1: lastModified before authoredOn")
    for name in ("code", "businessStatus", "statusReason", "performerType"):
        if name in task:
            problems += _concept(task[name], name)
    if "reasonCode" in task:  # 0..1 in R4
        problems += _concept(task["reasonCode"], "reasonCode")
    for name in ("focus", "for", "encounter", "requester", "owner", "location"):
        if name in task:
            problems += _reference(task[name], name)
    for name in ("identifier", "note", "input", "output", "basedOn", "partOf"):
        if name in task and not isinstance(task[name], list):
            problems.append(f"{name} must be an array (0..*)")
    for i, identifier in enumerate(task.get("identifier", [])):
        problems += _identifier(identifier, f"identifier[{i}]")
    for i, note in enumerate(task.get("note", [])):
        problems += _keys(note, ANNOTATION_KEYS, f"note[{i}]")
        if not isinstance(note, dict) or not isinstance(note.get("text"), str):
            problems.append(f"note[{i}].text is required (markdown)")
    for name in ("input", "output"):
        for i, entry in enumerate(task.get(name, [])):
            where = f"{name}[{i}]"
            if not isinstance(entry, dict) or "type" not in entry:
                problems.append(f"{where}.type is required (1..1)")
                continue
            problems += _concept(entry["type"], f"{where}.type")
            values = [k for k in entry if k.startswith("value")]
            if len(values) != 1:
                problems.append(f"{where} needs exactly one value[x], has {values}")
            if set(entry) - {"id", "extension", "type", *values}:
                problems.append(f"{where} has unknown keys")
            for key in values:
                if key == "valueDecimal" and not isinstance(entry[key], (int, float)):
                    problems.append(f"{where}.valueDecimal is not a JSON number")
                if key == "valueIdentifier":
                    problems += _identifier(entry[key], f"{where}.valueIdentifier")
    return problems


# -- independent validators: hl7apy (HL7 v2 structures) and fhir.resources (FHIR models) ---

# hl7apy 1.3.5 validates a "choice" group as if every alternative were required: ORM_O01's
# order detail (OBR | RQD | RQ1 | RXO | ODS | ODT, v2.5.1 4.4.1) then misses the five it did
# not get. Only those five, and only beside an OBR, are hl7apy's mistake.
_ORM_CHOICE = re.compile(r"Missing required child ORM_O01_OBRRQDRQ1RXOODSODT_SUPPGRP\.(\w+)$")
# hl7apy's table 0396 lists its literal entries only; the table itself (v2.5.1) also has the
# patterns "HL7nnnn" (HL7 table nnnn, as in HL70485) and "99zzz" (local codes, the node's
# 99DDN), which are valid values.
_TABLE_PATTERN = re.compile(
    r"Value (99[A-Z0-9]{1,3}|HL7\d{4}) not in table HL70396 in element \S+$"
)


@dataclass(frozen=True)
class HL7ApyReport:
    message: Any  # hl7apy.core.Message
    errors: list[str]
    warnings: list[str]


def hl7apy_validate(payload: bytes, tmp: Path) -> HL7ApyReport:
    """Parse ``payload`` with hl7apy (strict, groups found) and validate it against its
    v2.5.1 message structure; hl7apy's known false findings (above) are left out."""
    message = hl7apy_parse(
        payload.decode("utf-8"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True
    )
    report = tmp / "hl7apy-report.txt"
    with contextlib.suppress(ValidationError):  # every finding is in the report
        message.validate(report_file=str(report))
    errors, warnings = [], []
    segment_names = {s.split("|", 1)[0] for s in payload.decode("utf-8").split("\r") if s}
    for line in report.read_text().splitlines():
        kind, _, text = line.partition(": ")
        choice = _ORM_CHOICE.match(text)
        if choice and choice.group(1) != "OBR" and "OBR" in segment_names:
            continue
        if _TABLE_PATTERN.match(text):
            continue
        (errors if kind == "Error" else warnings).append(text)
    return HL7ApyReport(message, errors, warnings)


def fhir_task_problems(task: dict[str, Any]) -> list[str]:
    """What fhir.resources' R4B Task model refuses (types, cardinality, required elements),
    plus codes outside the value sets the model itself declares in full (``enum_values``
    without a trailing "+"): the model does not enforce required bindings."""
    try:
        model = Task.model_validate(task)
    except PydanticError as exc:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    problems = []
    for name, info in Task.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        codes = extra.get("enum_values")
        value = getattr(model, name, None)
        if isinstance(codes, list) and "+" not in codes and value not in (None, *codes):
            problems.append(f"{name}: {value!r} not in {codes}")
    return problems
