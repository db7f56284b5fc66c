"""Roles and API tokens: /admin needs an admin (a radiologist gets 403), a token does only
what its scopes say (read-only by default; priority and status changes need
worklist:write), and an expired token gets 401 saying so. Time comes from an injected
clock."""

from __future__ import annotations

import datetime as dt
import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from web_helpers import (
    FAST_HASHER,
    PASSWORD,
    TOKEN,
    USER,
    api_headers,
    csrf_of,
    login,
    web_settings,
)
from worklist_factory import add_study

from ddn_node.config import ConfigError, load_settings
from ddn_node.dicom.spool import Spool
from ddn_node.store.audit import AuditEventName
from ddn_node.store.engine import Database
from ddn_node.store.models import AuditEvent
from ddn_node.web.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

ADMIN, ADMIN_PASSWORD = "officer", "another long passphrase"
READER, WRITER = "reader-token", "writer-token"
NOW = dt.datetime(2027, 3, 1, 12, 0, tzinfo=dt.UTC)


class Clock:
    """The time the app sees: set by the test, never read from the wall."""

    def __init__(self, now: dt.datetime):
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def token(name: str, secret: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "sha256": hashlib.sha256(secret.encode()).hexdigest(), **extra}


@pytest.fixture
def make_app(tmp_path: Path, spool: Spool) -> Callable[..., TestClient]:
    clients: list[TestClient] = []

    def factory(database: Database, clock: Callable[[], dt.datetime], **web: Any) -> TestClient:
        web.setdefault(
            "users",
            [
                {"name": USER, "password_hash": FAST_HASHER.hash(PASSWORD)},
                {
                    "name": ADMIN,
                    "password_hash": FAST_HASHER.hash(ADMIN_PASSWORD),
                    "role": "admin",
                },
            ],
        )
        settings = web_settings(tmp_path, database.engine.url.render_as_string(False), **web)
        client = TestClient(
            create_app(settings, database, spool, clock=clock), follow_redirects=False
        )
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


def test_admin_pages_need_the_admin_role(
    sqlite_database: Database, make_app: Callable[..., TestClient]
) -> None:
    clock = Clock(NOW)
    radiologist = make_app(sqlite_database, clock)
    admin = make_app(sqlite_database, clock)
    login(radiologist)
    login(admin, ADMIN, ADMIN_PASSWORD)

    for path in ("/admin/sessions", "/admin/audit.json", "/admin/conflicts", "/admin/not-yet"):
        refused = radiologist.get(path)
        assert refused.status_code == 403, path
        assert refused.json()["detail"] == "this needs a user with the admin role"
    assert admin.get("/admin/not-yet").status_code == 404  # past the role check: no such page
    # Nor can a token, whatever its scopes: admin work is done by a person, logged in.
    assert radiologist.get("/admin/audit.json", headers=api_headers()).status_code == 403
    csrf = csrf_of(radiologist.get("/").text)
    ended = radiologist.post("/admin/sessions/end", data={"csrf_token": csrf, "user": ADMIN})
    assert ended.status_code == 403
    assert admin.get("/").status_code == 200  # the radiologist ended nothing

    # The admin sees both sessions and ends the radiologist's: logged out everywhere.
    page = admin.get("/admin/sessions")
    assert page.status_code == 200
    assert page.text.count("<td>testclient</td>") == 2 and f"<td>{USER}</td>" in page.text
    csrf = csrf_of(page.text)
    assert admin.post("/admin/sessions/end", data={"user": USER}).status_code == 403  # no CSRF
    done = admin.post("/admin/sessions/end", data={"csrf_token": csrf, "user": USER})
    assert done.status_code == 303
    assert radiologist.get("/").status_code == 303  # back to the login form
    assert radiologist.get("/ui/worklist.json").status_code == 401
    assert admin.get("/").status_code == 200
    assert "(radiologist, 0 open)" in admin.get("/admin/sessions").text

    trail = admin.get(f"/admin/audit.json?event={AuditEventName.SESSIONS_ENDED}")
    assert trail.status_code == 200
    (event,) = trail.json()["events"]
    assert (event["actor"], event["detail"]) == (ADMIN, {"user": USER, "sessions": 1})
    with sqlite_database.read() as session:
        last = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc())).first()
        assert last is not None
        assert (last.event, last.actor) == (AuditEventName.AUDIT_READ, ADMIN)


