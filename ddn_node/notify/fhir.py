"""FHIR R4 Task: "read this imaging study, with this priority", POSTed to a FHIR server.

Resource: FHIR R4 Task (http://hl7.org/fhir/R4/task.html), JSON (R4 json.html), created
with ``POST [base]/Task`` (R4 http.html#create); ``[adapters.fhir].url`` is that full
``[base]/Task`` URL. Elements used:

* ``identifier``: ``urn:uuid:`` derived from the study UID and analysis time, the same for
  every retry; the POST carries ``If-None-Exist: identifier=...`` (conditional create, R4
  http.html#ccreate) so a server that supports it keeps one Task per analysis even when
  an answer was lost and we sent again.
* ``status`` ``requested`` and ``intent`` ``order`` (both 1..1, required bindings
  TaskStatus / TaskIntent): the read is being asked for; nothing has been done yet.
* ``priority`` (RequestPriority, required binding): STAT -> ``stat``, HIGH -> ``asap``,
  ROUTINE -> ``routine``; why ``asap`` and not ``urgent`` is explained in
  :mod:`ddn_node.notify.summary`.
* ``focus``: a logical reference to the ImagingStudy by its Study Instance UID, identifier
  system ``urn:dicom:uid`` and value ``urn:oid:<uid>`` (the convention of R4
  imagingstudy.html for ``ImagingStudy.identifier``).
* ``for``: the Patient by the DICOM Patient ID (identifier value only: the node does not
  know the assigning authority's system); no name, birth date or sex, which the server
  already has.
* ``input``: the Study Instance UID (DCM 110180) and the Accession Number (identifier type
  ``ACSN``, v2 table 0203), then the AI results the reader works with: abnormality score
  and one probability per finding (``valueDecimal``). Inputs rather than ``output``
  because R4 defines outputs as what performing the Task produced, and the read has not
  happened yet.
* ``note``: the text summary (priority, reason, score, every finding with its probability
  and present/absent), "NOT FOR DIAGNOSTIC USE" for a demonstration model.
* ``requester``: the algorithm as a Device reference by display.

Empty DICOM values are left out rather than sent as empty strings (JSON rule: no empty
values, R4 json.html).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from ddn_node.notify.summary import (
    DEMO_NOTICE,
    FHIR_PRIORITY,
    StudySummary,
    iso_utc,
    json_bytes,
    summary_lines,
)

CONTENT_TYPE = "application/fhir+json"
IDENTIFIER_SYSTEM = "urn:ietf:rfc:3986"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"

STUDY_UID_TYPE = {"coding": [{"system": DCM, "code": "110180", "display": "Study Instance UID"}]}
ACCESSION_TYPE = {"coding": [{"system": V2_0203, "code": "ACSN", "display": "Accession ID"}]}


def study_identifier(study_uid: str) -> dict[str, str]:
    return {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}


def build_task(summary: StudySummary) -> dict[str, Any]:
    """The Task resource for one analysed study, as a JSON-ready dict."""
    when = iso_utc(summary.analysed_at)
    model = f"{summary.model_name} {summary.model_version}".strip()
    accession = summary.accession_number.strip()
    patient_id = summary.patient_id.strip()

    inputs: list[dict[str, Any]] = [
        {"type": STUDY_UID_TYPE, "valueIdentifier": study_identifier(summary.study_uid)}
    ]
    if accession:
        inputs.append(
            {
                "type": ACCESSION_TYPE,
                "valueIdentifier": {"type": ACCESSION_TYPE, "value": accession},
            }
        )
    inputs.append(
        {
            "type": {"text": "AI abnormality score"},
            "valueDecimal": round(summary.abnormality_score, 4),
        }
    )
    inputs.extend(
        {
            "type": {"text": f"AI probability: {label} ({'present' if present else 'absent'})"},
            "valueDecimal": round(probability, 4),
        }
        for label, probability, present in summary.findings
    )

    notes = [{"text": DEMO_NOTICE}] if summary.is_demo else []
    notes.append({"text": "\n".join(summary_lines(summary, disclaimer=False))})

    task: dict[str, Any] = {
        "resourceType": "Task",
        "identifier": [
            {"system": IDENTIFIER_SYSTEM, "value": f"urn:uuid:{summary.notification_id}"}
        ],
        "status": "requested",
        "businessStatus": {"text": f"AI triage: {summary.priority}"},
        "intent": "order",
        "priority": FHIR_PRIORITY[summary.priority],
        "code": {"text": "Read imaging study (priority from AI triage)"},
        "description": f"AI triage {summary.priority}"
        + (f": {summary.priority_reason}" if summary.priority_reason else ""),
        "focus": {"type": "ImagingStudy", "identifier": study_identifier(summary.study_uid)},
    }
    if patient_id:
        task["for"] = {"type": "Patient", "identifier": {"value": patient_id}}
    task["authoredOn"] = when
    task["lastModified"] = when  # inv-1: lastModified >= authoredOn
    if model:
        task["requester"] = {"type": "Device", "display": model}
    if summary.priority_reason:
        task["reasonCode"] = {"text": summary.priority_reason}
    task["note"] = notes
    task["input"] = inputs
    return task


def task_bytes(summary: StudySummary) -> bytes:
    return json_bytes(build_task(summary))


def if_none_exist(task: dict[str, Any]) -> str | None:
    """The conditional-create header value for a Task built here (None if it has no identifier)."""
    for identifier in task.get("identifier", []):
        if identifier.get("system") == IDENTIFIER_SYSTEM and identifier.get("value"):
            return urlencode({"identifier": f"{IDENTIFIER_SYSTEM}|{identifier['value']}"})
    return None
