"""Sessions live in the database: a logged-out cookie stays refused after a restart (a new
app on the same database, as ``ddn-node serve`` starting again builds) and in every other
process at once; the table never holds a usable session id."""

from __future__ import annotations

import warnings
from pathlib import Path

from sqlalchemy import select
from web_helpers import USER, csrf_of, login, web_settings

from ddn_node.config import Settings
from ddn_node.dicom.spool import Spool
from ddn_node.store.audit import AuditEventName
from ddn_node.store.engine import Database
from ddn_node.store.models import AuditEvent, WebSession
from ddn_node.web.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def node_app(settings: Settings, database: Database, spool: Spool) -> TestClient:
    """A fresh app: its own Auth, nothing shared in memory with any other."""
    return TestClient(create_app(settings, database, spool), follow_redirects=False)


def test_logged_out_cookie_stays_refused_after_a_restart_and_in_other_processes(
    database: Database, spool: Spool, tmp_path: Path
) -> None:
    url = database.engine.url.render_as_string(hide_password=False)
    settings = web_settings(tmp_path, url)
    first, other = node_app(settings, database, spool), node_app(settings, database, spool)
    assert login(first).status_code == 303
    cookie = first.cookies.get("ddn_session")
    assert cookie

    # Another process of the node (a second web instance) accepts the session ...
    other.cookies.set("ddn_session", cookie)
    assert other.get("/").status_code == 200
    # ... until it ends in the first: refused there at once, without a restart.
    page = first.get("/")
    assert first.post("/logout", data={"csrf_token": csrf_of(page.text)}).status_code == 303
    assert other.get("/").status_code == 303
    assert other.get("/ui/worklist.json").status_code == 401

    # The node restarts: a new app over the same database refuses the replayed cookie.
    first.close()
    other.close()
    restarted = node_app(settings, database, spool)
    restarted.cookies.set("ddn_session", cookie)
    assert restarted.get("/").status_code == 303
    assert restarted.get("/ui/worklist.json").status_code == 401

    # A session that was not ended survives the restart (same secret_key).
    second = node_app(settings, database, spool)
    assert login(second).status_code == 303
    kept = second.cookies.get("ddn_session")
    second.close()
    again = node_app(settings, database, spool)
    again.cookies.set("ddn_session", kept)
    assert again.get("/").status_code == 200

    with database.read() as session:
        rows = session.execute(
            select(WebSession.user, WebSession.ended_by, WebSession.sid_sha256)
        ).all()
        logouts = session.scalars(
            select(AuditEvent.actor).where(AuditEvent.event == AuditEventName.USER_LOGOUT)
        ).all()
    assert sorted((r.user, r.ended_by) for r in rows) == [(USER, ""), (USER, USER)]
    assert logouts == [USER]
    # Only hashes of session ids: no cookie's id is in the table.
    for value in (cookie, kept):
        assert not any(r.sid_sha256 in value for r in rows)
        assert all(len(r.sid_sha256) == 64 for r in rows)
    restarted.close()
    again.close()


def test_a_forged_session_id_without_a_row_is_refused(
    sqlite_database: Database, spool: Spool, tmp_path: Path
) -> None:
    """A cookie signed with the right key but naming no session (the signing key leaked, or
    a session deleted when it expired) opens nothing."""
    settings = web_settings(tmp_path, "sqlite://")
    client = node_app(settings, sqlite_database, spool)
    forged = client.app.state.auth._sessions.dumps(  # type: ignore[attr-defined]
        {"u": USER, "sid": "made-up", "csrf": "x"}
    )
    client.cookies.set("ddn_session", forged)
    assert client.get("/").status_code == 303
    with sqlite_database.read() as session:
        assert session.scalar(select(WebSession.id)) is None
    client.close()
