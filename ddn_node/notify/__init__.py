"""Telling the rest of the hospital: HL7 v2, FHIR R4 and webhook adapters.

Each adapter is off by default (``[adapters.hl7]``, ``[adapters.fhir]``,
``[adapters.webhook]``, ``enabled = true`` to turn one on). ``[adapters.hl7] messages``
chooses the ORU^R01 result, the ORM^O01 order change, or both. The worker calls
:func:`messages_for` once per analysed study, stores every :class:`OutgoingMessage` (one per
enabled adapter) and calls :func:`send` for each until it succeeds; ``send`` makes exactly
one attempt and never raises for network trouble.

Messages are deterministic: the same :class:`StudySummary` gives the same bytes, so a
retry is recognisably the same message (HL7 MSH-10, FHIR ``Task.identifier`` and the
webhook ``id`` all derive from the Study Instance UID and the analysis time).

Modules: :mod:`.summary` (the shared types, priority mappings and text), :mod:`.hl7`
(ORU^R01, ORM^O01 and ACKs), :mod:`.mllp` (framing and the TCP exchange), :mod:`.fhir` (Task),
:mod:`.webhook` (JSON document), :mod:`.httppost` (one POST).

Logging: ``notify.messages_built``, ``notify.order_change_skipped`` (an ORM^O01 not built:
``routine`` or ``no_accession``), ``notify.<kind>_sent`` and ``notify.<kind>_failed``
with the study UID or message id, status and a failure class; never patient data, and
never the receiver's error text (a RIS may echo names in it); that text is in the
returned :class:`NotifyResult` for the delivery table.
"""

from __future__ import annotations

import ipaddress
import json
import time
from urllib.parse import urlsplit

import structlog

from ddn_node.config import AdaptersSettings, HttpAdapterSettings
from ddn_node.notify import fhir, hl7, webhook
from ddn_node.notify.httppost import PostOutcome, post
from ddn_node.notify.mllp import MLLPError, exchange
from ddn_node.notify.summary import (
    FHIR_PRIORITY,
    HL7_PRIORITY,
    NotifyResult,
    OutgoingMessage,
    StudySummary,
)
from ddn_node.vocabulary import MessageKind, Priority

__all__ = [
    "FHIR_PRIORITY",
    "HL7_CONTENT_TYPE",
    "HL7_PRIORITY",
    "NotifyResult",
    "OutgoingMessage",
    "StudySummary",
    "messages_for",
    "send",
]

log = structlog.get_logger("ddn_node.notify")

# HL7 v2 in its traditional "ER7" (pipe and hat) encoding; the media type in common use
# (HL7 v2 over HTTP), no IANA registration exists for it.
HL7_CONTENT_TYPE = "x-application/hl7-v2+er7"


def messages_for(settings: AdaptersSettings, summary: StudySummary) -> list[OutgoingMessage]:
    """One message per enabled adapter, in the order hl7, fhir, webhook; [] when all are off."""
    messages: list[OutgoingMessage] = []
    if settings.hl7.enabled:
        for name in settings.hl7.messages:
            if name == "oru":
                messages.append(
                    OutgoingMessage(
                        MessageKind.HL7, hl7.build_oru_r01(settings.hl7, summary), HL7_CONTENT_TYPE
                    )
                )
            elif _order_change_wanted(summary):
                messages.append(
                    OutgoingMessage(
                        MessageKind.HL7_ORDER,
                        hl7.build_orm_o01(settings.hl7, summary),
                        HL7_CONTENT_TYPE,
                    )
                )
    if settings.fhir.enabled:
        messages.append(
            OutgoingMessage(MessageKind.FHIR, fhir.task_bytes(summary), fhir.CONTENT_TYPE)
        )
    if settings.webhook.enabled:
        messages.append(
            OutgoingMessage(
                MessageKind.WEBHOOK, webhook.document_bytes(summary), webhook.CONTENT_TYPE
            )
        )
    if messages:
        log.info(
            "notify.messages_built",
            study_uid=summary.study_uid,
            message_id=summary.notification_id,
            kinds=[m.kind for m in messages],
            priority=summary.priority,
        )
    return messages


def _order_change_wanted(summary: StudySummary) -> bool:
    """Whether the ORM^O01 goes out: only to raise an order the RIS can find.

    The node does not know the priority the clinician ordered; an XO to "routine" could
    demote a STAT order, so a routine result changes nothing (the ORU still tells). Without
    an Accession Number the RIS cannot find the order (ORC-2/3 would be empty).
    """
    reason = ""
    if summary.priority == Priority.ROUTINE.value:
        reason = "routine"
    elif not summary.accession_number.strip():
        reason = "no_accession"
    if reason:
        log.info(
            "notify.order_change_skipped",
            study_uid=summary.study_uid,
            message_id=summary.notification_id,
            reason=reason,
        )
    return not reason


