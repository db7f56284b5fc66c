"""Engine and session set-up: SQLite (WAL, durable commits) by default, PostgreSQL by URL."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import Connection, Engine, RootTransaction, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


class WriteLock:
    """One writer at a time to a SQLite file, across this process's threads and, through
    an flock() on a file beside the database, across processes (several SCP processes,
    a worker, the web part).

    SQLite's own busy handler makes a writer that finds the lock taken sleep in growing
    steps (1, 2, 5 ... 100 ms) before it retries; waiting in flock() instead, a writer is
    woken by the kernel the moment the previous one is done. Re-entrant within a thread
    (a session opened inside another), like the RLock it extends.
    """

    def __init__(self, path: Path | None):
        self._thread = threading.RLock()
        self._depth = 0  # changed only by the thread holding _thread
        self._fd: int | None = None
        if path is not None:
            self._fd = os.open(f"{path}.write-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def __enter__(self) -> WriteLock:
        self._thread.acquire()
        self._depth += 1
        if self._depth == 1 and self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._depth -= 1
                self._thread.release()
                raise
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread.release()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class Database:
    """An engine and its session factory; one per process."""

    engine: Engine
    sessions: sessionmaker[Session]
    readers: sessionmaker[Session]
    # SQLite has one writer at a time, and a writer that finds the lock taken sleeps in
    # growing steps (1, 2, 5 ... 100 ms) before it retries: with four associations storing
    # at once most of the time went to those sleeps. Threads of one process queue here
    # instead and are woken the moment the lock is free, and so do other processes of
    # the node on the same file (WriteLock); anything else writing to it still meets
    # busy_timeout.
    write_lock: WriteLock | None = field(default=None, compare=False)

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
    def transaction(self) -> Iterator[tuple[Connection, RootTransaction]]:
        """A core connection in a transaction (no ORM session), under the write lock:
        committed on success unless rolled back, rolled back on any exception."""
        with (
            self.write_lock or nullcontext(),
            self.engine.connect() as connection,
            connection.begin() as transaction,
        ):
            yield connection, transaction

    @contextmanager
    def rolled_back(self) -> Iterator[Session]:
        """A writing session that is always rolled back (to warm caches up, or to try)."""
        with self.write_lock or nullcontext(), self.sessions() as session:
            try:
                yield session
            finally:
                session.rollback()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for queries only (on SQLite it never takes the write lock)."""
        # Closing (not rolling back) ends the transaction without expiring loaded objects.
        with self.readers() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
        self.readers.kw["bind"].dispose()
        if self.write_lock is not None:
            self.write_lock.close()


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
    lock_path: Path | None = None
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if url.startswith("sqlite:///"):  # a file ("sqlite://" alone is in memory)
                lock_path = Path(path)
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
        write_lock=WriteLock(lock_path) if engine.dialect.name == "sqlite" else None,
    )
