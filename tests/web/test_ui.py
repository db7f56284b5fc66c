"""The pages for people: login, CSRF, rate limiting, escaping, the study page, the live feed."""

from __future__ import annotations

import datetime as dt
import html
from pathlib import Path

import pytest
from sqlalchemy import select
from web_helpers import PASSWORD, USER, ClientFactory, api_headers, csrf_of, login
from worklist_factory import (
    LABELS,
    add_image,
    add_study,
    analyse,
    write_manifest,
    write_overlay_png,
)

from ddn_node.dicom.spool import Spool
from ddn_node.store.audit import AuditEventName
from ddn_node.store.engine import Database
from ddn_node.store.models import AuditEvent, Study, WorklistEvent

HOSTILE = "<script>alert(1)</script>"


def audit_events(database: Database, name: str) -> list[tuple[str, str, str]]:
    with database.read() as session:
        rows = session.execute(
            select(AuditEvent.actor, AuditEvent.host, AuditEvent.outcome).where(
                AuditEvent.event == name
            )
        ).all()
    return [tuple(r) for r in rows]


def test_pages_need_a_login_and_logins_are_audited(
    sqlite_database: Database, make_client: ClientFactory
) -> None:
    client = make_client(sqlite_database)
    page = client.get("/?order=arrival")
    assert (
        page.status_code == 303 and page.headers["location"] == "/login?next=%2F%3Forder%3Darrival"
    )
    assert client.get("/ui/worklist.json").status_code == 401
    assert client.get("/studies/1.2.3").status_code == 303

    wrong = login(client, password="not it")
    assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
    assert login(client, user="nobody").status_code == 401
    assert "ddn_session" not in client.cookies
    ok = login(client)
    assert ok.status_code == 303 and ok.headers["location"] == "/"
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert client.get("/").status_code == 200
    assert audit_events(sqlite_database, AuditEventName.USER_LOGIN_FAILED) == [
        (USER, "testclient", "failure"),
        ("nobody", "testclient", "failure"),
    ]
    assert audit_events(sqlite_database, AuditEventName.USER_LOGIN) == [
        (USER, "testclient", "success")
    ]

    # Log out: the old cookie no longer opens the worklist, even replayed.
    old = client.cookies.get("ddn_session")
    page = client.get("/")
    assert client.post("/logout", data={"csrf_token": csrf_of(page.text)}).status_code == 303
    client.cookies.set("ddn_session", old)
    assert client.get("/").status_code == 303


def test_login_form_refuses_offsite_next_and_missing_csrf(
    sqlite_database: Database, make_client: ClientFactory
) -> None:
    client = make_client(sqlite_database)
    form = client.get("/login?next=//evil.example/x")
    assert 'name="next" value="/"' in form.text
    # No pre-login cookie / token: refused before the password is even checked.
    client.cookies.clear()
    response = client.post("/login", data={"username": USER, "password": PASSWORD, "next": "/"})
    assert response.status_code == 403
    assert "ddn_session" not in client.cookies


def test_login_rate_limit_per_client(sqlite_database: Database, make_client: ClientFactory) -> None:
    client = make_client(sqlite_database, login_rate_per_minute=3)
    for _ in range(3):
        assert login(client, password="guess").status_code == 401
    limited = login(client)  # the right password, but too many attempts this minute
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert "ddn_session" not in client.cookies
    # Refused attempts are not audited as password failures (nothing was checked).
    assert len(audit_events(sqlite_database, AuditEventName.USER_LOGIN_FAILED)) == 3


