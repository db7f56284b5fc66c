"""Radiologists' feedback on findings: through the study page (a logged-in user, the CSRF
token) and the API (the worklist:write scope), stored with who, when and the model's
version, audited without clinical content, and kept without patient identifiers when
retention deletes the study."""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import re
from pathlib import Path

from sqlalchemy import select
from web_helpers import OTHER_TOKEN, USER, ClientFactory, api_headers, csrf_of, login
from worklist_factory import MODEL_NAME, MODEL_VERSION, add_study, analyse

from ddn_node.config import RetentionSettings
from ddn_node.dicom.spool import Spool
from ddn_node.pipeline.retention import purge_expired
from ddn_node.store.audit import AuditEventName
from ddn_node.store.engine import Database
from ddn_node.store.feedback import study_ref
from ddn_node.store.models import AuditEvent, Feedback, FindingFeedback, Result, Study

HOSTILE = "<script>alert(1)</script>"
# Effusion and Pneumothorax reported (thresholds 0.5 and 0.4), Mass and Atelectasis absent.
PROBS = {"Effusion": 0.72, "Pneumothorax": 0.45, "Mass": 0.3}


def stored(database: Database) -> list[tuple[str, bool, float, float | None, str]]:
    with database.read() as session:
        rows = session.execute(
            select(
                FindingFeedback.label,
                FindingFeedback.model_present,
                FindingFeedback.probability,
                FindingFeedback.threshold,
                FindingFeedback.verdict,
            ).order_by(FindingFeedback.id)
        ).all()
    return [tuple(r) for r in rows]


def feedback_audit(database: Database) -> list[AuditEvent]:
    with database.read() as session:
        return list(
            session.scalars(
                select(AuditEvent).where(AuditEvent.event == AuditEventName.FEEDBACK_RECORDED)
            )
        )


def test_feedback_through_the_study_page(
    sqlite_database: Database, make_client: ClientFactory
) -> None:
    study = add_study(sqlite_database, patient_name="ROE^RICHARD", patient_id="PID-77")
    analyse(sqlite_database, study, PROBS)
    client = make_client(sqlite_database)
    login(client)
    page = client.get(f"/studies/{study}")
    assert page.status_code == 200
    # The form offers a verdict on each reported finding, and the absent ones as missed.
    assert 'name="verdict:Effusion" value="agree"' in page.text
    assert 'name="verdict:Pneumothorax" value="disagree"' in page.text
    assert 'name="missed" value="Mass"' in page.text
    assert (
        'name="verdict:Mass"' not in page.text and 'name="missed" value="Effusion"' not in page.text
    )
    form = {
        "verdict:Effusion": "agree",
        "verdict:Pneumothorax": "disagree",
        "missed": "Mass",
        "absent_confirmed": "1",
        "note": f"pleural thickening, not effusion {HOSTILE}",
        "generation": "1",
        "next": f"/studies/{study}#feedback",
    }
    # Without this session's CSRF token nothing is recorded.
    assert client.post(f"/studies/{study}/feedback", data=form).status_code == 403
    assert (
        client.post(f"/studies/{study}/feedback", data=form | {"csrf_token": "forged"}).status_code
        == 403
    )
    assert stored(sqlite_database) == [] and feedback_audit(sqlite_database) == []

    done = client.post(f"/studies/{study}/feedback", data=form | {"csrf_token": csrf_of(page.text)})
    assert done.status_code == 303 and done.headers["location"] == f"/studies/{study}#feedback"
    assert stored(sqlite_database) == [
        ("Effusion", True, 0.72, 0.5, "agree"),
        ("Pneumothorax", True, 0.45, 0.4, "disagree"),
        ("Mass", False, 0.3, 0.5, "disagree"),  # missed
        ("Atelectasis", False, 0.01, 0.5, "agree"),  # confirmed absent
    ]
    with sqlite_database.read() as session:
        row = session.execute(select(Feedback)).scalar_one()
        result_id = session.execute(select(Result.id)).scalar_one()
    assert (row.user, row.model_name, row.model_version, row.head) == (
        USER,
        MODEL_NAME,
        MODEL_VERSION,
        "cxr",
    )
    assert row.result_id == result_id and row.generation == 1 and row.priority == "STAT"
    assert row.note.startswith("pleural thickening")

    (event,) = feedback_audit(sqlite_database)
    assert (event.actor, event.study_uid, event.outcome) == (USER, study, "success")
    assert event.detail == {"via": "ui", "generation": 1, "labels": 4, "note": True}

    # The page shows the review (the note as text) and starts the form from it.
    again = client.get(f"/studies/{study}").text
    history = again[again.index('id="feedback-history"') :]
    assert "Effusion: agreed" in history and "Pneumothorax: disagreed" in history
    assert "Mass: missed by the model" in history and USER in history
    assert html.escape(HOSTILE) in history and HOSTILE not in again
    assert re.search(r'name="verdict:Pneumothorax" value="disagree" checked', again)
    assert re.search(r'name="missed" value="Mass" checked', again)


