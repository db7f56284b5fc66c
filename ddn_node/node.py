"""The node composed: the parts each role runs, started and stopped together.

Roles: ``scp`` (DICOM listener + completion timers), ``worker`` (completion sweeps,
analysis, delivery), ``web`` (worklist UI and API). All three together are the embedded
default on SQLite. Heavy parts (torch for the worker) are imported only by the roles that
need them, so an SCP-only process stays small. ``ddn-node serve`` (cli/serve.py) and the
demo (demo/run.py) both start the node here.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pydicom.config
import structlog
from sqlalchemy.orm import configure_mappers

from ddn_node.config import Settings
from ddn_node.dicom.dispatch import WORK, AcceptingServer, Dispatcher, channel_pair
from ddn_node.dicom.hardening import ConnectionGate
from ddn_node.dicom.scp import StorageSCP, peer_allowed
from ddn_node.dicom.spool import Spool
from ddn_node.logs import configure_logging
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
    scp_group: ScpGroup | None = None
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
        if "scp" in roles and settings.node.scp_process_count > 1:
            node.scp_group = ScpGroup(settings, on_work=scheduler.wakeup.set)
            node.stoppers.append(node.scp_group.stop)
            node.ports = node.scp_group.start()
        elif "scp" in roles:
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


# -- several SCP processes ([node] scp_processes) ---------------------------------------

# How long a serving process has to start (imports, database) before the node gives up.
SCP_PROCESS_START_S = 120.0
# How long after a serving process died unexpectedly it is started again; a process that
# dies at once again must not make a busy loop of starts.
SCP_RESTART_DELAY_S = 1.0


@dataclass(frozen=True)
class _ScpProcessSpec:
    """What a serving process is told on its standard input (pickled: the settings as
    this process holds them, whether from a file, the environment or code)."""

    settings: Settings
    index: int
    channel_fds: tuple[int, ...]


class ScpGroup:
    """The SCP as a group of processes: this one listens and accepts (through the
    allow-list gate and the per-host limit, for all of them), ``scp_process_count``
    serving processes each run a :class:`StorageSCP` on the connections handed to them
    (``dicom/dispatch.py``). A serving process that dies is started again; what it had
    answered 0x0000 was durable before the answer, and its open associations end with it
    (their peers send again)."""

    def __init__(self, settings: Settings, on_work: Callable[[], None] | None = None):
        self.settings = settings
        node = settings.node
        self.gate = ConnectionGate(
            lambda address: peer_allowed(settings.peers, None, address),
            node.max_connections_per_host,
        )
        # A study completed in a serving process: this process's worker may claim it.
        self.dispatcher = Dispatcher(self.gate, on_work=on_work)
        self._servers: list[AcceptingServer] = []
        self._serving: list[AcceptingServer] = []
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> list[int]:
        node = self.settings.node
        addresses = [(node.host, node.port)]
        if node.tls.enabled:
            addresses.append((node.host, node.tls.port))
        for index, address in enumerate(addresses):
            server = AcceptingServer(address, self.dispatcher, index, node.network_timeout_s)
            self._servers.append(server)
        # None of the serving processes runs yet: what their folders hold is a crash's.
        removed = Spool(node.spool_dir).prepare(folders=True)
        if removed:
            log.info("serve.spool_cleaned", half_written_removed=removed)
        deadline = time.monotonic() + SCP_PROCESS_START_S
        ready = [self._spawn(i) for i in range(node.scp_process_count)]
        for index, event in enumerate(ready):
            proc = self._procs[index]
            while not event.wait(0.1):
                if proc.poll() is not None:
                    raise StartupError(
                        f"SCP process {index} exited with {proc.returncode} while starting"
                    )
                if time.monotonic() > deadline:
                    raise StartupError(f"SCP process {index} did not start")
        for server in self._servers:
            server.activate()
            threading.Thread(
                target=server.serve_forever,
                name=f"scp-accept-{server.server_address[1]}",
                daemon=True,
            ).start()
            self._serving.append(server)
        ports = [int(s.server_address[1]) for s in self._servers]
        log.info("scp.started", ae_title=node.ae_title, ports=ports, processes=len(ready))
        return ports

    def _spawn(self, index: int) -> threading.Event:
        ours, theirs = zip(*(channel_pair() for _ in self._servers), strict=True)
        fds = tuple(s.fileno() for s in theirs)
        spec = _ScpProcessSpec(self.settings, index, fds)
        # The same code as this process runs, wherever it was imported from.
        here = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-c", "from ddn_node.node import run_scp_process; run_scp_process()"],
            stdin=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path},
            pass_fds=fds,
            # Not the terminal's Ctrl-C: this process stops them, after its own listener.
            start_new_session=True,
        )
        for s in theirs:
            s.close()
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(spec))
        proc.stdin.close()
        with self._lock:
            self._procs[index] = proc
        ready = self.dispatcher.add(index, list(ours))
        threading.Thread(
            target=self._watch, args=(index, proc), name=f"scp-watch-{index}", daemon=True
        ).start()
        log.info("scp.process_started", process=index, pid=proc.pid)
        return ready

    def _watch(self, index: int, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        if self._stopping.is_set():
            return
        log.error("scp.process_exited", process=index, pid=proc.pid, returncode=code)
        if self._stopping.wait(SCP_RESTART_DELAY_S):
            return
        with self._lock:
            if self._procs.get(index) is not proc:
                return
        self._spawn(index)

    def stop(self) -> None:
        self._stopping.set()
        for server in self._servers:
            # shutdown() waits for serve_forever, forever if it never ran (a failed start).
            if server in self._serving:
                server.shutdown()
            server.server_close()
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.dispatcher.close()
        log.info("scp.stopped", processes=len(procs))


def run_scp_process() -> None:
    """The entry point of one serving process of an :class:`ScpGroup`: a StorageSCP (and
    its completion timers) on the connections handed over, until the group stops it
    (SIGTERM) or the accepting process is gone."""
    spec: _ScpProcessSpec = pickle.load(sys.stdin.buffer)
    settings = spec.settings
    configure_logging(
        settings.logging.level,
        settings.logging.json_output,
        settings.logging.file,
        demo=settings.demo,
        fields={"scp_process": spec.index},
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    # The accepting process has migrated the database already.
    database = make_database(
        settings.database.url, pool_size=settings.database.pool_size, echo=settings.database.echo
    )
    spool = Spool(settings.node.spool_dir, incoming=f"incoming/p{spec.index}")
    removed = spool.prepare()
    if removed:
        log.info("serve.spool_cleaned", half_written_removed=removed)
    tracker = CompletionTracker(settings, database)
    # A completion here wakes the worker of the accepting process (WORK on the pair).
    scheduler = NodeScheduler(
        tracker, settings.completion.sweep_interval_s, on_work=lambda: scp.say_to_group(WORK)
    )
    scp = StorageSCP(
        settings,
        database,
        spool,
        on_stored=scheduler.on_stored,
        selects=partial(selects, settings.routing),
    )
    # What a process does once, on its first instance (mapping the ORM classes, compiling
    # the sweep's query) is done before it says it serves: otherwise the first peers
    # after every start pay for it, twice or more with several processes.
    configure_mappers()
    tracker.due_study_ids()
    channels = [socket.socket(fileno=fd) for fd in spec.channel_fds]
    scp.serve_handed(channels, stop)
    scheduler.start()
    # The SIGTERM of the group, or the accepting process gone (its pair closed): then at
    # once, so that a node started again after a crash does not meet this one's leftovers.
    stop.wait()
    scp.stop()
    scheduler.stop()
    database.dispose()
