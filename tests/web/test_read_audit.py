"""Every read of patient data is audited: the worklist (one row per request, not per study),
a study's page and its API detail, each thumbnail and heat-map overlay; a 304 from the live
feed sends nothing and is not a read. Rows name who and which study, never the patient."""

from __future__ import annotations

import json

from sqlalchemy import select
from web_helpers import ClientFactory, api_headers, login
from worklist_factory import add_image, add_study, analyse, write_overlay_png

from ddn_node.dicom.spool import Spool
from ddn_node.store.audit import AuditEventName
from ddn_node.store.engine import Database
from ddn_node.store.models import AuditEvent

READS = (
    AuditEventName.WORKLIST_VIEWED,
    AuditEventName.STUDY_VIEWED,
    AuditEventName.IMAGE_VIEWED,
)


def reads(database: Database, after: int = 0) -> list[AuditEvent]:
    with database.read() as session:
        rows = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.event.in_(READS), AuditEvent.id > after)
            .order_by(AuditEvent.id)
        ).all()
        session.expunge_all()
    return list(rows)


def last_id(database: Database) -> int:
    with database.read() as session:
        return session.scalar(select(AuditEvent.id).order_by(AuditEvent.id.desc())) or 0


def test_every_read_of_patient_data_is_audited_without_patient_identifiers(
    database: Database, make_client: ClientFactory, spool: Spool
) -> None:
    study = add_study(database, patient_name="ROE^RICHARD", patient_id="PID-77", accession="A-9")
    add_study(database, patient_name="DOE^JANE", patient_id="PID-88", accession="A-10")
    image = add_image(database, spool, study)
    overlay = write_overlay_png(spool, study, "9.9.1")
    analyse(
        database,
        study,
        {"Effusion": 0.72},
        overlays={image.sop_instance_uid: {"Effusion": overlay}},
    )
    client = make_client(database)
    login(client)

    # The worklist lists two studies: one row for the request.
    start = last_id(database)
    assert client.get("/?order=arrival").status_code == 200
    (listed,) = reads(database, start)
    assert (listed.event, listed.actor, listed.study_uid) == (
        AuditEventName.WORKLIST_VIEWED,
        "radiologist",
        "",
    )
    assert listed.detail == {"via": "ui", "query": "order=arrival", "rows": 2}

    # The live feed: its first answer carries the rows (a read), its 304s do not.
    start = last_id(database)
    first = client.get("/ui/worklist.json")
    assert first.status_code == 200
    again = client.get("/ui/worklist.json", headers={"if-none-match": first.headers["etag"]})
    assert again.status_code == 304
    assert [r.event for r in reads(database, start)] == [AuditEventName.WORKLIST_VIEWED]

    # The study page, then its pictures (what the browser fetches after the page).
    start = last_id(database)
    assert client.get(f"/studies/{study}").status_code == 200
    detail = client.get(f"/api/studies/{study}", headers=api_headers()).json()
    (img,) = detail["images"]
    assert client.get(img["thumbnail_url"]).status_code == 200
    assert client.get(img["overlays"][0]["url"]).status_code == 200
    assert client.get("/api/worklist?unread=false", headers=api_headers()).status_code == 200
    got = [
        (r.event, r.actor, r.study_uid, r.detail.get("via"), r.detail.get("sop_instance_uid"))
        for r in reads(database, start)
    ]
    assert got == [
        (AuditEventName.STUDY_VIEWED, "radiologist", study, "ui", None),
        (AuditEventName.STUDY_VIEWED, "token:ris", study, "api", None),
        (AuditEventName.IMAGE_VIEWED, "radiologist", study, "ui", image.sop_instance_uid),
        (AuditEventName.IMAGE_VIEWED, "radiologist", study, "ui", image.sop_instance_uid),
        (AuditEventName.WORKLIST_VIEWED, "token:ris", "", "api", None),
    ]
    assert [r.host for r in reads(database, start)] == ["testclient"] * 5

    # Nothing that was not read is recorded as read: an unknown study, a missing image.
    start = last_id(database)
    assert client.get("/studies/9.9.9.9").status_code == 404
    assert client.get(f"/studies/{study}/instances/1.2.3/thumbnail.png").status_code == 404
    assert reads(database, start) == []

    # The audit trail leaves the node: no patient name, ID or accession number in it.
    with database.read() as session:
        everything = json.dumps(
            [
                [a.event, a.actor, a.host, a.study_uid, a.detail]
                for a in session.scalars(select(AuditEvent))
            ]
        )
    for identifier in ("ROE", "RICHARD", "PID-77", "PID-88", "DOE", "A-9", "A-10", "Effusion"):
        assert identifier not in everything


def test_study_pictures_are_audited_per_picture(
    database: Database, make_client: ClientFactory, spool: Spool
) -> None:
    study = add_study(database)
    images = [add_image(database, spool, study, seed=i) for i in range(3)]
    analyse(database, study, {"Effusion": 0.2})
    client = make_client(database)
    login(client)
    start = last_id(database)
    for image in images:
        url = f"/studies/{study}/instances/{image.sop_instance_uid}/thumbnail.png"
        assert client.get(url).status_code == 200
    assert [r.detail["sop_instance_uid"] for r in reads(database, start)] == [
        i.sop_instance_uid for i in images
    ]
