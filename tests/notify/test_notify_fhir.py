"""FHIR R4 Task: the resource's shape and priority mapping, and the POST to a local server."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import pytest
from support.net import free_port
from support.notify import HTTPReceiver, SummaryFactory, adapters, task_problems

from ddn_node.config import AdaptersSettings
from ddn_node.notify import OutgoingMessage, messages_for, send
from ddn_node.notify.fhir import build_task

ReceiverFactory = Callable[..., HTTPReceiver]
UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"


def fhir_settings(url: str, token: str = "", timeout_s: float = 5.0) -> AdaptersSettings:
    return adapters(
        fhir={"enabled": True, "url": url, "bearer_token": token, "timeout_s": timeout_s}
    )


def only_fhir(
    settings: AdaptersSettings, make_summary: SummaryFactory, **kw: Any
) -> OutgoingMessage:
    messages = messages_for(settings, make_summary(**kw))
    assert [m.kind for m in messages] == ["fhir"]
    return messages[0]


@pytest.mark.parametrize(
    ("priority", "expected"), [("STAT", "stat"), ("HIGH", "asap"), ("ROUTINE", "routine")]
)
def test_task_is_valid_r4_with_the_priority_mapped(
    make_summary: SummaryFactory, priority: str, expected: str
) -> None:
    task = build_task(make_summary(priority=priority))
    assert task_problems(task) == []
    assert task["priority"] == expected
    assert task["status"] == "requested" and task["intent"] == "order"


def test_task_carries_study_accession_score_and_findings(make_summary: SummaryFactory) -> None:
    task = build_task(make_summary())
    study_id = {"system": "urn:dicom:uid", "value": f"urn:oid:{UID}"}
    assert task["focus"] == {"type": "ImagingStudy", "identifier": study_id}
    by_code = {
        entry["type"]["coding"][0]["code"]: entry
        for entry in task["input"]
        if "coding" in entry["type"]
    }
    assert by_code["110180"]["valueIdentifier"] == study_id
    assert by_code["ACSN"]["valueIdentifier"]["value"] == "ACC2026-0042"
    by_text = {entry["type"].get("text"): entry for entry in task["input"]}
    assert by_text["AI abnormality score"]["valueDecimal"] == pytest.approx(0.8712)
    assert by_text["AI probability: Pneumothorax (present)"]["valueDecimal"] == pytest.approx(0.91)
    assert by_text["AI probability: Effusion (absent)"]["valueDecimal"] == pytest.approx(0.40)
    notes = "\n".join(n["text"] for n in task["note"])
    assert "Abnormality score: 0.87" in notes and "Pneumothorax: 0.91 (present)" in notes
    assert "NOT FOR DIAGNOSTIC USE" not in notes
    assert task["for"] == {"type": "Patient", "identifier": {"value": "PAT-00731"}}
    assert "Jane" not in json.dumps(task)  # the name stays in the EHR, not in the Task


def test_demo_task_says_not_for_diagnostic_use(make_summary: SummaryFactory) -> None:
    task = build_task(make_summary(is_demo=True))
    assert task_problems(task) == []
    assert task["note"][0]["text"].startswith("NOT FOR DIAGNOSTIC USE")
    assert sum("NOT FOR DIAGNOSTIC USE" in n["text"] for n in task["note"]) == 1


def test_empty_dicom_values_are_omitted_not_sent_empty(make_summary: SummaryFactory) -> None:
    task = build_task(
        make_summary(
            accession_number="",
            patient_id=" ",
            priority_reason="",
            findings=[],
            model_name="",
            model_version="",
        )
    )
    assert task_problems(task) == []
    assert "for" not in task and "reasonCode" not in task and "requester" not in task
    assert all(e["type"].get("coding", [{}])[0].get("code") != "ACSN" for e in task["input"])


def test_hostile_values_are_inert_json(make_summary: SummaryFactory) -> None:
    settings = fhir_settings("http://127.0.0.1:9/fhir/Task")
    message = only_fhir(
        settings, make_summary, priority_reason="<script>alert('x')</script> & \"q\""
    )
    assert b"<script>" not in message.payload and b"&" not in message.payload
    task = json.loads(message.payload)
    assert task["reasonCode"]["text"] == "<script>alert('x')</script> & \"q\""


def test_post_to_fhir_server(http_receiver: ReceiverFactory, make_summary: SummaryFactory) -> None:
    receiver = http_receiver(status=201, body=b'{"resourceType":"Task","id":"42"}')
    settings = fhir_settings(receiver.url, token="s3cret-token")
    message = only_fhir(settings, make_summary, priority="HIGH")
    assert message.content_type == "application/fhir+json"
    result = send(settings, message)
    assert result.ok and result.status == 201 and result.error == ""
    [request] = receiver.requests
    assert request.method == "POST" and request.path == "/fhir/Task"
    assert request.headers["content-type"] == "application/fhir+json"
    assert request.headers["accept"] == "application/fhir+json"
    assert request.headers["authorization"] == "Bearer s3cret-token"
    assert request.body == message.payload
    body = json.loads(request.body)
    assert task_problems(body) == [] and body["priority"] == "asap"
    condition = parse_qs(request.headers["if-none-exist"])
    assert condition == {"identifier": [f"urn:ietf:rfc:3986|{body['identifier'][0]['value']}"]}


def test_no_token_no_authorization_header(
    http_receiver: ReceiverFactory, make_summary: SummaryFactory
) -> None:
    receiver = http_receiver(status=200)
    settings = fhir_settings(receiver.url)
    assert send(settings, only_fhir(settings, make_summary)).ok
    assert "authorization" not in receiver.requests[0].headers


def test_server_error_reports_the_operation_outcome(
    http_receiver: ReceiverFactory, make_summary: SummaryFactory
) -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": "processing", "diagnostics": "Task.focus not resolvable"}
        ],
    }
    receiver = http_receiver(
        status=500, body=json.dumps(outcome).encode(), content_type="application/fhir+json"
    )
    settings = fhir_settings(receiver.url)
    result = send(settings, only_fhir(settings, make_summary))
    assert not result.ok and result.status == 500
    assert result.error == "HTTP 500 Internal Server Error: error: Task.focus not resolvable"


def test_connection_refused(make_summary: SummaryFactory) -> None:
    settings = fhir_settings(f"http://127.0.0.1:{free_port()}/fhir/Task")
    result = send(settings, only_fhir(settings, make_summary))
    assert not result.ok and result.status is None and "cannot connect" in result.error


def test_server_that_never_answers_times_out(
    http_receiver: ReceiverFactory, make_summary: SummaryFactory
) -> None:
    receiver = http_receiver(hang=True)
    settings = fhir_settings(receiver.url, timeout_s=0.3)
    result = send(settings, only_fhir(settings, make_summary))
    assert not result.ok and result.status is None
    assert result.error == "timed out after 0.3 s waiting for the answer"


def test_enabled_without_url_fails_cleanly(make_summary: SummaryFactory) -> None:
    settings = fhir_settings("")
    result = send(settings, only_fhir(settings, make_summary))
    assert not result.ok and result.error == "no URL configured"
