"""HL7 v2.5.1 ORU^R01 (unsolicited observation result) telling a RIS a study's AI priority,
and the ORM^O01 order change that sets it on the order (:func:`build_orm_o01`).

Message structure (HL7 v2.5.1 chapter 7, 7.3.1 ORU^R01 / ORU_R01)::

    MSH              message header (chapter 2, 2.14.9)
    PID              patient (chapter 3, 3.4.2), from the DICOM header of the study
    ORC              common order (chapter 4, 4.5.1): ORC-1 "RE" (observations to follow)
    OBR              observation request (chapter 7, 7.4.1)
    [NTE]            "NOT FOR DIAGNOSTIC USE" when the model is a demonstration
    TQ1              timing/quantity (chapter 4, 4.5.4): TQ1-9 priority
    OBX...           results (chapter 7, 7.4.2)

Where each piece of the study goes:

* Accession Number (0008,0050): ORC-2/OBR-2 placer and ORC-3/OBR-3 filler order number.
  In radiology the RIS assigns it and matches results on it; we do not know a separate
  placer number, so both carry it (the pair must agree when both are valued).
* Study Instance UID: an ``ST`` OBX coded ``110180^Study Instance UID^DCM`` (DICOM PS3.16
  CID 7 code, the concept IHE uses for the same UID).
* Priority: OBR-27 (TQ data type, component 6, table 0027; kept in v2.5.1 for backward
  compatibility, what older RIS read) and TQ1-9 (CWE, table 0485, the v2.5 replacement);
  codes from :data:`~ddn_node.notify.summary.HL7_PRIORITY`.
* OBX: abnormality score (``NM``, reference range 0-1), triage priority (``CE``: the
  table 0485 code plus the node's own STAT/HIGH/ROUTINE as the alternate code), the Study
  Instance UID, then the text summary as ``TX`` lines (one OBX per line, all with the same
  OBX-3/OBX-4, which receivers join into one text, as in the report examples of chapter 7).
* Result status ``P`` (preliminary) in OBR-25 and OBX-11: an unverified machine result must
  never look like a final report to a RIS that closes an exam on ``F``.

Patient name: the DICOM PN components (family^given^middle^prefix^suffix, PS3.5 6.2.1)
map to XPN components (family^given^further given^suffix^prefix, 2.A.88); only the
alphabetic group (before ``=``) is sent. Every value is escaped per chapter 2, 2.7
(``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``; control characters as ``\\Xhh\\``), so a hostile name
cannot add fields, components or segments.

Determinism: MSH-7 is the analysis time and MSH-10 is derived from the study UID and the
analysis time, so a retry is byte-identical and a RIS can recognise it as a duplicate.
Character set: UTF-8, declared in MSH-18 (``UNICODE UTF-8``, table 0211).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ddn_node.config import HL7Settings
from ddn_node.notify.summary import (
    DEMO_NOTICE,
    HL7_PRIORITY,
    NotifyResult,
    StudySummary,
    summary_lines,
)

FIELD_SEP = "|"
ENCODING_CHARS = "^~\\&"  # component, repetition, escape, subcomponent (MSH-2)
SEGMENT_END = "\r"
HL7_VERSION = "2.5.1"
CHARSET = "UNICODE UTF-8"
LOCAL = "99DDN"  # local coding system (table 0396: 99zzz)

SERVICE = ("DDN-TRIAGE", "AI triage result", LOCAL)
OBS_SCORE = ("DDN-SCORE", "Abnormality score", LOCAL)
OBS_PRIORITY = ("DDN-PRIORITY", "AI triage priority", LOCAL)
OBS_STUDY_UID = ("110180", "Study Instance UID", "DCM")
OBS_SUMMARY = ("DDN-SUMMARY", "AI triage summary", LOCAL)

ACCEPT_CODES = frozenset({"AA", "CA"})  # table 0008: application / commit accept

_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}
_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^(\d{2}(?:\d{2}(?:\d{2})?)?)(?:\.(\d{1,6}))?$")


def escape(text: str) -> str:
    """Escape one value for a v2.5.1 field (chapter 2, 2.7.1 and 2.7.4).

    Delimiters become ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``; control characters (CR ends a
    segment) become ``\\Xhh\\``. Assumes the default encoding characters ``|^~\\&``.
    """
    out: list[str] = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\X{ord(ch):02X}\\")
        else:
            out.append(ch)
    return "".join(out)


def components(*parts: str) -> str:
    """Escaped components joined by ``^``; trailing empty components dropped."""
    return "^".join(escape(p) for p in parts).rstrip("^")


def hd(value: str) -> str:
    """A configured HD (namespace^universal ID^type): ``^`` in the setting separates them."""
    return components(*value.split("^"))


def segment(name: str, fields: Mapping[int, str]) -> str:
    """One segment from {field number: already-encoded value}; trailing empties dropped.

    For MSH the numbering follows the standard: MSH-1 is the field separator itself, so the
    first value written after ``MSH|`` is MSH-2.
    """
    first = 2 if name == "MSH" else 1
    last = max(fields, default=first - 1)
    values = [fields.get(i, "") for i in range(first, last + 1)]
    return FIELD_SEP.join([name, *values]).rstrip(FIELD_SEP)


def ts(moment: dt.datetime) -> str:
    """HL7 DTM in UTC to the second, with the offset: YYYYMMDDHHMMSS+0000."""
    return moment.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S+0000")


def dicom_datetime(date: str, time: str) -> str:
    """DICOM DA + TM (local time, no offset) as HL7 DTM; empty when the date is not valid."""
    date = date.strip()
    if not _DA.match(date):
        return ""
    match = _TM.match(time.strip())
    if not match:
        return date
    whole, fraction = match.groups()
    return date + whole + (f".{fraction[:4]}" if fraction and len(whole) == 6 else "")


def xpn_from_dicom(name: str) -> str:
    """DICOM PN family^given^middle^prefix^suffix as XPN family^given^middle^suffix^prefix."""
    alphabetic = name.split("=", 1)[0].strip()
    if not alphabetic:
        return ""
    parts = [p.strip() for p in alphabetic.split("^")]
    if len(parts) > 5:  # not valid PN; keep everything rather than drop it
        parts = [*parts[:4], " ".join(parts[4:])]
    parts += [""] * (5 - len(parts))
    family, given, middle, prefix, suffix = parts
    return components(family, given, middle, suffix, prefix)


def control_id(summary: StudySummary) -> str:
    """MSH-10 (ST, at most 20 characters in v2.5.1): from the study UID and analysis time."""
    return summary.notification_id.replace("-", "").upper()[:20]


def order_control_id(summary: StudySummary) -> str:
    """MSH-10 of the ORM^O01: like :func:`control_id` with a non-hex first letter, so it
    never equals the ORU's of the same analysis (a RIS drops a repeated MSH-10)."""
    return "O" + control_id(summary)[:19]


