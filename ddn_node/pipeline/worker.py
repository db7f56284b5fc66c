"""The worker: claim a completed study, analyse it, and keep the job's lease meanwhile.

One study at a time per worker thread; several workers (threads, processes, hosts) share
the queue. Each study is analysed in two phases (``pipeline/analysis.py`` and
``pipeline/reporting.py``): the report first, then the Parametric Maps and overlays, and
the SRs of newly claimed studies go before the pictures of earlier ones (up to
``MAX_DEFERRED`` studies, or ``MAX_DEFERRED_BYTES`` of images, wait).

The report itself (building the SR, recording it, handing it to the sender) may run on a
reporter thread (``reporter``): the worker then decodes and scores the next study while
the previous one's SR is built, which on two cores is most of what a burst of studies
waits for. At most ``REPORTS_AHEAD`` reports wait for that thread, so that the images the
worker holds stay bounded.
Every write is fenced by the job's lease, so a study generation is analysed and delivered
exactly once even when a worker dies half-way and another takes over its expired lease.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from ddn_node.config import Settings
from ddn_node.dicom.spool import Spool
from ddn_node.pipeline.analysis import Analysis, ModelSteps
from ddn_node.pipeline.registry import AnalysisError, ModelRegistry
from ddn_node.pipeline.reporting import ReportingSteps
from ddn_node.store import lifecycle
from ddn_node.store.engine import Database
from ddn_node.store.lifecycle import Lease
from ddn_node.store.models import utcnow

log = structlog.get_logger("ddn_node.worker")

# How many studies' heat maps may wait while the SRs of newer studies go first, and how
# much image memory they may hold meanwhile (display images at overlay size, 4 MB each for
# a 1024 x 1024 float32 image).
MAX_DEFERRED = 64
MAX_DEFERRED_BYTES = 256 * 1024 * 1024
# Scored studies whose reports wait for the reporter thread: one being built and one
# ready keeps both the worker and the reporter busy.
REPORTS_AHEAD = 2

_T = TypeVar("_T")


@dataclass(frozen=True)
class _Held:
    """A claimed job and the event that stops its lease renewer."""

    lease: Lease
    stop_renewing: threading.Event


@dataclass(frozen=True)
class _Waiting:
    """A study whose SR is built (or being built) and whose heat maps wait: ``reported``
    is what the report step made of the scored analysis (parked; None when the report
    failed or the lease was lost), ``scored_bytes`` the images it held until then."""

    held: _Held
    scored_bytes: int
    reported: Future[Analysis | None]

    def held_bytes(self) -> int:
        if not self.reported.done():
            return self.scored_bytes
        analysis = self.reported.result()
        return 0 if analysis is None else ModelSteps.held_bytes(analysis)


class InlineExecutor(Executor):
    """Runs each submitted call at once, in the caller's thread: the report in the
    worker's own thread (the default, and what in-process tests step through)."""

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        done: Future[_T] = Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the future's reader
            done.set_exception(exc)
        return done


