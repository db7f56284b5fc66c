"""Notifications of an analysed study for the enabled adapters (HL7, FHIR, webhook),
written durably to the spool and handed back as delivery rows to queue."""

from __future__ import annotations

import datetime as dt

from ddn_node.config import Settings
from ddn_node.dicom.spool import Spool
from ddn_node.model.types import StudyPrediction
from ddn_node.notify import StudySummary, messages_for
from ddn_node.pipeline.triage import TriageDecision
from ddn_node.store.engine import Database
from ddn_node.store.models import Study
from ddn_node.store.results import OutgoingObject

ADAPTER_PREFIX = "adapter:"
"""Delivery rows of adapter messages have destination ``adapter:<kind>``."""


def queue_messages(
    settings: Settings,
    database: Database,
    spool: Spool,
    study_id: int,
    prediction: StudyPrediction,
    decision: TriageDecision,
    now: dt.datetime,
) -> list[OutgoingObject]:
    """One message per enabled adapter, on disk, as the delivery rows that will send it."""
    adapters = settings.adapters
    if not (adapters.hl7.enabled or adapters.fhir.enabled or adapters.webhook.enabled):
        return []
    with database.read() as session:
        study = session.get(Study, study_id)
        assert study is not None
        summary = StudySummary(
            study_uid=study.study_uid,
            accession_number=study.accession_number,
            patient_id=study.patient_id,
            patient_name=study.patient_name,
            patient_birth_date=study.patient_birth_date,
            patient_sex=study.patient_sex,
            study_date=study.study_date,
            study_time=study.study_time,
            modalities=study.modalities,
            study_description=study.study_description,
            priority=decision.priority.value,
            priority_reason=decision.reason,
            abnormality_score=prediction.abnormality_score,
            findings=[
                (name, p, name in prediction.positive)
                for name, p in sorted(
                    prediction.probabilities.items(), key=lambda kv: kv[1], reverse=True
                )
            ],
            model_name=prediction.algorithm.name,
            model_version=prediction.algorithm.version,
            is_demo=prediction.algorithm.is_demo,
            analysed_at=now,
        )
    out = []
    for message in messages_for(adapters, summary):
        relpath = spool.result_relpath(
            summary.study_uid, f"{message.kind}-{summary.notification_id}", suffix=".msg"
        )
        spool.write_bytes(relpath, message.payload)
        out.append(
            OutgoingObject(
                f"{ADAPTER_PREFIX}{message.kind}",
                message.kind,
                "",
                summary.notification_id,
                relpath,
            )
        )
    return out
