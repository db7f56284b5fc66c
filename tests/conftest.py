"""Shared fixtures. Real data comes from ../shared/data (or $DDN_DATA); tests that need it
skip with a clear reason when it is absent, so the suite still passes elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DDN_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real test data (NIH images, real DICOM files)."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set DDN_DATA)")
    return SHARED_DATA


# -- databases and nodes --------------------------------------------------------------

from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

from support.databases import postgres_available, throwaway_database  # noqa: E402
from support.node import NodeProcess, base_config, deep_merge  # noqa: E402

from ddn_node.store.engine import Database, make_database  # noqa: E402
from ddn_node.store.migrate import upgrade  # noqa: E402


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind: the same test runs on SQLite and PostgreSQL."""
    if request.param == "postgres" and not postgres_available():
        pytest.skip("PostgreSQL not reachable on 127.0.0.1:5432")
    with throwaway_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ddn.sqlite'}"


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    if not postgres_available():
        pytest.skip("PostgreSQL not reachable on 127.0.0.1:5432")
    with throwaway_database("postgres", tmp_path) as url:
        yield url


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    """A migrated database of each kind, disposed of after the test."""
    db = make_database(db_url)
    upgrade(db)
    yield db
    db.dispose()


@pytest.fixture
def db(database: Database) -> Database:
    """The same, under the shorter name the store tests use."""
    return database


NodeFactory = Callable[..., NodeProcess]


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[NodeFactory]:
    """Build (not start) node subprocesses; every one is stopped at the end of the test."""
    made: list[NodeProcess] = []

    def factory(
        db_url: str, roles: tuple[str, ...] = ("scp",), name: str = "node", **overrides: Any
    ) -> NodeProcess:
        home = tmp_path / name
        home.mkdir(parents=True, exist_ok=True)
        config = deep_merge(base_config(home, db_url), overrides)
        node = NodeProcess(home, config, roles)
        made.append(node)
        return node

    yield factory
    for node in made:
        try:
            node.stop()
        except Exception:  # noqa: BLE001 - best effort at teardown
            node.kill()