def test_feedback_form_refusals(sqlite_database: Database, make_client: ClientFactory) -> None:
    study = add_study(sqlite_database)
    waiting = add_study(sqlite_database)  # not analysed
    analyse(sqlite_database, study, PROBS)
    client = make_client(sqlite_database)
    login(client)
    token = csrf_of(client.get(f"/studies/{study}").text)

    def post(uid: str, **fields: str) -> int:
        data = {"csrf_token": token, **fields}
        return client.post(f"/studies/{uid}/feedback", data=data).status_code

    assert post(study, **{"verdict:Nodule": "agree"}) == 422  # not a label of the head
    assert post(study, **{"verdict:Effusion": "maybe"}) == 422
    assert post(study, missed="Effusion") == 422  # reported: agree or disagree instead
    assert post(study) == 422  # nothing to record
    assert post(study, generation="2", **{"verdict:Effusion": "agree"}) == 409  # not shown
    assert post(waiting, **{"verdict:Effusion": "agree"}) == 409  # no result yet
    assert post("9.9.9.9", **{"verdict:Effusion": "agree"}) == 404
    assert stored(sqlite_database) == [] and feedback_audit(sqlite_database) == []


def test_feedback_through_the_api_needs_worklist_write(
    database: Database, make_client: ClientFactory
) -> None:
    study = add_study(database)
    analyse(database, study, PROBS)
    client = make_client(
        database,
        tokens=[
            {"name": "viewer", "sha256": hashlib.sha256(b"viewer-secret").hexdigest()},
            {
                "name": "pacs-ai",
                "sha256": hashlib.sha256(OTHER_TOKEN.encode()).hexdigest(),
                "scopes": ["read", "worklist:write"],
            },
        ],
    )
    body = {
        "generation": 1,
        "findings": [{"label": "Effusion", "verdict": "disagree"}],
        "missed": ["Mass"],
        "note": "reviewed at the RIS",
    }
    url = f"/api/studies/{study}/feedback"
    assert client.post(url, json=body).status_code == 401
    refused = client.post(url, json=body, headers=api_headers("viewer-secret"))
    assert refused.status_code == 403 and "worklist:write" in refused.json()["detail"]
    assert stored(database) == []

    writer = api_headers(OTHER_TOKEN)
    bad = {**body, "findings": [{"label": "Nodule", "verdict": "agree"}]}
    assert client.post(url, json=bad, headers=writer).status_code == 422
    assert client.post(url, json={**body, "generation": 3}, headers=writer).status_code == 409
    assert client.post(url, json={**body, "extra": 1}, headers=writer).status_code == 422
    done = client.post(url, json=body, headers=writer)
    assert done.status_code == 201, done.text
    review = done.json()
    assert review["user"] == "token:pacs-ai" and review["model_version"] == MODEL_VERSION
    assert [(f["label"], f["verdict"], f["radiologist_present"]) for f in review["findings"]] == [
        ("Effusion", "disagree", False),
        ("Mass", "disagree", True),
    ]
    # Without absent_confirmed the labels not mentioned are not counted as absent.
    assert [r[0] for r in stored(database)] == ["Effusion", "Mass"]
    (event,) = feedback_audit(database)
    assert event.actor == "token:pacs-ai" and event.detail["via"] == "api"
    assert "Effusion" not in str(event.detail) and "RIS" not in str(event.detail)
    detail = client.get(f"/api/studies/{study}", headers=writer).json()
    assert detail["feedback"][0]["note"] == "reviewed at the RIS"


def test_feedback_survives_retention_without_patient_identifiers(
    database: Database, make_client: ClientFactory, spool: Spool, tmp_path: Path
) -> None:
    study = add_study(
        database,
        patient_name="SURVIVOR^SAM",
        patient_id="PID-RETAIN",
        accession="ACC-RETAIN",
        received_ago=dt.timedelta(days=40),
        state="analysed",
    )
    analyse(database, study, PROBS)
    with database.session() as session:  # analyse() stamps now; retention counts arrival
        session.execute(
            Study.__table__.update().values(
                last_received_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
            )
        )
    client = make_client(database)
    login(client)
    token = csrf_of(client.get(f"/studies/{study}").text)
    client.post(
        f"/studies/{study}/feedback",
        data={"csrf_token": token, "verdict:Effusion": "agree", "absent_confirmed": "1"},
    )
    before = stored(database)
    assert len(before) == 3  # Effusion agreed, Mass and Atelectasis absent

    purged = purge_expired(database, spool, RetentionSettings(enabled=True, max_age_days=30))
    assert [p.study_uid for p in purged] == [study]
    with database.read() as session:
        assert session.execute(select(Study.id)).first() is None
        assert session.execute(select(Result.id)).first() is None
        row = session.execute(select(Feedback)).scalar_one()
        values = [
            str(v)
            for table in (Feedback.__table__, FindingFeedback.__table__)
            for r in session.execute(select(table)).all()
            for v in r
        ]
    assert stored(database) == before  # every verdict, probability and threshold kept
    assert row.result_id is None and row.model_version == MODEL_VERSION and row.user == USER
    assert (
        row.study_ref
        == study_ref(study)
        == hashlib.sha256(b"ddn-node feedback\x00" + study.encode()).hexdigest()
    )
    for identifier in ("SURVIVOR", "PID-RETAIN", "ACC-RETAIN", study):
        assert not any(identifier in v for v in values), identifier
