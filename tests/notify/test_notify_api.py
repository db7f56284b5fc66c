"""The interface the worker uses: messages_for, send, StudySummary's checks, determinism."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
import structlog
from support.net import free_port
from support.notify import HOSTILE_NAME, SummaryFactory, adapters

from ddn_node.config import AdaptersSettings
from ddn_node.notify import (
    FHIR_PRIORITY,
    HL7_PRIORITY,
    NotifyResult,
    OutgoingMessage,
    messages_for,
    send,
)
from ddn_node.vocabulary import Priority

ALL_ON = {
    "hl7": {"enabled": True},
    "fhir": {"enabled": True, "url": "http://127.0.0.1:9/fhir/Task"},
    "webhook": {"enabled": True, "url": "http://127.0.0.1:9/hook"},
}


def test_every_adapter_is_off_by_default(make_summary: SummaryFactory) -> None:
    assert messages_for(AdaptersSettings(), make_summary()) == []


def test_one_message_per_enabled_adapter(make_summary: SummaryFactory) -> None:
    messages = messages_for(adapters(**ALL_ON), make_summary())
    assert [m.kind for m in messages] == ["hl7", "fhir", "webhook"]
    assert all(isinstance(m, OutgoingMessage) and isinstance(m.payload, bytes) for m in messages)
    only_webhook = adapters(webhook=ALL_ON["webhook"])
    assert [m.kind for m in messages_for(only_webhook, make_summary())] == ["webhook"]


def test_messages_are_deterministic_and_share_one_id(make_summary: SummaryFactory) -> None:
    first = messages_for(adapters(**ALL_ON), make_summary())
    again = messages_for(adapters(**ALL_ON), make_summary())
    assert first == again
    summary = make_summary()
    hl7, fhir, hook = first
    assert json.loads(hook.payload)["id"] == summary.notification_id
    assert (
        json.loads(fhir.payload)["identifier"][0]["value"] == f"urn:uuid:{summary.notification_id}"
    )
    assert (
        hl7.payload.split(b"|")[9].decode() == summary.notification_id.replace("-", "").upper()[:20]
    )
    other = make_summary(analysed_at=dt.datetime(2026, 1, 3, tzinfo=dt.UTC))
    assert other.notification_id != summary.notification_id


def test_mapping_tables_cover_exactly_the_analysed_priorities() -> None:
    analysed = {p.value for p in Priority} - {Priority.NOT_ANALYSED.value}
    assert set(HL7_PRIORITY) == set(FHIR_PRIORITY) == analysed
    assert {code for code, _ in HL7_PRIORITY.values()} == {"S", "A", "R"}
    assert set(FHIR_PRIORITY.values()) <= {"routine", "urgent", "asap", "stat"}


def test_summary_accepts_the_enum_and_numpy_numbers(make_summary: SummaryFactory) -> None:
    summary = make_summary(
        priority=Priority.HIGH,
        abnormality_score=np.float32(0.5),
        findings=[("A", np.float32(0.25), np.bool_(False)), ("B", np.float64(0.75), True)],
        analysed_at=dt.datetime(2026, 1, 2, 11, 16, tzinfo=dt.timezone(dt.timedelta(hours=1))),
    )
    assert summary.priority == "HIGH" and type(summary.priority) is str
    assert summary.findings == (("B", 0.75, True), ("A", 0.25, False))
    assert summary.analysed_at == dt.datetime(2026, 1, 2, 10, 16, tzinfo=dt.UTC)
    assert summary.analysed_at.tzinfo == dt.UTC
    json.loads(messages_for(adapters(**ALL_ON), summary)[2].payload)  # serialisable


@pytest.mark.parametrize(
    "bad",
    [
        {"priority": "NOT_ANALYSED"},
        {"priority": "urgent"},
        {"abnormality_score": 1.5},
        {"abnormality_score": float("nan")},
        {"findings": [("X", -0.1, False)]},
        {"analysed_at": dt.datetime(2026, 1, 2, 10, 16)},
        {"study_uid": ""},
    ],
)
def test_summary_rejects_what_cannot_be_told(
    make_summary: SummaryFactory, bad: dict[str, object]
) -> None:
    with pytest.raises(ValueError):
        make_summary(**bad)


def test_unknown_kind_is_a_result_not_an_exception() -> None:
    result = send(AdaptersSettings(), OutgoingMessage("pager", b"", "text/plain"))
    assert result == NotifyResult(ok=False, status=None, error="unknown message kind 'pager'")


def test_logs_carry_no_patient_data(make_summary: SummaryFactory) -> None:
    summary = make_summary(patient_name=HOSTILE_NAME, patient_id="MRN-SECRET-1")
    settings = adapters(
        hl7={"enabled": True, "port": free_port()},
        fhir={"enabled": True, "url": f"http://127.0.0.1:{free_port()}/fhir/Task"},
        webhook={"enabled": True, "url": f"http://127.0.0.1:{free_port()}/hook"},
    )
    with structlog.testing.capture_logs() as logs:
        messages = messages_for(settings, summary)
        for message in messages:
            send(settings, message)  # nothing listens there: all three fail
    assert {entry["event"] for entry in logs} >= {
        "notify.messages_built",
        "notify.hl7_failed",
        "notify.fhir_failed",
        "notify.webhook_failed",
    }
    text = repr(logs)
    for secret in ("O'Brien", "MRN-SECRET-1", "ACC2026-0042"):
        assert secret not in text


@pytest.mark.parametrize(
    ("url", "warn"),
    [
        ("http://ris.hospital.local/hook", True),
        ("http://10.0.0.5:8080/hook", True),
        ("http://127.0.0.1:8080/hook", False),
        ("http://localhost/hook", False),
        ("http://[::1]/hook", False),
        ("https://ris.hospital.local/hook", False),
    ],
)
def test_bearer_token_over_plain_http_is_flagged(url: str, warn: bool) -> None:
    from ddn_node.notify import _plain_http_off_host

    assert _plain_http_off_host(url) is warn
