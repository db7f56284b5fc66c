"""The ORU^R01 itself: segments, escaping, priority codes, observations (no network here)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.notify import (
    BASE,
    HOSTILE_NAME,
    Segment,
    SummaryFactory,
    one_segment,
    parse_message,
    segments_named,
)

from ddn_node.config import HL7Settings
from ddn_node.notify import StudySummary, hl7

HL7 = HL7Settings(
    enabled=True,
    sending_application="DDN_NODE",
    sending_facility="RADIOLOGY",
    receiving_application="RIS",
    receiving_facility="GENERAL HOSPITAL",
)


def build(make_summary: SummaryFactory, **overrides: object) -> list[Segment]:
    return parse_message(hl7.build_oru_r01(HL7, make_summary(**overrides)))


def test_segment_order_and_header(make_summary: SummaryFactory) -> None:
    segments = build(make_summary)
    names = [s.name for s in segments]
    assert names[:6] == ["MSH", "PID", "ORC", "OBR", "TQ1", "OBX"]
    assert set(names[5:]) == {"OBX"}
    msh = segments[0]
    assert msh.raw(1) == "|" and msh.raw(2) == "^~\\&"
    assert [msh.value(n) for n in (3, 4, 5, 6)] == [
        "DDN_NODE",
        "RADIOLOGY",
        "RIS",
        "GENERAL HOSPITAL",
    ]
    assert msh.raw(7) == "20260102101600+0000"
    assert msh.components(9) == ["ORU", "R01", "ORU_R01"]
    assert 1 <= len(msh.raw(10)) <= 20
    assert msh.raw(11) == "P" and msh.raw(12) == "2.5.1" and msh.raw(18) == "UNICODE UTF-8"


def test_pid_from_the_dicom_header(make_summary: SummaryFactory) -> None:
    pid = one_segment(build(make_summary), "PID")
    assert pid.value(3) == "PAT-00731"
    # DICOM PN family^given^middle^prefix^suffix -> XPN family^given^middle^suffix^prefix
    assert pid.components(5) == ["Doe", "Jane", "Q", "III", "Dr"]
    assert pid.raw(7) == "19700315" and pid.raw(8) == "F"


def test_hostile_name_is_escaped_not_interpreted(make_summary: SummaryFactory) -> None:
    payload = hl7.build_oru_r01(HL7, make_summary(patient_name=HOSTILE_NAME))
    raw_pid = payload.decode().split("\r")[1]
    assert "O'Brien^Anna\\F\\x\\R\\y\\E\\z\\T\\w" in raw_pid
    segments = parse_message(payload)
    pid = one_segment(segments, "PID")
    # ^ is the DICOM PN component separator and becomes the XPN one; | ~ \ & are data.
    assert pid.components(5) == ["O'Brien", "Anna|x~y\\z&w"]
    assert len(pid.fields) == 9  # no field was added by the name


def test_script_and_control_characters_stay_inside_their_field(
    make_summary: SummaryFactory,
) -> None:
    name = "<script>alert(1)</script>^Eve\rOBX|99|ST|x"
    segments = build(make_summary, patient_name=name, patient_id="ID\n42|x")
    pid = one_segment(segments, "PID")
    assert pid.components(5) == ["<script>alert(1)</script>", "Eve\rOBX|99|ST|x"]
    assert pid.value(3) == "ID\n42|x"
    assert all(s.raw(1) != "99" for s in segments_named(segments, "OBX"))


def test_order_numbers_and_study_uid(make_summary: SummaryFactory) -> None:
    segments = build(make_summary)
    orc, obr = one_segment(segments, "ORC"), one_segment(segments, "OBR")
    assert orc.raw(1) == "RE"
    assert orc.value(2) == orc.value(3) == "ACC2026-0042"
    assert obr.value(2) == obr.value(3) == "ACC2026-0042"
    assert obr.components(4)[0] == "DDN-TRIAGE"
    assert obr.raw(7) == "20260102101500.1234"  # study date + time, fraction cut to 4 digits
    assert obr.raw(25) == "P"  # preliminary: never mistaken for a final report
    uid_obx = [
        o
        for o in segments_named(segments, "OBX")
        if o.components(3)[:3] == ["110180", "Study Instance UID", "DCM"]
    ]
    assert len(uid_obx) == 1
    assert uid_obx[0].raw(2) == "ST"
    assert uid_obx[0].value(5) == "1.2.826.0.1.3680043.8.498.12345678901234567890"


@pytest.mark.parametrize(
    ("priority", "code", "text"),
    [("STAT", "S", "Stat"), ("HIGH", "A", "ASAP"), ("ROUTINE", "R", "Routine")],
)
def test_priority_in_obr27_and_tq1_9(
    make_summary: SummaryFactory, priority: str, code: str, text: str
) -> None:
    segments = build(make_summary, priority=priority)
    obr, tq1 = one_segment(segments, "OBR"), one_segment(segments, "TQ1")
    assert obr.components(27) == ["", "", "", "", "", code]  # TQ component 6, table 0027
    assert tq1.raw(1) == "1"
    assert tq1.components(9) == [code, text, "HL70485"]  # TQ1-9, table 0485
    priority_obx = [
        o for o in segments_named(segments, "OBX") if o.components(3)[0] == "DDN-PRIORITY"
    ]
    assert len(priority_obx) == 1
    assert priority_obx[0].raw(2) == "CE"
    assert priority_obx[0].components(5) == [code, text, "HL70485", priority, priority, "99DDN"]


def test_score_obx_and_set_ids(make_summary: SummaryFactory) -> None:
    obx = segments_named(build(make_summary), "OBX")
    assert [o.raw(1) for o in obx] == [str(i) for i in range(1, len(obx) + 1)]
    score = obx[0]
    assert score.raw(2) == "NM"
    assert score.components(3) == ["DDN-SCORE", "Abnormality score", "99DDN"]
    assert float(score.raw(5)) == pytest.approx(0.8712)
    assert score.raw(7) == "0-1" and score.raw(11) == "P"
    assert score.raw(19) == "20260102101600+0000"
    assert all(o.raw(11) == "P" for o in obx)


def test_summary_text_lists_findings_with_probabilities(make_summary: SummaryFactory) -> None:
    obx = segments_named(build(make_summary, priority_reason="a|b^c"), "OBX")
    lines = [o.value(5) for o in obx if o.components(3)[0] == "DDN-SUMMARY"]
    assert all(o.raw(2) == "TX" for o in obx if o.components(3)[0] == "DDN-SUMMARY")
    text = "\n".join(lines)
    assert "AI triage priority: STAT (a|b^c)" in text
    assert "Pneumothorax: 0.91 (present)" in text
    assert "Effusion: 0.40 (absent)" in text
    assert "Nodule: 0.05 (absent)" in text
    assert text.index("Pneumothorax") < text.index("Effusion") < text.index("Nodule")
    assert "NOT FOR DIAGNOSTIC USE" not in text
    assert "Jane" not in text and "PAT-00731" not in text


def test_demo_model_says_not_for_diagnostic_use(make_summary: SummaryFactory) -> None:
    segments = build(make_summary, is_demo=True)
    nte = one_segment(segments, "NTE")
    assert "NOT FOR DIAGNOSTIC USE" in nte.value(3)
    names = [s.name for s in segments]
    assert names.index("OBR") < names.index("NTE") < names.index("TQ1")  # ORU_R01 order
    summary = [
        o.value(5) for o in segments_named(segments, "OBX") if o.components(3)[0] == "DDN-SUMMARY"
    ]
    assert summary[0].startswith("NOT FOR DIAGNOSTIC USE")


def test_deterministic_and_distinct_per_analysis(make_summary: SummaryFactory) -> None:
    first = hl7.build_oru_r01(HL7, make_summary())
    reordered = hl7.build_oru_r01(
        HL7, make_summary(findings=list(reversed(make_summary().findings)))
    )
    assert first == reordered
    later = hl7.build_oru_r01(
        HL7, make_summary(analysed_at=dt.datetime(2026, 1, 2, 11, 0, tzinfo=dt.UTC))
    )
    assert parse_message(first)[0].raw(10) != parse_message(later)[0].raw(10)


def test_empty_and_malformed_header_values_are_left_out(make_summary: SummaryFactory) -> None:
    segments = build(
        make_summary,
        accession_number="",
        patient_name="",
        patient_birth_date="1970-03-15",
        patient_sex="X",
        study_date="",
        study_time="",
    )
    pid, obr = one_segment(segments, "PID"), one_segment(segments, "OBR")
    assert pid.raw(5) == "" and pid.raw(7) == "" and pid.raw(8) == ""
    assert obr.raw(2) == obr.raw(3) == "" and obr.raw(7) == ""


def test_configured_hd_components_are_kept() -> None:
    assert hl7.hd("RIS^2.16.840.1.113883.3.1^ISO") == "RIS^2.16.840.1.113883.3.1^ISO"
    assert hl7.hd("A|B") == "A\\F\\B"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_patient_id_round_trips_without_changing_the_structure(text: str) -> None:
    payload = hl7.build_oru_r01(HL7, StudySummary(**{**BASE, "patient_id": text}))
    segments = parse_message(payload)
    reference = parse_message(hl7.build_oru_r01(HL7, StudySummary(**BASE)))
    assert [s.name for s in segments] == [s.name for s in reference]
    pid = one_segment(segments, "PID")
    assert len(pid.fields) == len(one_segment(reference, "PID").fields)
    assert pid.components(3) == [text.strip()]
