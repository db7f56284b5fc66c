"""Webhook: a small JSON document about one analysed study, for anything that is not a RIS.

Document (``"schema": "ddn-node.study-triaged/1"``; new fields may be added, none renamed
or removed without a new schema number)::

    {
      "schema": "ddn-node.study-triaged/1",
      "id": "<uuid, the same on every retry of this analysis>",
      "study_instance_uid": "1.2.3...",
      "accession_number": "A123",
      "priority": "STAT" | "HIGH" | "ROUTINE",
      "priority_reason": "critical finding: Pneumothorax 0.91 >= 0.50",
      "abnormality_score": 0.87,
      "findings": [{"label": "Pneumothorax", "probability": 0.91, "present": true}, ...],
      "study": {"date": "20260102", "time": "101500", "modalities": "CR"},
      "model": {"name": "...", "version": "..."},
      "analysed_at": "2026-01-02T10:16:00Z",
      "not_for_diagnostic_use": false
    }

No patient data, by design: not the name, birth date or sex, and not the Patient ID, nor
the free-text study description (which sometimes carries names). A webhook goes to
"anything else" - chat bots, dashboards, analytics - outside the interface agreements that
govern what the RIS and the EHR receive, so it gets the minimum necessary (GDPR art.
5(1)(c) data minimisation; HIPAA 45 CFR 164.502(b) minimum necessary). The Study Instance
UID and the Accession Number let an authorised system look the patient up in the RIS or
PACS. Sending the Patient ID would need an explicit opt-in setting (there is none yet) and
an https URL.
"""

from __future__ import annotations

from typing import Any

from ddn_node.notify.summary import StudySummary, iso_utc, json_bytes

CONTENT_TYPE = "application/json"
SCHEMA = "ddn-node.study-triaged/1"


def build_document(summary: StudySummary) -> dict[str, Any]:
    """The webhook document for one analysed study, as a JSON-ready dict."""
    return {
        "schema": SCHEMA,
        "id": summary.notification_id,
        "study_instance_uid": summary.study_uid,
        "accession_number": summary.accession_number.strip(),
        "priority": summary.priority,
        "priority_reason": summary.priority_reason,
        "abnormality_score": round(summary.abnormality_score, 4),
        "findings": [
            {"label": label, "probability": round(probability, 4), "present": present}
            for label, probability, present in summary.findings
        ],
        "study": {
            "date": summary.study_date.strip(),
            "time": summary.study_time.strip(),
            "modalities": summary.modalities.strip(),
        },
        "model": {"name": summary.model_name, "version": summary.model_version},
        "analysed_at": iso_utc(summary.analysed_at),
        "not_for_diagnostic_use": summary.is_demo,
    }


def document_bytes(summary: StudySummary) -> bytes:
    return json_bytes(build_document(summary))
