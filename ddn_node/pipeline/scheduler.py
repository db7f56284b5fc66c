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
from ddn_node.store.models import utcnow

log = structlog.get_logger("ddn_node.scheduler")

# A study's timer fires this long after its deadline, so that the completion the database
# checks is already due when it runs.
TIMER_SLACK = dt.timedelta(milliseconds=5)


class CompletionTimers:
    """When each study's completion timer must fire, and when it is armed to fire.

    Every instance moves its study's deadline (the end of its quiet period). Moving the
    APScheduler job each time (``add_job``, which wakes the scheduler's thread to re-sort
    its jobs) cost about 9% of a serving SCP process's Python time per 512 x 512 instance.
    Instead a later deadline is only noted here; the timer, when it fires before it, is
    armed again once for the deadline it finds. So a study arms one timer per quiet
    period instead of one per instance. An earlier deadline than the armed one re-arms at
    once (a completion is never late because of this table). Thread-safe: the SCP's
    threads note, the scheduler's pool fires.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[int, dt.datetime] = {}
        self._armed: dict[int, dt.datetime] = {}

    def note(self, study_id: int, due: dt.datetime) -> bool:
        """Record the study's deadline; True if its timer must be armed for ``due`` now
        (none is armed, or the armed one fires later)."""
        with self._lock:
            self._due[study_id] = due
            armed = self._armed.get(study_id)
            if armed is not None and armed <= due:
                return False
            self._armed[study_id] = due
            return True

    def fired(self, study_id: int, now: dt.datetime) -> dt.datetime | None:
        """The study's timer fired at ``now``: the later deadline to arm it for again, or
        None when the study is due (it is forgotten here; the caller completes it)."""
        with self._lock:
            due = self._due.get(study_id)
            if due is not None and due > now:
                self._armed[study_id] = due
                return due
            self._due.pop(study_id, None)
            self._armed.pop(study_id, None)
            return None

    def __len__(self) -> int:
        with self._lock:
            return len(self._due)


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
        self.timers = CompletionTimers()
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
        if self.timers.note(outcome.study_id, outcome.complete_after):
            self._arm(outcome.study_id, outcome.complete_after)

    def _arm(self, study_id: int, due: dt.datetime) -> None:
        self._scheduler.add_job(
            self._complete_one,
            "date",
            run_date=due + TIMER_SLACK,
            args=[study_id],
            id=f"complete-{study_id}",
            replace_existing=True,
        )

    def _complete_one(self, study_id: int) -> None:
        later = self.timers.fired(study_id, utcnow())
        if later is not None:
            self._arm(study_id, later)  # more instances came in its quiet period
            return
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
