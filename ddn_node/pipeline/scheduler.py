"""Timed work (APScheduler): completion timers and sweeps, delivery retries, retention.

Precise timers fire when a study's quiet period ends (set by the SCP in the same process),
and periodic sweeps catch everything else: studies received by another process, timers lost
in a restart, deliveries whose back-off has elapsed. Every job is idempotent (conditional
updates in the database), so sweeps in several processes do not step on each other.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.exc import SQLAlchemyError

from ddn_node.pipeline.completion import CompletionTracker
from ddn_node.store.ingest import IngestOutcome

log = structlog.get_logger("ddn_node.scheduler")


class NodeScheduler:
    """The process's scheduler; ``wakeup`` is set whenever new work may be claimable."""

    def __init__(
        self,
        tracker: CompletionTracker,
        sweep_interval_s: float,
        on_work: Callable[[], None] | None = None,
    ):
        self.tracker = tracker
        self.wakeup = threading.Event()
        # Called too when a study completes: a serving SCP process tells the process whose
        # worker waits on ``wakeup`` (``dicom/dispatch.py``, WORK).
        self.on_work = on_work
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(4)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=dt.UTC,
        )
        self._scheduler.add_job(
            self._sweep_completions, "interval", seconds=sweep_interval_s, id="completion-sweep"
        )

    def add_interval(self, name: str, func: Callable[[], object], seconds: float) -> None:
        def guarded() -> None:
            try:
                func()
            except SQLAlchemyError as exc:
                # The database may be restarting; the next run tries again.
                log.warning("scheduler.job_db_error", job=name, error=type(exc).__name__)

        self._scheduler.add_job(guarded, "interval", seconds=seconds, id=name)

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        self._scheduler.shutdown(wait=False)

    def on_stored(self, outcome: IngestOutcome) -> None:
        """Called by the SCP after each stored instance: (re)arm the study's timer."""
        if not outcome.touched or not (outcome.new_instance or outcome.changed):
            return
        self._scheduler.add_job(
            self._complete_one,
            "date",
            run_date=outcome.complete_after + dt.timedelta(milliseconds=5),
            args=[outcome.study_id],
            id=f"complete-{outcome.study_id}",
            replace_existing=True,
        )

    def _complete_one(self, study_id: int) -> None:
        try:
            if self.tracker.complete(study_id) is not None:
                self._work()
        except SQLAlchemyError as exc:
            log.warning("scheduler.completion_db_error", error=type(exc).__name__)

    def _work(self) -> None:
        self.wakeup.set()
        if self.on_work is not None:
            self.on_work()

    def _sweep_completions(self) -> None:
        try:
            if self.tracker.sweep():
                self._work()
        except SQLAlchemyError as exc:
            log.warning("scheduler.completion_db_error", error=type(exc).__name__)
