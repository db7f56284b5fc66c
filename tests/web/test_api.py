"""The JSON API on SQLite and PostgreSQL: order, filters, changes, access, hostile names."""

from __future__ import annotations

import datetime as dt

import httpx
from sqlalchemy import select
from web_helpers import OTHER_TOKEN, TOKEN, ClientFactory, api_headers, login
from worklist_factory import add_study, analyse

from ddn_node.store.audit import AuditEventName
from ddn_node.store.engine import Database
from ddn_node.store.models import AuditEvent, Study, WorklistEvent

HOSTILE = "<script>alert(1)</script>"


def uids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [row["study_uid"] for row in response.json()["rows"]]


def test_priority_order_arrival_order_filters_and_pages(
    database: Database, make_client: ClientFactory
) -> None:
    m = dt.timedelta(minutes=1)
    # Arrival order (oldest first): routine, waiting, high_low, stat, high_top, dx, read.
    routine = add_study(database, received_ago=60 * m, modalities="CR")
    waiting = add_study(database, received_ago=50 * m, modalities="CR")
    high_low = add_study(database, received_ago=40 * m, modalities="CR\\DX")
    stat = add_study(database, received_ago=30 * m, modalities="DX")
    high_top = add_study(database, received_ago=20 * m, modalities="CR")
    dx_routine = add_study(database, received_ago=10 * m, modalities="DX")
    read = add_study(database, received_ago=5 * m, modalities="CR", read_status="read")
    analyse(database, routine, {"Mass": 0.30})
    analyse(database, high_low, {"Effusion": 0.60})
    analyse(database, stat, {"Pneumothorax": 0.45, "Effusion": 0.2})
    analyse(database, high_top, {"Mass": 0.90})
    analyse(database, dx_routine, {"Atelectasis": 0.10})
    analyse(database, read, {"Mass": 0.99})
    client = make_client(database)
    h = api_headers()

    # STAT, then HIGH by score, then ROUTINE by score, the not-analysed study last in the
    # ROUTINE band; read studies are off the default (unread) list.
    assert uids(client.get("/api/worklist", headers=h)) == [
        stat,
        high_top,
        high_low,
        routine,
        dx_routine,
        waiting,
    ]
    rows = client.get("/api/worklist", headers=h).json()["rows"]
    assert [r["priority"] for r in rows] == [
        "STAT",
        "HIGH",
        "HIGH",
        "ROUTINE",
        "ROUTINE",
        "NOT_ANALYSED",
    ]
    assert rows[0]["why"].startswith("STAT: critical finding: Pneumothorax 0.45 >= 0.40")
    assert rows[0]["top_findings"][0] == {"label": "Pneumothorax", "probability": 0.45}
    assert rows[-1]["abnormality_score"] is None and rows[-1]["status_text"].startswith(
        "not analysed: queued"
    )

    assert uids(client.get("/api/worklist?order=arrival", headers=h)) == [
        routine,
        waiting,
        high_low,
        stat,
        high_top,
        dx_routine,
    ]
    assert uids(client.get("/api/worklist?unread=false", headers=h))[:2] == [stat, read]
    # Modality matches a whole element of "CR\DX", never a prefix.
    assert set(uids(client.get("/api/worklist?modality=DX", headers=h))) == {
        high_low,
        stat,
        dx_routine,
    }
    assert uids(client.get("/api/worklist?modality=D", headers=h)) == []
    assert uids(client.get("/api/worklist?priority=HIGH", headers=h)) == [high_top, high_low]
    assert uids(client.get("/api/worklist?priority=NOT_ANALYSED", headers=h)) == [waiting]

    first = client.get("/api/worklist?limit=2", headers=h).json()
    second = client.get("/api/worklist?limit=2&offset=2", headers=h).json()
    assert first["total"] == second["total"] == 6 and first["total_exact"]
    assert [r["study_uid"] for r in first["rows"] + second["rows"]] == [
        stat,
        high_top,
        high_low,
        routine,
    ]
    assert client.get("/api/worklist?order=sideways", headers=h).status_code == 422
    assert client.get("/api/worklist?limit=100000", headers=h).status_code == 422


