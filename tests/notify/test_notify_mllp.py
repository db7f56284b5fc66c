"""HL7 over MLLP against a real TCP listener in the test: AA, AE, silence, refusal, framing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from support.net import free_port, wait_for
from support.notify import (
    FS,
    VT,
    MLLPListener,
    Responder,
    SummaryFactory,
    ack_for,
    adapters,
    one_segment,
    parse_message,
)

from ddn_node.config import AdaptersSettings
from ddn_node.notify import OutgoingMessage, messages_for, send
from ddn_node.notify.hl7 import parse_ack

ListenerFactory = Callable[[Responder], MLLPListener]


def hl7_settings(port: int, timeout_s: float = 5.0) -> AdaptersSettings:
    return adapters(
        hl7={"enabled": True, "host": "127.0.0.1", "port": port, "timeout_s": timeout_s}
    )


def only_hl7(
    settings: AdaptersSettings, make_summary: SummaryFactory, **overrides: object
) -> OutgoingMessage:
    messages = messages_for(settings, make_summary(**overrides))
    assert [m.kind for m in messages] == ["hl7"]
    assert messages[0].content_type == "x-application/hl7-v2+er7"
    return messages[0]


def test_aa_is_success_and_the_listener_got_the_exact_payload(
    mllp_listener: ListenerFactory, make_summary: SummaryFactory
) -> None:
    listener = mllp_listener(lambda message: ack_for(message, "AA"))
    settings = hl7_settings(listener.port)
    message = only_hl7(settings, make_summary, patient_name="O'Brien^Anna|x~y\\z&w")
    result = send(settings, message)
    assert result.ok and result.status is None and result.error == ""
    assert listener.received == [message.payload]  # framing stripped, content byte-exact
    assert listener.bad_frames == []
    pid = one_segment(parse_message(listener.received[0]), "PID")
    assert pid.components(5) == ["O'Brien", "Anna|x~y\\z&w"]


def test_commit_accept_ca_is_success(
    mllp_listener: ListenerFactory, make_summary: SummaryFactory
) -> None:
    listener = mllp_listener(lambda message: ack_for(message, "CA"))
    settings = hl7_settings(listener.port)
    assert send(settings, only_hl7(settings, make_summary)).ok


def test_ae_fails_with_the_msa_and_err_text(
    mllp_listener: ListenerFactory, make_summary: SummaryFactory
) -> None:
    err = "ERR||PID^1^3|204^Unknown key identifier^HL70357|E||||Patient not found in RIS"
    listener = mllp_listener(lambda m: ack_for(m, "AE", text="Order \\F\\ unknown", err=err))
    settings = hl7_settings(listener.port)
    result = send(settings, only_hl7(settings, make_summary))
    assert not result.ok and result.status is None
    assert result.error.startswith("MSA-1 AE")
    assert "Order | unknown" in result.error  # MSA-3, unescaped
    assert "204 Unknown key identifier" in result.error  # ERR-3 code and text
    assert "Patient not found in RIS" in result.error  # ERR-8


def test_ar_reject_fails(mllp_listener: ListenerFactory, make_summary: SummaryFactory) -> None:
    listener = mllp_listener(lambda m: ack_for(m, "AR", text="version not supported"))
    settings = hl7_settings(listener.port)
    result = send(settings, only_hl7(settings, make_summary))
    assert not result.ok and result.error == "MSA-1 AR: version not supported"


def test_silent_receiver_times_out(
    mllp_listener: ListenerFactory, make_summary: SummaryFactory
) -> None:
    listener = mllp_listener(lambda message: None)
    settings = hl7_settings(listener.port, timeout_s=0.3)
    started = time.monotonic()
    result = send(settings, only_hl7(settings, make_summary))
    elapsed = time.monotonic() - started
    assert not result.ok and "no ACK" in result.error and "0.3 s" in result.error
    assert 0.25 <= elapsed < 3
    assert len(listener.received) == 1  # it did arrive; only the answer is missing


def test_connection_refused(make_summary: SummaryFactory) -> None:
    settings = hl7_settings(free_port(), timeout_s=1)
    result = send(settings, only_hl7(settings, make_summary))
    assert not result.ok and result.status is None
    assert "cannot connect" in result.error


def test_peer_closing_without_ack(
    mllp_listener: ListenerFactory, make_summary: SummaryFactory
) -> None:
    listener = mllp_listener(lambda message: [])  # answer nothing, close
    settings = hl7_settings(listener.port)
    result = send(settings, only_hl7(settings, make_summary))
    assert not result.ok and "closed the connection without a complete ACK" in result.error


def test_ack_split_over_reads_with_leading_noise(
    mllp_listener: ListenerFactory, make_summary: SummaryFactory
) -> None:
    def respond(message: bytes) -> list[bytes]:
        ack = ack_for(message, "AA")
        return [b"\r\n", VT + ack[:7], ack[7:30], ack[30:] + FS, b"\r"]

    listener = mllp_listener(respond)
    settings = hl7_settings(listener.port)
    assert send(settings, only_hl7(settings, make_summary)).ok


def test_ack_for_another_message_is_not_success(
    mllp_listener: ListenerFactory, make_summary: SummaryFactory
) -> None:
    def respond(message: bytes) -> bytes:
        return ack_for(message, "AA").replace(parse_message(message)[0].raw(10).encode(), b"OTHER")

    listener = mllp_listener(respond)
    settings = hl7_settings(listener.port)
    result = send(settings, only_hl7(settings, make_summary))
    assert not result.ok and "'OTHER'" in result.error


def test_retry_sends_the_same_bytes(
    mllp_listener: ListenerFactory, make_summary: SummaryFactory
) -> None:
    answers = iter(["AE", "AA"])
    listener = mllp_listener(lambda m: ack_for(m, next(answers)))
    settings = hl7_settings(listener.port)
    message = only_hl7(settings, make_summary)
    assert not send(settings, message).ok
    again = only_hl7(settings, make_summary)  # rebuilt from the same summary
    assert send(settings, again).ok
    wait_for(lambda: len(listener.received) == 2, timeout=5, what="two deliveries")
    assert listener.received[0] == listener.received[1] == message.payload
    assert listener.connections == 2


def test_disabled_adapter_does_not_send(
    mllp_listener: ListenerFactory, make_summary: SummaryFactory
) -> None:
    listener = mllp_listener(lambda m: ack_for(m, "AA"))
    message = only_hl7(hl7_settings(listener.port), make_summary)
    off = adapters(hl7={"enabled": False, "port": listener.port})
    result = send(off, message)
    assert not result.ok and "disabled" in result.error
    assert listener.connections == 0


def test_ack_reader_honours_other_delimiters() -> None:
    ack = parse_ack(b"MSH#*$!%#RIS#RAD\rMSA#AE#ID1#bad !F! value\rERR####E####user*msg")
    assert ack.code == "AE" and ack.control_id == "ID1"
    assert ack.text == "bad # value; user msg"


# -- the ORM^O01 order change: the same MLLP exchange, its own delivery kind -----------------


def orm_settings(port: int, messages: list[str]) -> AdaptersSettings:
    return adapters(hl7={"enabled": True, "host": "127.0.0.1", "port": port, "messages": messages})


def test_oru_and_orm_both_reach_the_ris_each_acknowledged(
    mllp_listener: ListenerFactory, make_summary: SummaryFactory
) -> None:
    listener = mllp_listener(lambda m: ack_for(m, "AA"))
    settings = orm_settings(listener.port, ["oru", "orm"])
    messages = messages_for(settings, make_summary(priority="STAT"))
    assert [m.kind for m in messages] == ["hl7", "hl7_order"]
    assert all(send(settings, m).ok for m in messages)
    types = [one_segment(parse_message(r), "MSH").components(9)[:2] for r in listener.received]
    assert types == [["ORU", "R01"], ["ORM", "O01"]]
    orc = one_segment(parse_message(listener.received[1]), "ORC")
    assert orc.raw(1) == "XO" and orc.components(7) == ["", "", "", "", "", "S"]


def test_orm_ae_is_retried_with_the_same_bytes_and_ar_is_refused(
    mllp_listener: ListenerFactory, make_summary: SummaryFactory
) -> None:
    err = "ERR||ORC^1^2|204^Unknown key identifier^HL70357|E||||Order not found"
    answers = iter([("AE", err), ("AA", ""), ("AR", "")])
    listener = mllp_listener(lambda m: _answer(m, answers))
    settings = orm_settings(listener.port, ["orm"])
    [message] = messages_for(settings, make_summary(priority="HIGH"))
    first = send(settings, message)
    assert not first.ok and first.error.startswith("MSA-1 AE") and "Order not found" in first.error
    assert send(settings, message).ok
    rejected = send(settings, message)
    assert not rejected.ok and rejected.error.startswith("MSA-1 AR")
    assert listener.received == [message.payload] * 3


def _answer(message: bytes, answers: Iterator[tuple[str, str]]) -> bytes:
    code, err = next(answers)
    return ack_for(message, code, err=err)


def test_routine_or_unordered_study_sends_no_order_change(
    mllp_listener: ListenerFactory, make_summary: SummaryFactory
) -> None:
    # The node does not know what the clinician ordered: it raises priorities, never lowers
    # one, and an order without an Accession Number is not one the RIS can find.
    listener = mllp_listener(lambda m: ack_for(m, "AA"))
    settings = orm_settings(listener.port, ["oru", "orm"])
    assert [m.kind for m in messages_for(settings, make_summary(priority="ROUTINE"))] == ["hl7"]
    no_accession = make_summary(priority="STAT", accession_number="  ")
    assert [m.kind for m in messages_for(settings, no_accession)] == ["hl7"]


def test_orm_taken_out_of_the_settings_is_not_sent(
    mllp_listener: ListenerFactory, make_summary: SummaryFactory
) -> None:
    listener = mllp_listener(lambda m: ack_for(m, "AA"))
    [message] = messages_for(orm_settings(listener.port, ["orm"]), make_summary())
    result = send(orm_settings(listener.port, ["oru"]), message)
    assert not result.ok and "disabled" in result.error
    assert listener.connections == 0