def _msh(settings: HL7Settings, message_type: str, control: str, when: str) -> str:
    return segment(
        "MSH",
        {
            2: ENCODING_CHARS,
            3: hd(settings.sending_application),
            4: hd(settings.sending_facility),
            5: hd(settings.receiving_application),
            6: hd(settings.receiving_facility),
            7: when,
            9: message_type,
            10: control,
            11: "P",
            12: HL7_VERSION,
            18: CHARSET,
        },
    )


def _pid(summary: StudySummary) -> str:
    sex = summary.patient_sex.strip().upper()
    birth = summary.patient_birth_date.strip()
    return segment(
        "PID",
        {
            1: "1",
            3: escape(summary.patient_id.strip()),
            5: xpn_from_dicom(summary.patient_name),
            7: birth if _DA.match(birth) else "",
            8: sex if sex in {"M", "F", "O"} else "",  # DICOM M/F/O = table 0001 M/F/O
        },
    )


def build_orm_o01(settings: HL7Settings, summary: StudySummary) -> bytes:
    """The ORM^O01 "change order" (ORC-1 XO) that sets the order's priority to the AI's.

    v2.5.1 chapter 4, 4.4.1 ORM^O01 (ORM_O01, kept for backward compatibility and the order
    message RIS speak, IHE Radiology's Procedure Update in its v2.3.1 form; OMG^O19 is
    its v2.5 successor, which few RIS accept)::

        MSH              MSH-9 ORM^O01^ORM_O01, MSH-10 :func:`order_control_id`
        PID              the patient, as in the ORU (the RIS checks the order is theirs)
        ORC              ORC-1 XO, ORC-2/3 the Accession Number, ORC-7 priority (TQ.6),
                         ORC-9 the analysis time, ORC-16 the reason: AI triage
        OBR              OBR-2/3 the Accession Number, OBR-4 the study description as
                         text (the node does not know the RIS's procedure code), OBR-27
                         priority (TQ.6)
        [NTE]            the triage reason; "NOT FOR DIAGNOSTIC USE" for a demo model

    ORM_O01 has no TQ1 segment: the priority is in the TQ fields ORC-7 and OBR-27
    (component 6, table 0027: S stat, A ASAP, R routine).
    """
    when = ts(summary.analysed_at)
    accession = escape(summary.accession_number.strip())
    code, _display = HL7_PRIORITY[summary.priority]
    service = summary.study_description.strip() or "Imaging study"
    notes = []
    if summary.priority_reason:
        notes.append(f"Priority from AI triage: {summary.priority_reason}")
    if summary.is_demo:
        notes.append(DEMO_NOTICE)
    segments = [
        _msh(settings, "ORM^O01^ORM_O01", order_control_id(summary), when),
        _pid(summary),
        segment(
            "ORC",
            {
                1: "XO",  # table 0119: change order/service request
                2: accession,
                3: accession,
                7: "^^^^^" + code,
                9: when,
                16: components("DDN-TRIAGE", "Priority from AI triage", LOCAL),
            },
        ),
        segment(
            "OBR",
            {
                1: "1",
                2: accession,
                3: accession,
                4: components("", service),
                27: "^^^^^" + code,
            },
        ),
    ]
    segments.extend(
        segment("NTE", {1: str(n), 2: "L", 3: escape(text)}) for n, text in enumerate(notes, 1)
    )
    return (SEGMENT_END.join(segments) + SEGMENT_END).encode("utf-8")


