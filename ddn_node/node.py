"""The node composed: the parts each role runs, started and stopped together.

Roles: ``scp`` (DICOM listener + completion timers), ``worker`` (completion sweeps,
analysis, delivery), ``web`` (worklist UI and API). All three together are the embedded
default on SQLite. Heavy parts (torch for the worker) are imported only by the roles that
need them, so an SCP-only process stays small. ``ddn-node serve`` (cli/serve.py) and the
demo (demo/run.py) both start the node here.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pydicom.config
import structlog

from ddn_node.config import Settings
from ddn_node.dicom.scp import StorageSCP
from ddn_node.dicom.spool import Spool
from ddn_node.pipeline.completion import CompletionTracker
from ddn_node.pipeline.routing import selects
from ddn_node.pipeline.scheduler import NodeScheduler
from ddn_node.store.engine import Database, make_database
from ddn_node.store.migrate import current_revision, head_revision, upgrade

log = structlog.get_logger("ddn_node.serve")

ROLES = ("scp", "worker", "web")


class StartupError(RuntimeError):
    """The node cannot start; the message says what to do."""


def open_database(settings: Settings) -> Database:
    """Open the database; migrate SQLite automatically, require PostgreSQL to be migrated."""
    db = make_database(
        settings.database.url, pool_size=settings.database.pool_size, echo=settings.database.echo
    )
    if db.is_postgres:
        current, head = current_revision(db), head_revision()
        if current != head:
            db.dispose()
            raise StartupError(
                f"database schema is at {current or 'nothing'}, the code needs {head}: "
                "run 'ddn-node db upgrade --config ...' first"
            )
    else:
        upgrade(db)
    return db


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Node:
    """A running node: the parts of the requested roles, started and stopped together."""

    settings: Settings
    roles: frozenset[str]
    database: Database
    spool: Spool
    scheduler: NodeScheduler
    scp: StorageSCP | None = None
    ports: list[int] = field(default_factory=list)
    stoppers: list[Callable[[], Any]] = field(default_factory=list)
    shutdown_requested: threading.Event = field(default_factory=threading.Event)
    worker_ready: threading.Event = field(default_factory=threading.Event)
    failure: str | None = None
    _stopped: bool = False

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for stop in reversed(self.stoppers):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - stopping must go on for the other parts
                log.error("serve.stop_failed", error=repr(exc))
        self.database.dispose()
        log.info("serve.stopped")


def start_node(
    settings: Settings,
    roles: frozenset[str] = frozenset(ROLES),
    shutdown: threading.Event | None = None,
) -> Node:
    # Real headers break VR rules all the time; the node stores them as they came.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    unknown = roles - set(ROLES)
    if unknown:
        raise StartupError(f"unknown role(s) {sorted(unknown)}; choose from {ROLES}")
    database = open_database(settings)
    spool = Spool(settings.node.spool_dir)
    removed = spool.prepare()
    if removed:
        log.info("serve.spool_cleaned", half_written_removed=removed)
    tracker = CompletionTracker(settings, database)
    scheduler = NodeScheduler(tracker, settings.completion.sweep_interval_s)
    node = Node(settings, roles, database, spool, scheduler)
    if shutdown is not None:
        node.shutdown_requested = shutdown
    try:
        if "scp" in roles:
            node.scp = StorageSCP(
                settings,
                database,
                spool,
                on_stored=scheduler.on_stored,
                selects=partial(selects, settings.routing),
            )
            node.ports = node.scp.start()
            node.stoppers.append(node.scp.stop)
        if "worker" in roles:
            # torch and the model take seconds to load: the SCP already accepts meanwhile
            # (after a restart, the PACS is not kept waiting), and the queue holds the work.
            threading.Thread(
                target=_start_worker, args=(node,), name="worker-start", daemon=True
            ).start()
        scheduler.start()
        node.stoppers.append(scheduler.stop)
        if "web" in roles:
            from ddn_node.web.server import start_web

            node.stoppers.append(start_web(settings, database, spool))
    except BaseException:
        node.stop()
        raise
    log.info("serve.started", roles=sorted(roles), ports=node.ports)
    return node


def _start_worker(node: Node) -> None:
    try:
        from ddn_node.pipeline.runtime import start_worker_parts

        stoppers = start_worker_parts(
            node.settings, node.database, node.spool, node.scheduler, worker_id()
        )
        if node._stopped:  # stopped while the model was loading
            for stop in stoppers:
                stop()
            return
        node.stoppers.extend(stoppers)
        node.worker_ready.set()
        log.info("serve.worker_ready")
    except Exception as exc:  # noqa: BLE001 - reported, and the process exits non-zero
        node.failure = f"the worker could not start: {exc}"
        log.error("serve.worker_failed", error=str(exc))
        node.shutdown_requested.set()
