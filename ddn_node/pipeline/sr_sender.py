"""The SR sender: the worker's reports leave from a thread of their own.

Sending an SR costs the worker nothing but waiting: an association, the PACS storing the
object, the row recorded (about 0.13 s a study against Orthanc on the 2-core development
machine). With the send on this thread the worker decodes and scores the next study
meanwhile, and in a burst the SRs that queued up while one was being sent go together on
one association per destination.

The worker keeps each study's heat maps from the delivery queue until that study's SR
send is over (``ReportingSteps.record`` waits on the future ``submit`` returns), so a
PACS still gets a study's SR before its Parametric Maps and overlays. Whatever is not
sent here (the PACS away, the node stopping) stays pending in the database, and the
delivery loop retries it with back-off.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

import structlog

from ddn_node.pipeline.delivery import Deliverer

log = structlog.get_logger("ddn_node.delivery")

# Sends of one batch: enough for a burst's backlog on one association, few enough that
# the first SR of a batch is not held back by a long tail.
MAX_BATCH = 16


class SrSender:
    """One thread sending the SRs handed to :meth:`submit`, in the order handed over."""

    def __init__(self, deliverer: Deliverer):
        self.deliverer = deliverer
        self._queue: queue.SimpleQueue[tuple[int, str, Future[int]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sr-sender", daemon=True)
        self._stopping = threading.Event()
        # Held while an item is queued and while the queue is drained at the stop, so that
        # no future is queued after the drain and left unresolved.
        self._lock = threading.Lock()

    def start(self) -> SrSender:
        self._thread.start()
        return self

    def submit(self, study_id: int, sop_instance_uid: str) -> Future[int]:
        """Queue one SR's deliveries; the future holds how many rows were attempted once
        the send is over (0 when the delivery loop had claimed them first, or the node is
        stopping)."""
        done: Future[int] = Future()
        with self._lock:
            if self._stopping.is_set():
                done.set_result(0)
            else:
                self._queue.put((study_id, sop_instance_uid, done))
        return done

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the send under way; what is still queued stays pending for the delivery
        loop (its futures resolve to 0)."""
        with self._lock:
            self._stopping.set()
            self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        self._drain_unsent()

    def _run(self) -> None:
        while not self._stopping.is_set():
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    break  # stop() has set _stopping before queueing None
                batch.append(item)
            self._send(batch)
        self._drain_unsent()

    def _send(self, batch: list[tuple[int, str, Future[int]]]) -> None:
        try:
            attempted = self.deliverer.deliver_objects([(s, uid) for s, uid, _ in batch])
        except Exception as exc:  # noqa: BLE001 - the delivery loop retries whatever is left
            log.warning("worker.sr_send_failed", srs=len(batch), error=repr(exc))
            attempted = 0
        for _study_id, _uid, done in batch:
            done.set_result(attempted)

    def _drain_unsent(self) -> None:
        with self._lock:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
                if item is not None and not item[2].done():
                    item[2].set_result(0)