def build_oru_r01(settings: HL7Settings, summary: StudySummary) -> bytes:
    """The ORU^R01 for one analysed study, without MLLP framing (UTF-8, CR after each segment)."""
    when = ts(summary.analysed_at)
    acquired = dicom_datetime(summary.study_date, summary.study_time)
    accession = escape(summary.accession_number.strip())
    code, display = HL7_PRIORITY[summary.priority]
    model = escape(f"{summary.model_name} {summary.model_version}".strip())

    segments = [
        _msh(settings, "ORU^R01^ORU_R01", control_id(summary), when),
        _pid(summary),
        segment("ORC", {1: "RE", 2: accession, 3: accession, 9: when}),
        segment(
            "OBR",
            {
                1: "1",
                2: accession,
                3: accession,
                4: components(*SERVICE),
                7: acquired,
                22: when,
                24: "RAD",  # table 0074: radiology
                25: "P",  # table 0123: preliminary
                27: "^^^^^" + code,  # TQ component 6: priority (table 0027)
            },
        ),
    ]
    if summary.is_demo:
        segments.append(segment("NTE", {1: "1", 2: "L", 3: escape(DEMO_NOTICE)}))
    segments.append(segment("TQ1", {1: "1", 9: components(code, display, "HL70485")}))

    observations: list[dict[int, str]] = [
        {
            2: "NM",
            3: components(*OBS_SCORE),
            5: f"{summary.abnormality_score:.4f}",
            7: "0-1",
            11: "P",
            14: acquired,
            18: model,
            19: when,
        },
        {
            2: "CE",
            3: components(*OBS_PRIORITY),
            5: components(code, display, "HL70485", summary.priority, summary.priority, LOCAL),
            11: "P",
            14: acquired,
            18: model,
            19: when,
        },
        {2: "ST", 3: components(*OBS_STUDY_UID), 5: escape(summary.study_uid), 11: "P"},
    ]
    observations.extend(
        {2: "TX", 3: components(*OBS_SUMMARY), 4: "1", 5: escape(line), 11: "P"}
        for line in summary_lines(summary)
    )
    for set_id, fields in enumerate(observations, start=1):
        segments.append(segment("OBX", {1: str(set_id), **fields}))
    return (SEGMENT_END.join(segments) + SEGMENT_END).encode("utf-8")