def test_forms_need_the_csrf_token(sqlite_database: Database, make_client: ClientFactory) -> None:
    study = add_study(sqlite_database)
    client = make_client(sqlite_database)
    login(client)
    page = client.get("/")
    token = csrf_of(page.text)
    assert token
    for data, headers in (
        ({"status": "read"}, {}),
        ({"status": "read", "csrf_token": "forged"}, {}),
        ({"status": "read"}, {"X-CSRF-Token": "forged"}),
        ({"status": "read", "csrf_token": token}, {"Origin": "https://evil.example"}),
    ):
        refused = client.post(f"/studies/{study}/status", data=data, headers=headers)
        assert refused.status_code == 403, (data, headers)
    assert client.post(f"/studies/{study}/priority", data={"priority": "STAT"}).status_code == 403
    assert client.post("/logout", data={}).status_code == 403
    # A bearer token holder has no CSRF token: forms are for sessions.
    fresh = make_client(sqlite_database)
    assert (
        fresh.post(
            f"/studies/{study}/status", data={"status": "read"}, headers=api_headers()
        ).status_code
        == 403
    )
    with sqlite_database.read() as session:
        assert session.execute(select(Study.read_status)).scalar_one() == "unread"
        assert session.execute(select(WorklistEvent)).first() is None

    done = client.post(
        f"/studies/{study}/status",
        data={"status": "read", "csrf_token": token, "next": "/?order=arrival"},
    )
    assert done.status_code == 303 and done.headers["location"] == "/?order=arrival"
    via_fetch = client.post(
        f"/studies/{study}/priority",
        data={"priority": "HIGH"},
        headers={"X-CSRF-Token": token, "X-Requested-With": "fetch"},
    )
    assert via_fetch.status_code == 200 and via_fetch.json()["study"]["priority"] == "HIGH"
    offsite = client.post(
        f"/studies/{study}/status",
        data={"status": "unread", "csrf_token": token, "next": "https://evil.example/"},
    )
    assert offsite.headers["location"] == f"/studies/{study}"
    with sqlite_database.read() as session:
        events = session.execute(
            select(WorklistEvent.user, WorklistEvent.action, WorklistEvent.value)
        ).all()
    assert [tuple(e) for e in events] == [
        (USER, "read", "read"),
        (USER, "override", "HIGH"),
        (USER, "unread", "unread"),
    ]


def test_hostile_names_render_as_text(
    sqlite_database: Database, make_client: ClientFactory, spool: Spool
) -> None:
    name = f"{HOSTILE}^<img src=x onerror=alert(2)>"
    description = f'"><{HOSTILE}'
    study = add_study(
        sqlite_database, patient_name=name, description=description, patient_id="<b>P1</b>"
    )
    analyse(sqlite_database, study, {"Mass": 0.8})
    client = make_client(sqlite_database)
    login(client)
    for page in (client.get("/"), client.get(f"/studies/{study}")):
        assert page.status_code == 200
        body = page.text
        assert "<script>alert" not in body and "<img src=x" not in body and "<b>P1</b>" not in body
        assert html.escape(HOSTILE) in body
        assert "&lt;b&gt;P1&lt;/b&gt;" in body
        assert "<script" not in body.replace('<script src="/static/worklist.js', "")
        # The browser is told not to run inline script even if something slipped through.
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["x-content-type-options"] == "nosniff"


