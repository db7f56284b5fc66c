"""Engine and session set-up: SQLite (WAL, durable commits) by default, PostgreSQL by URL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


@dataclass(frozen=True)
class Database:
    """An engine and its session factory; one per process."""

    engine: Engine
    sessions: sessionmaker[Session]
    readers: sessionmaker[Session]
    # SQLite has one writer at a time, and a writer that finds the lock taken sleeps in
    # growing steps (1, 2, 5 ... 100 ms) before it retries: with four associations storing
    # at once most of the time went to those sleeps. Threads of one process queue here
    # instead and are woken the moment the lock is free. Other processes still meet
    # busy_timeout.
    write_lock: threading.RLock | None = field(default=None, compare=False)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any exception."""
        with self.write_lock or nullcontext(), self.sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for queries only (on SQLite it never takes the write lock)."""
        # Closing (not rolling back) ends the transaction without expiring loaded objects.
        with self.readers() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
        self.readers.kw["bind"].dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets the web part read while the SCP writes; synchronous=FULL makes a commit
    # durable before we answer 0x0000 (NORMAL may lose the last commits on power loss).
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    # Take the write lock at BEGIN so two writers never deadlock upgrading read locks
    # (SQLite answers SQLITE_BUSY at once then, ignoring busy_timeout).
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_database(url: str, *, pool_size: int = 5, echo: bool = False) -> Database:
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": 30, "isolation_level": None},
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        # WAL readers never block the writer, so reads get their own deferred-BEGIN engine.
        reader = create_engine(
            url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30}
        )
        event.listen(reader, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(
            url,
            echo=echo,
            pool_size=pool_size,
            max_overflow=pool_size * 2,
            # After a PostgreSQL restart, stale pooled connections are detected and replaced.
            pool_pre_ping=True,
        )
        reader = engine
    return Database(
        engine=engine,
        sessions=sessionmaker(engine, expire_on_commit=False),
        readers=sessionmaker(reader, expire_on_commit=False),
        write_lock=threading.RLock() if engine.dialect.name == "sqlite" else None,
    )
