"""Fixtures for the web tests: the app built in-process over a migrated database."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from web_helpers import web_settings

from ddn_node.dicom.spool import Spool
from ddn_node.store.engine import Database, make_database
from ddn_node.store.migrate import upgrade

with warnings.catch_warnings():
    # Starlette suggests httpx2 for its TestClient; httpx is what the project pins.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.fixture
def sqlite_database(sqlite_url: str) -> Iterator[Database]:
    db = make_database(sqlite_url)
    upgrade(db)
    yield db
    db.dispose()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    return spool


ClientFactory = Callable[..., TestClient]


@pytest.fixture
def make_client(tmp_path: Path, spool: Spool) -> Iterator[ClientFactory]:
    """Build the app over a database and return a TestClient (closed at the end)."""
    from ddn_node.web.app import create_app

    clients: list[TestClient] = []

    def factory(database: Database, model_dir: Path | None = None, **web: Any) -> TestClient:
        settings = web_settings(
            tmp_path, database.engine.url.render_as_string(hide_password=False), model_dir, **web
        )
        client = TestClient(create_app(settings, database, spool), follow_redirects=False)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()
