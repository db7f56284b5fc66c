"""The worker role's moving parts: analysis loop, delivery loop and periodic jobs.

Both loops sleep on an event that the step before them sets (completion wakes analysis,
analysis wakes delivery), with a short poll as the fallback for work created by other
processes and for back-off times coming due.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from ddn_node.config import Settings
from ddn_node.dicom.spool import Spool
from ddn_node.pipeline.audit_export import SyslogSink, export_new
from ddn_node.pipeline.delivery import Deliverer
from ddn_node.pipeline.registry import ModelRegistry
from ddn_node.pipeline.retention import purge_expired
from ddn_node.pipeline.scheduler import NodeScheduler
from ddn_node.pipeline.sr_sender import SrSender
from ddn_node.pipeline.triage import apply_ageing
from ddn_node.pipeline.worker import Worker
from ddn_node.store.engine import Database

log = structlog.get_logger("ddn_node.runtime")


def _loop(
    name: str, stop: threading.Event, wake: threading.Event, step: Callable[[], int], idle_s: float
) -> None:
    while not stop.is_set():
        try:
            busy = step()
        except Exception as exc:  # noqa: BLE001 - survive database restarts and peer failures
            log.error("runtime.loop_error", loop=name, error=repr(exc))
            busy = 0
            stop.wait(1.0)
        if not busy:
            wake.wait(idle_s)
            wake.clear()


def start_worker_parts(
    settings: Settings, database: Database, spool: Spool, scheduler: NodeScheduler, owner: str
) -> list[Callable[[], Any]]:
    """Start analysis and delivery; returns the functions that stop them."""
    stop = threading.Event()
    deliver_wake = threading.Event()
    models = ModelRegistry(settings)
    if settings.worker.enabled:
        models.preload()
    deliverer = Deliverer(settings, database, spool, owner)
    sr_sender = SrSender(deliverer)
    # One thread, so that reports are built in the order their studies were claimed.
    reporter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reporter")
    worker = Worker(
        settings,
        database,
        spool,
        models,
        owner,
        on_results=deliver_wake.set,
        send_now=sr_sender.submit,
        reporter=reporter,
    )
    threads = []
    if settings.worker.enabled:
        sr_sender.start()
        threads.append(
            threading.Thread(
                target=worker.run, args=(stop, scheduler.wakeup), name="worker", daemon=True
            )
        )
    threads.append(
        threading.Thread(
            target=_loop,
            args=(
                "delivery",
                stop,
                deliver_wake,
                deliverer.deliver_due,
                settings.delivery.sweep_interval_s,
            ),
            name="delivery",
            daemon=True,
        )
    )
    for thread in threads:
        thread.start()
    scheduler.add_interval("triage-ageing", lambda: apply_ageing(database, settings.triage), 60)
    if settings.retention.enabled:
        scheduler.add_interval(
            "retention",
            lambda: purge_expired(database, spool, settings.retention),
            settings.retention.interval_s,
        )
    if settings.audit.syslog_host:
        sink = SyslogSink.from_settings(settings.audit)
        scheduler.add_interval(
            "audit-export", lambda: export_new(database, sink, settings.node.ae_title), 5
        )

    def stop_all() -> None:
        stop.set()
        scheduler.wakeup.set()
        deliver_wake.set()
        for thread in threads:
            thread.join(timeout=30)
        # After the worker, which waits for the reports under way before it stops; a
        # study it was finishing may still wait on its SR.
        reporter.shutdown(wait=True)
        sr_sender.stop()

    return [stop_all]
