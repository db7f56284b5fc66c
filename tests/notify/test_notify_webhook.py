"""Webhook: the JSON document (no patient data) and its POST to a local endpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from support.net import free_port
from support.notify import HOSTILE_NAME, HTTPReceiver, SummaryFactory, adapters

from ddn_node.config import AdaptersSettings
from ddn_node.notify import OutgoingMessage, messages_for, send

ReceiverFactory = Callable[..., HTTPReceiver]


def webhook_settings(url: str, token: str = "") -> AdaptersSettings:
    return adapters(webhook={"enabled": True, "url": url, "bearer_token": token})


def only_webhook(
    settings: AdaptersSettings, make_summary: SummaryFactory, **kw: Any
) -> OutgoingMessage:
    messages = messages_for(settings, make_summary(**kw))
    assert [m.kind for m in messages] == ["webhook"]
    return messages[0]


def test_document(make_summary: SummaryFactory) -> None:
    message = only_webhook(
        webhook_settings("http://127.0.0.1:9/hook"), make_summary, priority="HIGH"
    )
    assert message.content_type == "application/json"
    doc = json.loads(message.payload)
    assert doc == {
        "schema": "ddn-node.study-triaged/1",
        "id": doc["id"],
        "study_instance_uid": "1.2.826.0.1.3680043.8.498.12345678901234567890",
        "accession_number": "ACC2026-0042",
        "priority": "HIGH",
        "priority_reason": "critical finding: Pneumothorax 0.91 >= 0.50",
        "abnormality_score": 0.8712,
        "findings": [
            {"label": "Pneumothorax", "probability": 0.91, "present": True},
            {"label": "Effusion", "probability": 0.4, "present": False},
            {"label": "Nodule", "probability": 0.05, "present": False},
        ],
        "study": {"date": "20260102", "time": "101500.123456", "modalities": "CR"},
        "model": {"name": "DDN chest X-ray", "version": "2026.11.27-ddn-cxr-r1"},
        "analysed_at": "2026-01-02T10:16:00Z",
        "not_for_diagnostic_use": False,
    }
    assert len(doc["id"]) == 36


def test_no_patient_data(make_summary: SummaryFactory) -> None:
    message = only_webhook(
        webhook_settings("http://127.0.0.1:9/hook"),
        make_summary,
        patient_name=HOSTILE_NAME,
        patient_id="MRN-SECRET-1",
        patient_birth_date="19010101",
        study_description="Chest for Mrs Smith",
    )
    for secret in (b"O'Brien", b"MRN-SECRET-1", b"19010101", b"Smith", b"patient"):
        assert secret not in message.payload


def test_demo_flag(make_summary: SummaryFactory) -> None:
    doc = json.loads(
        only_webhook(webhook_settings("http://x/"), make_summary, is_demo=True).payload
    )
    assert doc["not_for_diagnostic_use"] is True


def test_post_with_bearer_token(
    http_receiver: ReceiverFactory, make_summary: SummaryFactory
) -> None:
    receiver = http_receiver(status=204)
    settings = webhook_settings(receiver.url, token="hook-token")
    message = only_webhook(settings, make_summary)
    result = send(settings, message)
    assert result.ok and result.status == 204
    [request] = receiver.requests
    assert request.method == "POST"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == "Bearer hook-token"
    assert "if-none-exist" not in request.headers
    assert request.body == message.payload


def test_server_error(http_receiver: ReceiverFactory, make_summary: SummaryFactory) -> None:
    receiver = http_receiver(status=500, body=b"database\n  is down", content_type="text/plain")
    settings = webhook_settings(receiver.url)
    result = send(settings, only_webhook(settings, make_summary))
    assert not result.ok and result.status == 500
    assert result.error == "HTTP 500 Internal Server Error: database is down"


def test_redirect_is_not_followed(
    http_receiver: ReceiverFactory, make_summary: SummaryFactory
) -> None:
    receiver = http_receiver(status=307)
    settings = webhook_settings(receiver.url, token="t")
    result = send(settings, only_webhook(settings, make_summary))
    assert not result.ok and result.status == 307
    assert len(receiver.requests) == 1


def test_connection_refused(make_summary: SummaryFactory) -> None:
    settings = webhook_settings(f"http://127.0.0.1:{free_port()}/hook")
    result = send(settings, only_webhook(settings, make_summary))
    assert not result.ok and result.status is None and "cannot connect" in result.error
