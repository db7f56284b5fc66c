"""The messages as independent libraries read them: hl7apy (HL7 v2.5.1 message structures,
strict) for the ORU^R01 and the ORM^O01, fhir.resources (R4B Task model) for the Task.

R4B: fhir.resources ships R5 as its default and R4B beside it, no plain R4; the Task
resource is the same in R4 and R4B (R4B changed medication definitions, subscriptions
and evidence resources only).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.notify import SummaryFactory, fhir_task_problems, hl7apy_validate

from ddn_node.config import HL7Settings
from ddn_node.notify import fhir, hl7

HL7 = HL7Settings(enabled=True, sending_facility="RADIOLOGY", receiving_facility="GENERAL")


def er7(element: object) -> str:
    return str(element.to_er7())  # type: ignore[attr-defined]


@pytest.mark.parametrize(("priority", "code"), [("STAT", "S"), ("HIGH", "A"), ("ROUTINE", "R")])
def test_orm_change_order_reads_as_such_in_hl7apy(
    make_summary: SummaryFactory, tmp_path: Path, priority: str, code: str
) -> None:
    summary = make_summary(priority=priority, accession_number="ACC-77")
    report = hl7apy_validate(hl7.build_orm_o01(HL7, summary), tmp_path)
    assert report.errors == [] and report.warnings == []
    message = report.message
    assert message.name == "ORM_O01"
    assert er7(message.msh.msh_9) == "ORM^O01^ORM_O01"
    assert er7(message.msh.msh_10) == hl7.order_control_id(summary)
    assert er7(message.msh.msh_12) == "2.5.1"
    assert er7(message.ORM_O01_PATIENT.pid.pid_3) == "PAT-00731"
    order = message.ORM_O01_ORDER
    assert er7(order.orc.orc_1) == "XO"  # change order
    assert er7(order.orc.orc_2) == er7(order.orc.orc_3) == "ACC-77"  # placer, filler
    assert er7(order.orc.orc_7.tq_6) == code  # priority, table 0027
    obr = order.ORM_O01_ORDER_DETAIL.ORM_O01_OBRRQDRQ1RXOODSODT_SUPPGRP.obr
    assert er7(obr.obr_2) == er7(obr.obr_3) == "ACC-77"
    assert er7(obr.obr_4) == "^CHEST PA"  # the study description, no invented code
    assert er7(obr.obr_27.tq_6) == code


def test_orm_and_oru_of_one_analysis_have_different_control_ids(
    make_summary: SummaryFactory,
) -> None:
    # A RIS discards a message whose MSH-10 it has seen: the order change must not be
    # taken for a repeat of the result.
    summary = make_summary()
    assert hl7.order_control_id(summary) != hl7.control_id(summary)
    assert len(hl7.order_control_id(summary)) == 20


def test_orm_escapes_a_hostile_description_and_reason(
    make_summary: SummaryFactory, tmp_path: Path
) -> None:
    summary = make_summary(
        study_description="CHEST|PA\rOBX|1", priority_reason="x^y&z~w", is_demo=True
    )
    report = hl7apy_validate(hl7.build_orm_o01(HL7, summary), tmp_path)
    assert report.errors == []
    assert [s.name for s in report.message.children] == ["MSH", "ORM_O01_PATIENT", "ORM_O01_ORDER"]
    detail = report.message.ORM_O01_ORDER.ORM_O01_ORDER_DETAIL
    obr = detail.ORM_O01_OBRRQDRQ1RXOODSODT_SUPPGRP.obr
    assert "\\F\\" in er7(obr.obr_4)  # hl7apy keeps the escapes: the | is data
    assert [er7(n.nte_1) for n in detail.nte] == ["1", "2"]  # reason, demo notice


@pytest.mark.parametrize("priority", ["STAT", "ROUTINE"])
def test_oru_validates_in_hl7apy(
    make_summary: SummaryFactory, tmp_path: Path, priority: str
) -> None:
    summary = make_summary(priority=priority, is_demo=priority == "STAT")  # with its NTE
    report = hl7apy_validate(hl7.build_oru_r01(HL7, summary), tmp_path)
    assert report.errors == [] and report.warnings == []
    message = report.message
    assert message.name == "ORU_R01"
    result = message.ORU_R01_PATIENT_RESULT
    group = result.ORU_R01_ORDER_OBSERVATION
    assert er7(group.orc.orc_1) == "RE"
    assert er7(group.obr.obr_27.tq_6) == {"STAT": "S", "ROUTINE": "R"}[priority]
    assert er7(group.ORU_R01_TIMING_QTY.tq1.tq1_9).split("^")[0] == er7(group.obr.obr_27.tq_6)
    assert len(group.ORU_R01_OBSERVATION) >= 3


def test_the_validator_finds_a_broken_message(make_summary: SummaryFactory, tmp_path: Path) -> None:
    # The quirks left out of the report must not hide a real fault: an order without its
    # OBR, and an ORU without one, are both reported.
    orm = hl7.build_orm_o01(HL7, make_summary()).split(b"\r")
    without_obr = b"\r".join(s for s in orm if not s.startswith(b"OBR"))
    assert any("OBR" in e for e in hl7apy_validate(without_obr, tmp_path).errors)
    oru = hl7.build_oru_r01(HL7, make_summary()).split(b"\r")
    broken = b"\r".join(s for s in oru if not s.startswith(b"OBR"))
    assert any("OBR" in e for e in hl7apy_validate(broken, tmp_path).errors)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"priority": "ROUTINE", "is_demo": False},
        {"accession_number": "", "patient_id": "", "priority_reason": ""},
    ],
)
def test_task_validates_in_fhir_resources(
    make_summary: SummaryFactory, overrides: dict[str, object]
) -> None:
    task = fhir.build_task(make_summary(**overrides))
    assert fhir_task_problems(task) == []


def test_the_fhir_model_refuses_a_broken_task(make_summary: SummaryFactory) -> None:
    task = fhir.build_task(make_summary())
    assert fhir_task_problems({**task, "priority": "urgentish"})  # required binding
    missing_intent = {k: v for k, v in task.items() if k != "intent"}
    assert any(p.startswith("intent") for p in fhir_task_problems(missing_intent))
    assert fhir_task_problems({**task, "authoredOn": "yesterday"})