# -- acknowledgements ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """What matters in an ACK (chapter 2, 2.14.8 MSA and 2.14.5 ERR)."""

    code: str  # MSA-1, table 0008
    control_id: str  # MSA-2: the MSH-10 it acknowledges
    text: str  # MSA-3 and the ERR texts, unescaped; may be empty


def _unescape(text: str, esc: str, delimiters: Mapping[str, str]) -> str:
    """Reverse :func:`escape` for a reply that may use other encoding characters."""
    if not esc:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        end = text.find(esc, i + 1) if text[i] == esc else -1
        if end < 0:
            out.append(text[i])
            i += 1
            continue
        seq = text[i + 1 : end]
        if seq in delimiters:
            out.append(delimiters[seq])
        elif seq.startswith("X") and len(seq) % 2 == 1:
            try:
                out.append(bytes.fromhex(seq[1:]).decode("latin-1"))
            except ValueError:
                out.append(text[i : end + 1])
        elif seq.startswith(".") or seq in {"H", "N"}:
            out.append(" " if seq == ".br" else "")  # formatting commands: keep the words
        else:
            out.append(text[i : end + 1])
        i = end + 1
    return "".join(out)


def parse_ack(raw: bytes) -> Ack:
    """Read MSA and ERR from an ACK, honouring the reply's own MSH-1/MSH-2 delimiters.

    Raises ValueError when the reply has no MSH or no MSA segment.
    """
    text = raw.decode("utf-8", errors="replace")
    lines = [s for s in re.split(r"\r\n|\r|\n", text) if s.strip()]
    header = next((s for s in lines if s.startswith("MSH")), None)
    if header is None or len(header) < 4:
        raise ValueError("the reply has no MSH segment")
    field_sep = header[3]
    encoding = header[4:].split(field_sep, 1)[0][:4]  # MSH-2; missing ones take defaults
    encoding += "^~\\&"[len(encoding) :]
    comp, rep, esc, sub = encoding[0], encoding[1], encoding[2], encoding[3]
    delimiters = {"F": field_sep, "S": comp, "T": sub, "R": rep, "E": esc}

    def fields(seg: str) -> list[str]:
        return seg.split(field_sep)

    def plain(value: str, first_components: int | None = None) -> str:
        # A text-ish field read as one phrase; for a coded value (CWE) code and text only.
        if first_components is not None:
            value = comp.join(value.split(rep)[0].split(comp)[:first_components])
        parts = [p for p in re.split(f"[{re.escape(comp + sub + rep)}]", value) if p]
        return " ".join(_unescape(p, esc, delimiters) for p in parts).strip()

    msa = next((fields(s) for s in lines if s.startswith("MSA" + field_sep)), None)
    if msa is None:
        raise ValueError("the reply has no MSA segment")
    msa += [""] * (4 - len(msa))
    texts = [plain(msa[3])] if msa[3] else []
    for seg in lines:
        if not seg.startswith("ERR" + field_sep):
            continue
        err = fields(seg) + [""] * 9
        # v2.5 ERR-3 code^text, ERR-7 diagnostics, ERR-8 user message; v2.3 ERR-1 (ELD).
        for value, first in ((err[3], 2), (err[8], None), (err[7], None), (err[1], None)):
            phrase = plain(value, first)
            if phrase and phrase not in texts:
                texts.append(phrase)
    code = _unescape(msa[1].split(comp)[0], esc, delimiters).strip().upper()
    return Ack(
        code=code, control_id=_unescape(msa[2], esc, delimiters).strip(), text="; ".join(texts)
    )


def result_from_ack(raw: bytes, expected_control_id: str) -> NotifyResult:
    """ok only on MSA-1 AA or CA acknowledging our MSH-10 (an empty MSA-2 is tolerated)."""
    try:
        ack = parse_ack(raw)
    except ValueError as exc:
        return NotifyResult(ok=False, status=None, error=f"unreadable ACK: {exc}")
    if ack.control_id and ack.control_id != expected_control_id:
        return NotifyResult(
            ok=False,
            status=None,
            error=f"ACK is for message {ack.control_id!r}, not {expected_control_id!r}",
        )
    if ack.code in ACCEPT_CODES:
        return NotifyResult(ok=True, status=None, error="")
    detail = f": {ack.text}" if ack.text else ""
    return NotifyResult(ok=False, status=None, error=f"MSA-1 {ack.code or '(empty)'}{detail}")