def test_override_and_status_are_recorded_and_win(
    database: Database, make_client: ClientFactory
) -> None:
    stat = add_study(database, received_ago=dt.timedelta(minutes=30))
    routine = add_study(database, received_ago=dt.timedelta(minutes=20))
    analyse(database, stat, {"Pneumothorax": 0.9})
    analyse(database, routine, {"Mass": 0.2})
    client = make_client(database)
    h = api_headers()

    done = client.post(f"/api/studies/{routine}/priority", json={"priority": "STAT"}, headers=h)
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["changed"] is True
    assert body["study"]["priority"] == "STAT" and body["study"]["model_priority"] == "ROUTINE"
    assert body["study"]["why"].startswith("STAT: set by hand")
    # Both STAT now; the override's study has the lower score, so it comes second...
    assert uids(client.get("/api/worklist", headers=h)) == [stat, routine]
    # ...until the real STAT is overridden down: the override wins over triage.
    client.post(f"/api/studies/{stat}/priority", json={"priority": "ROUTINE"}, headers=h)
    assert uids(client.get("/api/worklist", headers=h)) == [routine, stat]
    assert uids(client.get("/api/worklist?priority=STAT", headers=h)) == [routine]
    assert client.post(f"/api/studies/{stat}/priority", json={"priority": None}, headers=h).json()[
        "changed"
    ]
    again = client.post(f"/api/studies/{stat}/priority", json={"priority": None}, headers=h).json()
    assert again["changed"] is False  # nothing to clear: not recorded twice
    assert uids(client.get("/api/worklist", headers=h)) == [stat, routine]

    assert (
        client.post(
            f"/api/studies/{stat}/priority", json={"priority": "NOT_ANALYSED"}, headers=h
        ).status_code
        == 422
    )
    assert (
        client.post(
            f"/api/studies/{stat}/priority", json={"priority": "SOON"}, headers=h
        ).status_code
        == 422
    )
    assert (
        client.post("/api/studies/9.9.9/priority", json={"priority": "STAT"}, headers=h).status_code
        == 404
    )

    read = client.post(
        f"/api/studies/{stat}/status", json={"status": "read"}, headers=api_headers(OTHER_TOKEN)
    )
    assert read.status_code == 200 and read.json()["study"]["read_status"] == "read"
    assert uids(client.get("/api/worklist", headers=h)) == [routine]
    assert (
        client.post(f"/api/studies/{stat}/status", json={"status": "read"}, headers=h).json()[
            "changed"
        ]
        is False
    )
    assert (
        client.post(f"/api/studies/{stat}/status", json={"status": "done"}, headers=h).status_code
        == 422
    )

    with database.read() as session:
        events = session.execute(
            select(Study.study_uid, WorklistEvent.user, WorklistEvent.action, WorklistEvent.value)
            .join(Study, WorklistEvent.study_id == Study.id)
            .order_by(WorklistEvent.id)
        ).all()
        audits = session.execute(
            select(AuditEvent.actor, AuditEvent.study_uid, AuditEvent.detail)
            .where(AuditEvent.event == AuditEventName.WORKLIST_CHANGED)
            .order_by(AuditEvent.id)
        ).all()
    assert [tuple(e) for e in events] == [
        (routine, "token:ris", "override", "STAT"),
        (stat, "token:ris", "override", "ROUTINE"),
        (stat, "token:ris", "override", ""),
        (stat, "token:other", "read", "read"),
    ]
    assert [(a.actor, a.study_uid, a.detail["action"], a.detail["value"]) for a in audits] == [
        (e.user, e.study_uid, e.action, e.value) for e in events
    ]
    history = client.get(f"/api/studies/{stat}", headers=h).json()["history"]
    assert [(e["user"], e["action"], e["value"]) for e in history] == [
        ("token:other", "read", "read"),
        ("token:ris", "override", ""),
        ("token:ris", "override", "ROUTINE"),
    ]


def test_every_api_call_needs_a_valid_token(database: Database, make_client: ClientFactory) -> None:
    study = add_study(database)
    client = make_client(database)
    calls = [
        ("GET", "/api/worklist", None),
        ("GET", "/api/worklist?order=sideways", None),  # invalid too: still 401 first
        ("GET", f"/api/studies/{study}", None),
        ("POST", f"/api/studies/{study}/status", {"status": "read"}),
        ("POST", f"/api/studies/{study}/priority", {"priority": "STAT"}),
        ("POST", f"/api/studies/{study}/status", "{not json"),
        ("POST", f"/api/studies/{study}/feedback", {"missed": ["Mass"]}),
        ("GET", "/api/no-such-thing", None),
        ("DELETE", f"/api/studies/{study}", None),
    ]
    bad_credentials = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer "},
        # The sha256 itself is not a token (the config holds hashes, not secrets).
        {"Authorization": "Bearer " + __import__("hashlib").sha256(TOKEN.encode()).hexdigest()},
    ]
    for method, url, body in calls:
        for headers in bad_credentials:
            kwargs = {"content": body} if isinstance(body, str) else {"json": body}
            response = client.request(method, url, headers=headers, **kwargs)
            assert response.status_code == 401, (method, url, headers, response.status_code)
            assert response.headers["www-authenticate"].startswith("Bearer")
    # A UI session is not an API credential.
    assert login(client).status_code == 303
    assert client.get("/api/worklist").status_code == 401
    client.cookies.clear()

    assert client.get("/healthz").status_code == 200
    assert client.get("/healthz").json() == {"status": "ok", "database": "ok"}
    assert client.get("/metrics").status_code == 401
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/api/no-such-thing", headers=api_headers()).status_code == 404
    openapi = client.get("/openapi.json", headers=api_headers()).json()
    assert set(openapi["paths"]) == {
        "/api/worklist",
        "/api/studies/{study_uid}",
        "/api/studies/{study_uid}/status",
        "/api/studies/{study_uid}/priority",
        "/api/studies/{study_uid}/feedback",
    }
    assert openapi["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    with database.read() as session:
        assert session.execute(select(Study.read_status, Study.priority_override)).one() == (
            "unread",
            None,
        )


def test_hostile_names_are_plain_data_in_json(
    database: Database, make_client: ClientFactory
) -> None:
    name = f"{HOSTILE}^<img src=x onerror=alert(2)>"
    study = add_study(database, patient_name=name, description=f'"><{HOSTILE}', patient_id="Ж-1&2")
    analyse(database, study, {"Mass": 0.8})
    client = make_client(database)
    row = client.get("/api/worklist", headers=api_headers()).json()["rows"][0]
    assert row["patient_name"] == name
    assert row["study_description"] == f'"><{HOSTILE}'
    assert row["patient_id"] == "Ж-1&2"
    detail = client.get(f"/api/studies/{study}", headers=api_headers())
    assert detail.headers["content-type"] == "application/json"
    assert detail.json()["study"]["patient_name"] == name