class Worker:
    def __init__(
        self,
        settings: Settings,
        database: Database,
        spool: Spool,
        models: ModelRegistry,
        owner: str,
        on_results: Callable[[], None] | None = None,
        send_now: Callable[[int, str], object] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
        reporter: Executor | None = None,
    ):
        self.settings = settings
        self.database = database
        self.owner = owner
        # What "now" is for claims, retry delays and the rows written: injected by tests,
        # so that a delay is due when the test says and not when a loaded machine gets there.
        self.clock = clock
        self.model = ModelSteps(settings, database, spool, models)
        self.reporting = ReportingSteps(
            settings, database, spool, send_now=send_now, on_results=on_results, clock=clock
        )
        # Where reports are built: a single thread, so that they go in the order claimed.
        self.reporter = reporter or InlineExecutor()
        # Studies whose SR is out (or being built) and whose heat maps wait, in the order
        # claimed (their leases kept renewed).
        self._deferred: deque[_Waiting] = deque()

    # -- the loop ---------------------------------------------------------------------

    def run(self, stop: threading.Event, wakeup: threading.Event) -> None:
        log.info("worker.started", owner=self.owner)
        while not stop.is_set():
            try:
                worked = self.run_once()
            except Exception as exc:  # noqa: BLE001 - the loop must survive a database restart
                log.error("worker.loop_error", error=repr(exc))
                worked = False
                stop.wait(1.0)
            if not worked:
                wakeup.wait(self.settings.worker.poll_interval_s)
                wakeup.clear()
        self._release_deferred()
        log.info("worker.stopped", owner=self.owner)

    def run_once(self) -> bool:
        """One step: the SR of a newly claimed study before the heat maps of an earlier
        one (up to ``MAX_DEFERRED`` waiting); False when there was nothing to do."""
        if self._may_defer() and self._start_next():
            return True
        if self._deferred:
            self._finish_deferred()
            return True
        return False

    def _start_next(self) -> bool:
        """Claim a job and run its phase 1; phase 2 waits in ``_deferred``. False when the
        queue had nothing claimable."""
        with self.database.session() as session:
            lease = lifecycle.claim(
                session, self.owner, self.settings.queue.lease_s, now=self.clock()
            )
        if lease is None:
            return False
        if lease.attempts > self.settings.queue.max_attempts:
            self._give_up(
                lease, f"gave up after {lease.attempts - 1} attempts (worker lost each time)"
            )
            return True
        held = _Held(lease, threading.Event())
        threading.Thread(
            target=self._renew_lease, args=(held,), name=f"lease-{lease.job_id}", daemon=True
        ).start()
        scored = self._guarded(held, lambda: self._score(lease))
        if scored is None:
            held.stop_renewing.set()
            return True
        self._wait_for_reports(REPORTS_AHEAD - 1)
        reported = self.reporter.submit(self._guarded, held, lambda: self._report(scored))
        self._deferred.append(_Waiting(held, ModelSteps.held_bytes(scored), reported))
        return True

    def _score(self, lease: Lease) -> Analysis:
        """The model's side of phase 1: the images decoded and scored, the findings'
        heat maps drawn (the SR outlines them)."""
        model = self.model
        return model.localise(model.predict(model.decode(model.start(lease))))

    def _report(self, scored: Analysis) -> Analysis | None:
        """The results' side of phase 1: the SR built, recorded and sent; then a candidate
        model's verdict, if one shadows the rule (stored, never sent). On the reporter's
        thread when there is one."""
        model, reporting = self.model, self.reporting
        reported = reporting.report(scored)
        return None if reported is None else model.park(model.shadow(reporting.send(reported)))

    def _wait_for_reports(self, most: int) -> None:
        """Until at most ``most`` reports wait for the reporter thread."""
        for waiting in list(self._deferred):
            if sum(not w.reported.done() for w in self._deferred) <= most:
                return
            wait([waiting.reported])

    def _phase2(self, analysis: Analysis) -> bool:
        """The pictures: Parametric Maps and overlays, and everything recorded."""
        return self.reporting.record(self.reporting.build_objects(analysis))

    def _finish_deferred(self) -> None:
        waiting = self._deferred.popleft()
        held = waiting.held
        try:
            # The report's own failures were recorded on the reporter's thread (None).
            analysis = waiting.reported.result()
            if analysis is not None:
                self._guarded(held, lambda: self._phase2(analysis))
        finally:
            held.stop_renewing.set()

    def _release_deferred(self) -> None:
        """On shutdown: the studies whose heat maps still wait go back to the queue at
        once (their SR is out, so the next claim only draws the maps), instead of waiting
        for their leases to expire."""
        released = 0
        while self._deferred:
            waiting = self._deferred.popleft()
            held = waiting.held
            # A report under way finishes first: its SR may be on the wire.
            wait([waiting.reported])
            held.stop_renewing.set()
            try:
                with self.database.session() as session:
                    released += lifecycle.release(session, held.lease, now=self.clock())
            except Exception as exc:  # noqa: BLE001 - the lease expires instead
                log.warning("worker.release_failed", job_id=held.lease.job_id, error=repr(exc))
        if released:
            log.info("worker.released_deferred", jobs=released)

    def _may_defer(self) -> bool:
        """Room for one more study's phase 2 to wait: by count and by image memory."""
        held = sum(w.held_bytes() for w in self._deferred)
        return len(self._deferred) < MAX_DEFERRED and held < MAX_DEFERRED_BYTES

    def _guarded(self, held: _Held, step: Callable[[], _T]) -> _T | None:
        """Run one phase of a job; a failure is recorded against the job (retry or give up)."""
        try:
            return step()
        except AnalysisError as exc:
            self._failed(held.lease, str(exc), exc.permanent)
        except Exception as exc:
            log.exception("worker.unexpected_error", study_id=held.lease.study_id)
            self._failed(held.lease, f"{type(exc).__name__}: {exc}", False)
        return None

    def _renew_lease(self, held: _Held) -> None:
        lease = held.lease
        while not held.stop_renewing.wait(lease.lease_s / 3):
            try:
                with self.database.session() as session:
                    if not lifecycle.hold(session, lease):
                        return
            except Exception as exc:  # noqa: BLE001 - keep trying; the lease is long
                log.warning("worker.lease_renew_failed", job_id=lease.job_id, error=repr(exc))

    # -- failures -----------------------------------------------------------------------

    def _failed(self, lease: Lease, reason: str, permanent: bool) -> None:
        if permanent or lease.attempts >= self.settings.queue.max_attempts:
            self._give_up(lease, reason)
            return
        with self.database.session() as session:
            retried = lifecycle.retry(
                session, lease, self.settings.queue.retry_delay_s, reason, now=self.clock()
            )
        if retried:
            log.warning(
                "worker.study_retry", study_id=lease.study_id, attempt=lease.attempts, error=reason
            )
        else:
            log.warning("worker.lease_lost", job_id=lease.job_id, study_id=lease.study_id)

    def _give_up(self, lease: Lease, reason: str) -> None:
        with self.database.session() as session:
            outcome = lifecycle.failed(session, lease, reason, self.clock())
        if outcome is None:
            log.warning("worker.lease_lost", job_id=lease.job_id, study_id=lease.study_id)
            return
        fields = {
            "study_id": lease.study_id,
            "generation": lease.generation,
            "outcome": outcome.value,
            "error": reason,
        }
        if outcome is lifecycle.Outcome.REPORTED:
            # The report already out is the study's truth: only its pictures are missing.
            log.error("worker.heat_maps_failed", **fields)
        else:
            log.error("worker.study_failed", **fields)