def test_token_scopes(sqlite_database: Database, make_app: Callable[..., TestClient]) -> None:
    study = add_study(sqlite_database)
    client = make_app(
        sqlite_database,
        Clock(NOW),
        tokens=[
            token("dashboard", READER),  # no scopes given: read only
            token("ris", WRITER, scopes=["read", "worklist:write"]),
            token("pusher", TOKEN, scopes=["worklist:write"]),
        ],
    )
    change = {"priority": "STAT"}
    assert client.get("/api/worklist", headers=api_headers(READER)).status_code == 200
    assert client.get(f"/api/studies/{study}", headers=api_headers(READER)).status_code == 200
    refused = client.post(
        f"/api/studies/{study}/priority", json=change, headers=api_headers(READER)
    )
    assert refused.status_code == 403
    assert refused.json()["detail"] == (
        "this token's scopes ['read'] do not allow this: it needs 'worklist:write'"
    )
    status = client.post(
        f"/api/studies/{study}/status", json={"status": "read"}, headers=api_headers(READER)
    )
    assert status.status_code == 403
    shown = client.get(f"/api/studies/{study}", headers=api_headers(READER)).json()
    assert shown["study"]["priority"] != "STAT"  # the refused change did not happen

    done = client.post(f"/api/studies/{study}/priority", json=change, headers=api_headers(WRITER))
    assert done.status_code == 200 and done.json()["study"]["priority"] == "STAT"
    # Write without read: it may change, not look.
    assert client.get("/api/worklist", headers=api_headers(TOKEN)).status_code == 403
    cleared = client.post(
        f"/api/studies/{study}/priority", json={"priority": None}, headers=api_headers(TOKEN)
    )
    assert cleared.status_code == 200
    # Pages and form posts are for people: a token never gets past the CSRF check.
    assert client.get("/", headers=api_headers(READER)).status_code == 200
    form = client.post(
        f"/studies/{study}/status", data={"status": "read"}, headers=api_headers(WRITER)
    )
    assert form.status_code == 403


def test_expired_tokens_are_refused_with_a_clear_message(
    sqlite_database: Database, make_app: Callable[..., TestClient]
) -> None:
    clock = Clock(NOW - dt.timedelta(seconds=1))
    local_midnight = dt.datetime(2027, 4, 1).astimezone()  # a date: local midnight
    client = make_app(
        sqlite_database,
        clock,
        tokens=[
            token("ris", TOKEN, expires=NOW),
            token("pilot", READER, expires=dt.date(2027, 4, 1)),
        ],
    )
    assert client.get("/api/worklist", headers=api_headers()).status_code == 200
    clock.now = NOW
    expired = client.get("/api/worklist", headers=api_headers())
    assert expired.status_code == 401
    assert expired.json()["detail"] == (
        "this API token (ris) expired at 2027-03-01T12:00:00+00:00; "
        "ask the node's administrator for a new one"
    )
    # Not on a page either.
    assert client.get("/metrics", headers=api_headers()).status_code == 401

    clock.now = local_midnight - dt.timedelta(microseconds=1)
    assert client.get("/api/worklist", headers=api_headers(READER)).status_code == 200
    clock.now = local_midnight
    assert "expired" in client.get("/api/worklist", headers=api_headers(READER)).json()["detail"]
    # An unknown token still gets the plain answer (nothing said about which exist).
    unknown = client.get("/api/worklist", headers=api_headers("guess"))
    assert unknown.status_code == 401 and "expired" not in unknown.json()["detail"]


def test_scopes_and_expiry_in_the_configuration_file(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    config = tmp_path / "node.toml"
    config.write_text(
        f"""
[[web.tokens]]
name = "dashboard"
sha256 = "{digest}"
expires = 2027-04-01

[[web.tokens]]
name = "ris"
sha256 = "{digest}"
scopes = ["read", "worklist:write"]
expires = 2027-04-01T08:30:00Z
"""
    )
    dashboard, ris = load_settings(config, environ={}).web.tokens
    assert dashboard.scopes == ["read"] and ris.scopes == ["read", "worklist:write"]
    assert dashboard.expires_at() == dt.datetime(2027, 4, 1).astimezone()
    assert ris.expires_at() == dt.datetime(2027, 4, 1, 8, 30, tzinfo=dt.UTC)

    config.write_text(f'[[web.tokens]]\nname = "x"\nsha256 = "{digest}"\nscopes = ["admin"]\n')
    with pytest.raises(ConfigError, match=r"web\.tokens\[0\]\.scopes"):
        load_settings(config, environ={})