def test_study_page_findings_images_deliveries_history(
    sqlite_database: Database, make_client: ClientFactory, spool: Spool, tmp_path: Path
) -> None:
    model_dir = write_manifest(tmp_path / "model")
    study = add_study(sqlite_database, patient_name="ROE^RICHARD")
    image = add_image(sqlite_database, spool, study)
    overlay = write_overlay_png(spool, study, "9.9.1")
    escaping = "../../../etc/passwd"
    analyse(
        sqlite_database,
        study,
        {"Effusion": 0.72, "Pneumothorax": 0.1},
        overlays={image.sop_instance_uid: {"Effusion": overlay, "Mass": escaping}},
        deliveries=[("pacs", "sr", "sent"), ("pacs", "sc", "failed")],
    )
    client = make_client(sqlite_database, model_dir=model_dir)
    login(client)
    page = client.get(f"/studies/{study}")
    assert page.status_code == 200
    text = page.text
    assert "ROE, RICHARD" in text
    assert (
        "Effusion" in text and "0.720" in text and "0.500" in text
    )  # probability and manifest threshold
    assert "present" in text and "absent" in text
    assert "DDN test model 2026.11.27-test" in text
    assert "0xA700" in text and "out of resources" in text
    detail = client.get(f"/api/studies/{study}", headers=api_headers()).json()
    findings = {f["label"]: f for f in detail["result"]["findings"]}
    assert findings["Effusion"] == {
        "label": "Effusion",
        "probability": 0.72,
        "threshold": 0.5,
        "present": True,
        "heat_map": "outlined",
    }
    assert findings["Pneumothorax"]["heat_map"] is None  # not reported: nothing to say
    assert (
        findings["Pneumothorax"]["present"] is False
        and findings["Pneumothorax"]["threshold"] == 0.4
    )
    assert len(findings) == len(LABELS)
    assert [(d["kind"], d["state"]) for d in detail["deliveries"]] == [
        ("sr", "sent"),
        ("sc", "failed"),
    ]
    (img,) = detail["images"]
    assert img["sop_instance_uid"] == image.sop_instance_uid and img["analysed"] is True

    thumb = client.get(img["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert thumb.content.startswith(b"\x89PNG")
    overlay_url = next(o["url"] for o in img["overlays"] if o["label"] == "Effusion")
    assert overlay_url in text
    shown = client.get(overlay_url)
    assert shown.status_code == 200 and shown.content.startswith(b"\x89PNG")
    assert client.get(overlay_url + "?full=1").status_code == 200
    # A stored path that leaves the spool is refused, and an unknown label is simply absent.
    mass = next(o["url"] for o in img["overlays"] if o["label"] == "Mass")
    assert client.get(mass).status_code == 404
    assert client.get(overlay_url.replace("Effusion", "Nodule")).status_code == 404
    assert client.get(f"/studies/{study}/instances/1.2.3/thumbnail.png").status_code == 404
    # Images need a login (or a token) like everything else.
    anonymous = make_client(sqlite_database)
    assert anonymous.get(overlay_url).status_code == 401
    assert anonymous.get(overlay_url, headers=api_headers()).status_code == 200

    client.post(f"/studies/{study}/status", data={"status": "opened", "csrf_token": csrf_of(text)})
    history = client.get(f"/studies/{study}").text
    assert "marked opened" in history and USER in history
    assert client.get("/studies/9.9.9.9").status_code == 404


def test_live_feed_answers_304_until_the_list_changes(
    sqlite_database: Database, make_client: ClientFactory
) -> None:
    normal = add_study(sqlite_database, received_ago=dt.timedelta(minutes=30))
    analyse(sqlite_database, normal, {"Mass": 0.1})
    waiting = add_study(sqlite_database, received_ago=dt.timedelta(minutes=1))
    client = make_client(sqlite_database)
    login(client)
    first = client.get("/ui/worklist.json")
    assert first.status_code == 200
    assert [r["study_uid"] for r in first.json()["rows"]] == [normal, waiting]
    etag = first.headers["etag"]
    assert client.get("/ui/worklist.json", headers={"If-None-Match": etag}).status_code == 304
    analyse(sqlite_database, waiting, {"Pneumothorax": 0.95})
    changed = client.get("/ui/worklist.json", headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert [r["study_uid"] for r in changed.json()["rows"]] == [waiting, normal]
    # The feed takes the page's own query string; unknown values fall back to defaults.
    assert (
        client.get("/ui/worklist.json?order=arrival&priority=nonsense").json()["rows"][0][
            "study_uid"
        ]
        == normal
    )


def test_metrics_are_computed_from_the_database(
    sqlite_database: Database, make_client: ClientFactory, spool: Spool
) -> None:
    a = add_study(sqlite_database)
    add_image(sqlite_database, spool, a)
    analyse(
        sqlite_database,
        a,
        {"Pneumothorax": 0.9},
        timings_ms={"model_ms": 40.0, "total_ms": 130.0},
        deliveries=[("pacs", "sr", "failed"), ("pacs", "sc", "sent")],
    )
    b = add_study(sqlite_database)
    analyse(sqlite_database, b, {"Mass": 0.1}, timings_ms={"model_ms": 300.0, "total_ms": 900.0})
    add_study(sqlite_database)  # queued, no job row: the queue depth counts jobs
    client = make_client(sqlite_database)
    response = client.get("/metrics", headers=api_headers())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = set(response.text.splitlines())
    for expected in (
        "ddn_instances_received 1.0",
        'ddn_studies{state="analysed"} 2.0',
        'ddn_studies{state="queued"} 1.0',
        'ddn_studies_analysed{priority="STAT"} 1.0',
        'ddn_queue_depth{state="queued"} 0.0',
        'ddn_inference_seconds_bucket{le="0.05"} 1.0',
        'ddn_inference_seconds_bucket{le="0.25"} 1.0',
        'ddn_inference_seconds_bucket{le="0.5"} 2.0',
        "ddn_inference_seconds_count 2.0",
        'ddn_analysis_seconds_bucket{le="1.0"} 2.0',
        'ddn_deliveries{state="failed"} 1.0',
        'ddn_delivery_failures{kind="given_up"} 1.0',
        'ddn_worklist_unread{priority="STAT"} 1.0',
        "ddn_database_up 1.0",
    ):
        assert expected in lines, expected
    sums = dict(line.split(" ") for line in lines if "_seconds_sum" in line)
    assert float(sums["ddn_inference_seconds_sum"]) == pytest.approx(0.34)
    assert float(sums["ddn_analysis_seconds_sum"]) == pytest.approx(1.03)
    # A logged-in person may look too (the link from an admin's browser).
    login(client)
    assert client.get("/metrics").status_code == 200
