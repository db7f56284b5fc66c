"""Instance identity at ingest: a known UID arriving under another study, series or patient
is refused and changes nothing; a changed re-send keeps the earlier version. On SQLite and
PostgreSQL (issue 15: the existing row of patient A's study once pointed at patient B's
file after a colliding SOP Instance UID)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from sqlalchemy import select

from ddn_node.store.engine import Database
from ddn_node.store.ingest import (
    IdentityConflict,
    InstanceRecord,
    KnownSeries,
    record_instance,
)
from ddn_node.store.models import AuditEvent, Instance, InstanceVersion, Series, Study
from ddn_node.vocabulary import ConflictKind

T0 = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)


def image(study: str, series: str, sop: str, patient: str, content: str) -> InstanceRecord:
    return InstanceRecord(
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"studies/{study}/{sop}.{content}.dcm",
        size=100,
        sha256=content * 64,
        calling_ae="PACS",
        patient_id=patient,
        modality="CR",
    )


A = image("1.1", "1.1.1", "1.1.1.1", "PAT-A", "a")


def store(db: Database, rec: InstanceRecord, known: KnownSeries | None = None):  # type: ignore[no-untyped-def]
    return record_instance(db, rec, quiet_period_s=30, force_complete_s=900, now=T0, known=known)


def snapshot(db: Database) -> list[tuple[str, str, str, str, int]]:
    """Every instance with the study and series it is in, and its file."""
    with db.read() as s:
        rows = s.execute(
            select(
                Instance.sop_instance_uid,
                Study.study_uid,
                Series.series_uid,
                Instance.path,
                Study.num_instances,
            )
            .join(Series, Instance.series_id == Series.id)
            .join(Study, Instance.study_id == Study.id)
            .order_by(Instance.id)
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def study_uids(db: Database) -> list[str]:
    with db.read() as s:
        return list(s.scalars(select(Study.study_uid).order_by(Study.id)))


@pytest.mark.parametrize(
    ("other", "kind", "existing_study"),
    [
        # The reported sequence: patient B's image under A's SOP Instance UID, B's study.
        (
            image("2.2", "2.2.1", A.sop_instance_uid, "PAT-B", "b"),
            ConflictKind.INSTANCE_OTHER_STUDY,
            "1.1",
        ),
        # Same study and patient, another series.
        (
            image("1.1", "1.1.2", A.sop_instance_uid, "PAT-A", "b"),
            ConflictKind.INSTANCE_OTHER_SERIES,
            "1.1",
        ),
        # A's series UID named in another study (a new SOP Instance UID).
        (image("2.2", "1.1.1", "2.2.1.9", "PAT-B", "b"), ConflictKind.SERIES_OTHER_STUDY, "1.1"),
        # A's study UID under another Patient ID (a PACS correction sent before the merge).
        (image("1.1", "1.1.3", "1.1.3.1", "PAT-B", "b"), ConflictKind.STUDY_OTHER_PATIENT, "1.1"),
    ],
    ids=lambda v: v.value if isinstance(v, ConflictKind) else None,
)
def test_conflicting_identity_is_refused_and_changes_nothing(
    db: Database, other: InstanceRecord, kind: ConflictKind, existing_study: str
) -> None:
    known = KnownSeries()
    store(db, A, known)
    before = snapshot(db)
    with pytest.raises(IdentityConflict) as refused:
        store(db, other, known)
    assert refused.value.kind is kind
    assert refused.value.existing_study_uid == existing_study
    assert snapshot(db) == before  # A's row still names A's file, in A's study
    assert study_uids(db) == ["1.1"]  # B's study was not created half-way


def test_fast_path_cannot_put_an_instance_into_another_study(db: Database) -> None:
    """The per-process cache of known series must not let a colliding series UID through."""
    known = KnownSeries()
    store(db, A, known)
    store(db, dataclasses.replace(A, sop_instance_uid="1.1.1.2", sha256="c" * 64), known)
    intruder = image("2.2", A.series_uid, "2.2.1.3", "PAT-B", "b")
    with pytest.raises(IdentityConflict) as refused:
        store(db, intruder, known)
    assert refused.value.kind is ConflictKind.SERIES_OTHER_STUDY
    assert [row[1] for row in snapshot(db)] == ["1.1", "1.1"]


def test_empty_patient_id_is_no_evidence_of_another_patient(db: Database) -> None:
    store(db, A)
    unlabelled = dataclasses.replace(
        A, sop_instance_uid="1.1.1.5", patient_id="", sha256="d" * 64, path="p"
    )
    assert store(db, unlabelled).new_instance


def test_changed_resend_keeps_the_earlier_version_and_is_audited(db: Database) -> None:
    store(db, A)
    corrected = image("1.1", "1.1.1", A.sop_instance_uid, "PAT-A", "e")
    outcome = store(db, corrected)
    assert outcome.changed and outcome.path == corrected.path
    assert store(db, corrected).path == corrected.path  # identical again: not changed
    with db.read() as s:
        row = s.scalars(select(Instance)).one()
        versions = s.scalars(select(InstanceVersion)).all()
        audits = s.scalars(select(AuditEvent).where(AuditEvent.event == "instance.replaced")).all()
    assert (row.path, row.sha256) == (corrected.path, corrected.sha256)
    assert [(v.path, v.sha256, v.instance_id) for v in versions] == [(A.path, A.sha256, row.id)]
    assert len(audits) == 1
    assert audits[0].detail["previous_sha256"] == A.sha256
    assert audits[0].study_uid == "1.1"