def send(settings: AdaptersSettings, message: OutgoingMessage) -> NotifyResult:
    """Deliver ``message`` once with the current settings; ok=False with the reason on failure.

    A message whose adapter has since been disabled is not sent (ok=False, "disabled"), nor
    an ORM^O01 once "orm" is no longer in ``[adapters.hl7] messages``.
    """
    started = time.monotonic()
    failure = ""
    if message.kind in (MessageKind.HL7, MessageKind.HL7_ORDER):
        if not settings.hl7.enabled:
            result, failure = _disabled("hl7")
        elif message.kind == MessageKind.HL7_ORDER and "orm" not in settings.hl7.messages:
            # Taken out of [adapters.hl7] messages since it was queued: as good as disabled.
            result, failure = _disabled("hl7 ORM^O01")
        else:
            result, failure = _send_hl7(settings, message)
    elif message.kind in (MessageKind.FHIR, MessageKind.WEBHOOK):
        adapter: HttpAdapterSettings = getattr(settings, message.kind)
        if not adapter.enabled:
            result, failure = _disabled(message.kind)
        else:
            outcome = _send_http(adapter, message)
            result, failure = outcome.result, outcome.failure
    else:
        result, failure = (
            NotifyResult(ok=False, status=None, error=f"unknown message kind {message.kind!r}"),
            "kind",
        )
    event = f"notify.{message.kind}_sent" if result.ok else f"notify.{message.kind}_failed"
    fields = {
        "kind": message.kind,
        "message_id": _message_id(message),
        "status": result.status,
        "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
    }
    if result.ok:
        log.info(event, **fields)
    else:
        log.warning(event, failure=failure, **fields)
    return result


def _disabled(kind: str) -> tuple[NotifyResult, str]:
    return NotifyResult(
        ok=False, status=None, error=f"the {kind} adapter is disabled in the configuration"
    ), "disabled"


def _send_hl7(settings: AdaptersSettings, message: OutgoingMessage) -> tuple[NotifyResult, str]:
    cfg = settings.hl7
    try:
        reply = exchange(cfg.host, cfg.port, message.payload, cfg.timeout_s)
    except MLLPError as exc:
        return NotifyResult(ok=False, status=None, error=str(exc)), "transport"
    result = hl7.result_from_ack(reply, _message_id(message))
    if result.ok:
        return result, ""
    try:
        code = hl7.parse_ack(reply).code or "empty"
    except ValueError:
        code = "unreadable"
    return result, f"ack:{code}"


def _send_http(adapter: HttpAdapterSettings, message: OutgoingMessage) -> PostOutcome:
    extra: dict[str, str] = {}
    accept = "application/json"
    if message.kind == "fhir":
        accept = fhir.CONTENT_TYPE
        try:
            condition = fhir.if_none_exist(json.loads(message.payload))
        except ValueError:
            condition = None
        if condition:
            extra["If-None-Exist"] = condition
    if adapter.bearer_token and _plain_http_off_host(adapter.url):
        log.warning("notify.bearer_over_plain_http", kind=message.kind)
    return post(
        adapter.url,
        message.payload,
        message.content_type,
        accept,
        adapter.bearer_token,
        adapter.timeout_s,
        extra,
    )


def _plain_http_off_host(url: str) -> bool:
    """True for an http:// URL to another host: a token would cross the network in clear."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _message_id(message: OutgoingMessage) -> str:
    """MSH-10 of an HL7 message, the identifier of a JSON one; '' if it cannot be read."""
    if message.kind in (MessageKind.HL7, MessageKind.HL7_ORDER):
        header = message.payload.split(b"\r", 1)[0].decode("utf-8", errors="replace")
        fields = header.split("|")
        return fields[9] if header.startswith("MSH|") and len(fields) > 9 else ""
    try:
        document = json.loads(message.payload)
    except ValueError:
        return ""
    if not isinstance(document, dict):
        return ""
    own_id = document.get("id")
    if isinstance(own_id, str):
        return own_id
    for identifier in document.get("identifier", []):
        value = identifier.get("value") if isinstance(identifier, dict) else None
        if isinstance(value, str):
            return value.removeprefix("urn:uuid:")
    return ""
