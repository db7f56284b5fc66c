"""Delivery: sending result objects to the configured destinations until they are accepted.

Each object x destination is a row (pending -> sending -> sent | refused | failed). A
sender claims the due rows of one destination with a lease, sends them over one
association, and marks each by what the PACS did with it (``dicom/scu.py`` classifies):

- **sent**: 0x0000, or a storage warning (PS3.4 B.2.3) under which the PACS keeps it;
  where the PACS offers Storage Commitment, the node asks it to commit, and the row is
  *committed* when its N-EVENT-REPORT says so (or shows the failure it reports);
- **refused**: the PACS will not take it - no presentation context for its class (a
  legacy archive without 3D SR or Parametric Map), a permanent association rejection, a
  failure status that a retry would meet again. Never retried; what the destination does
  take still goes;
- **deferred**: not now (out of resources, time-outs, aborts, a transient rejection):
  retried with exponential back-off (initial x 2^(attempt-1), capped) up to
  ``max_attempts``, then **failed**, visible with the PACS's status until an operator runs
  ``ddn-node deliveries retry``.

Each study's row in the worklist carries a one-line summary of where its results went
(``studies.delivery_summary``).

On the wire delivery is at-least-once (a crash after the PACS answered and before our
commit re-sends the object), and exactly-once in the PACS, because the object's identity is
its SOP Instance UID and a Storage SCP keeps one instance per UID.
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import structlog
from sqlalchemy import ColumnElement, and_, case, or_, select, update
from sqlalchemy.orm import Session

from ddn_node.config import DestinationSettings, Settings
from ddn_node.dicom.scu import Disposition, Peer, SendOutcome, StoreSCU, destination_peer
from ddn_node.dicom.spool import Spool
from ddn_node.notify import HL7_CONTENT_TYPE, OutgoingMessage, send
from ddn_node.notify import fhir as fhir_adapter
from ddn_node.notify import webhook as webhook_adapter
from ddn_node.pipeline.notices import ADAPTER_PREFIX
from ddn_node.store.audit import AuditEventName, add_audit
from ddn_node.store.engine import Database
from ddn_node.store.models import Delivery, Study, utcnow
from ddn_node.store.queue import DELIVERIES
from ddn_node.store.results import COMMITMENT_REQUESTED, summarise_deliveries
from ddn_node.vocabulary import CommitmentState, DeliveryState, MessageKind, ResultKind

log = structlog.get_logger("ddn_node.delivery")

BATCH = 32
# Keyed by str: a row's kind is the adapter name's suffix (MessageKind is a StrEnum).
CONTENT_TYPES: dict[str, str] = {
    MessageKind.HL7: HL7_CONTENT_TYPE,
    MessageKind.HL7_ORDER: HL7_CONTENT_TYPE,
    MessageKind.FHIR: fhir_adapter.CONTENT_TYPE,
    MessageKind.WEBHOOK: webhook_adapter.CONTENT_TYPE,
}


@dataclass(frozen=True)
class Attempt:
    """How one send went, whatever the transport (DICOM status or HTTP status)."""

    ok: bool
    status: int | None
    error: str
    refused: bool = False  # permanent: do not try again
    commitment_uid: str | None = None
    # When the destination answered (its C-STORE response), if known: the row's sent_at,
    # rather than the end of the association (a commitment request and the release).
    answered_at: dt.datetime | None = None

    @classmethod
    def of_store(cls, outcome: SendOutcome, answered_at: dt.datetime | None = None) -> Attempt:
        return cls(
            outcome.ok,
            outcome.status,
            outcome.error,
            refused=outcome.outcome is Disposition.REFUSED,
            commitment_uid=outcome.commitment_uid,
            answered_at=answered_at,
        )


class Claimed(NamedTuple):
    id: int
    path: str
    sop_instance_uid: str
    attempts: int
    kind: str


def backoff_s(attempt: int, initial_s: float, max_s: float) -> float:
    """Delay before attempt ``attempt + 1`` after ``attempt`` failures (1-based)."""
    return float(min(max_s, initial_s * 2 ** max(0, attempt - 1)))


class Deliverer:
    def __init__(
        self,
        settings: Settings,
        database: Database,
        spool: Spool,
        owner: str,
        clock: Callable[[], dt.datetime] = utcnow,
    ):
        self.settings = settings
        self.database = database
        self.spool = spool
        self.owner = owner
        # What "now" is for claims and back-offs: injected by tests, so that a back-off
        # elapses when the test says and not when a loaded machine gets there.
        self.clock = clock
        self.destinations = {d.name: d for d in settings.destinations}
        self._lock = threading.Lock()

    def _peer(self, dest: DestinationSettings) -> Peer:
        return destination_peer(dest)

    def _claim(self) -> dict[str, list[Claimed]]:
        """Claim up to BATCH due rows, by destination."""
        lease_s = self.settings.delivery.timeout_s * 4 + 60
        claimed: dict[str, list[Claimed]] = defaultdict(list)
        with self.database.session() as session:
            for _ in range(BATCH):
                row = DELIVERIES.claim(session, self.owner, lease_s, now=self.clock())
                if row is None:
                    break
                claimed[row.destination].append(
                    Claimed(row.id, row.path, row.sop_instance_uid, row.attempts, row.kind)
                )
        return claimed

    def deliver_object(self, study_id: int, sop_instance_uid: str) -> int:
        """Send one object's pending deliveries now, from the calling thread; returns how
        many rows were attempted. The worker sends its SR this way (or through
        ``pipeline/sr_sender.py``), so the findings leave on their own association instead
        of waiting for the delivery loop, which may be busy with earlier heat maps;
        failures back off and retry through the loop."""
        return self.deliver_objects([(study_id, sop_instance_uid)])

    def deliver_objects(self, objects: Sequence[tuple[int, str]]) -> int:
        """Send the pending deliveries of several objects (study id, SOP Instance UID) now,
        one association per destination; returns how many rows were attempted."""
        if not objects:
            return 0
        lease_s = self.settings.delivery.timeout_s * 4 + 60
        wanted = or_(
            *(
                and_(Delivery.study_id == study_id, Delivery.sop_instance_uid == uid)
                for study_id, uid in objects
            )
        )
        with self.database.session() as session:
            ids = DELIVERIES.claim_where(session, self.owner, lease_s, wanted, now=self.clock())
            rows = [session.get(Delivery, i) for i in ids]
            claimed: dict[str, list[Claimed]] = defaultdict(list)
            for row in rows:
                assert row is not None
                claimed[row.destination].append(
                    Claimed(row.id, row.path, row.sop_instance_uid, row.attempts, row.kind)
                )
        for name, group in claimed.items():
            self._send(name, group)
        return len(ids)

    def deliver_due(self) -> int:
        """Send what is due now; returns how many rows were attempted."""
        # One sender per process at a time: concurrent sweeps would only split batches.
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            claimed = self._claim()
            for name, rows in claimed.items():
                self._send(name, rows)
            return sum(len(rows) for rows in claimed.values())
        finally:
            self._lock.release()

    def _send(self, name: str, rows: list[Claimed]) -> None:
        if name.startswith(ADAPTER_PREFIX):
            self._notify(name, rows)
            return
        dest = self.destinations.get(name)
        if dest is None:
            self._record(
                name,
                rows,
                {row.id: Attempt(False, None, "destination no longer configured") for row in rows},
            )
            return
        scu = StoreSCU(
            self.settings.node.ae_title,
            self._peer(dest),
            timeout_s=self.settings.delivery.timeout_s,
        )
        # The reports first, recorded as soon as the PACS has them: the findings reach the
        # radiologist while the (larger) heat-map objects are still on their way.
        for group in (
            [r for r in rows if r.kind == ResultKind.SR],
            [r for r in rows if r.kind != ResultKind.SR],
        ):
            if not group:
                continue
            by_path = {str(self.spool.path(row.path)): row.id for row in group}
            outcomes = {}
            ids = [row.id for row in group]
            answered: dict[str, dt.datetime] = {}
            for outcome in scu.send(
                [self.spool.path(row.path) for row in group],
                progress=functools.partial(self._note_answer, answered),
                commit=functools.partial(self._note_commitment, ids)
                if dest.storage_commitment
                else None,
            ):
                path = str(outcome.path)
                outcomes[by_path[path]] = Attempt.of_store(outcome, answered.get(path))
            self._record(name, group, outcomes)

    def _note_answer(self, answered: dict[str, dt.datetime], outcome: SendOutcome) -> None:
        """When the destination answered for this file (its C-STORE response)."""
        answered.setdefault(str(outcome.path), self.clock())

    def _note_commitment(
        self, row_ids: list[int], transaction_uid: str, sops: Sequence[str]
    ) -> None:
        """Record a commitment transaction on its rows before the request goes out: the
        PACS may answer at once, on another association, before ``_record`` runs."""
        with self.database.session() as session:
            session.execute(
                update(Delivery)
                .where(Delivery.id.in_(row_ids), Delivery.sop_instance_uid.in_(list(sops)))
                .values(commitment_uid=transaction_uid, commitment="", committed_at=None)
            )

    def _notify(self, name: str, rows: list[Claimed]) -> None:
        """HL7 / FHIR / webhook messages: one attempt each through the adapter."""
        kind = name.removeprefix(ADAPTER_PREFIX)
        outcomes = {}
        for row_id, relpath, _message_id, _attempts, _kind in rows:
            try:
                payload = self.spool.path(relpath).read_bytes()
            except OSError as exc:
                outcomes[row_id] = Attempt(False, None, f"message file unreadable: {exc}")
                continue
            result = send(
                self.settings.adapters, OutgoingMessage(kind, payload, CONTENT_TYPES.get(kind, ""))
            )
            outcomes[row_id] = Attempt(result.ok, result.status, result.error)
        self._record(name, rows, outcomes)

    def _record(self, name: str, rows: list[Claimed], outcomes: dict[int, Attempt]) -> None:
        """Each row's outcome in one transaction; then the audit of the studies whose
        results reached the destination, and every touched study's delivery summary."""
        now = self.clock()
        sent_studies: set[int] = set()
        # A RIS may echo patient data in its error text: that stays in the table, not the log.
        adapter = name.startswith(ADAPTER_PREFIX)
        with self.database.session() as session:
            for row_id, _path, sop_uid, attempts, _kind in rows:
                outcome = outcomes.get(row_id)
                if outcome is not None and outcome.ok:
                    study_id = self._record_sent(session, row_id, outcome, now)
                    if study_id is not None:
                        sent_studies.add(study_id)
                    log.info(
                        "delivery.sent",
                        destination=name,
                        sop_instance_uid=sop_uid,
                        status=outcome.status,
                    )
                else:
                    self._record_unsent(
                        session, name, row_id, sop_uid, attempts, outcome, adapter, now
                    )
            for study_id in sent_studies:
                study_uid = (
                    session.scalar(select(Study.study_uid).where(Study.id == study_id)) or ""
                )
                add_audit(session, AuditEventName.RESULTS_SENT, actor=name, study_uid=study_uid)
            studies = session.scalars(
                select(Delivery.study_id).where(Delivery.id.in_([r.id for r in rows]))
            )
            for study_id in set(studies):
                summarise_deliveries(session, study_id)

    def _record_sent(
        self, session: Session, row_id: int, outcome: Attempt, now: dt.datetime
    ) -> int | None:
        """The row sent, its commitment request noted; returns its study's id."""
        DELIVERIES.finish(
            session,
            row_id,
            self.owner,
            DeliveryState.SENT,
            sent_at=outcome.answered_at or now,
            last_status=outcome.status,
            # A commitment failure may already have been reported.
            last_error=case(
                (Delivery.commitment == CommitmentState.FAILED, Delivery.last_error),
                else_="",
            ),
        )
        # The PACS's answer may already be here; only an unanswered request is marked
        # requested, and one never made leaves no transaction behind.
        session.execute(
            update(Delivery)
            .where(Delivery.id == row_id, Delivery.commitment == "")
            .values(
                commitment=COMMITMENT_REQUESTED if outcome.commitment_uid else "",
                commitment_uid=outcome.commitment_uid,
            )
        )
        return session.scalar(select(Delivery.study_id).where(Delivery.id == row_id))

    def _record_unsent(
        self,
        session: Session,
        name: str,
        row_id: int,
        sop_uid: str,
        attempts: int,
        outcome: Attempt | None,
        adapter: bool,
        now: dt.datetime,
    ) -> None:
        """Refused for good, failed after the last attempt, or tried again later."""
        cfg = self.settings.delivery
        status = outcome.status if outcome else None
        error = outcome.error if outcome else "not attempted"
        where = {"destination": name, "sop_instance_uid": sop_uid, "status": status}
        logged = "(see 'ddn-node deliveries list')" if adapter else error
        if outcome is not None and outcome.refused:
            DELIVERIES.finish(
                session,
                row_id,
                self.owner,
                DeliveryState.REFUSED,
                last_status=status,
                last_error=error,
            )
            log.warning("delivery.refused", **where, error=logged)
        elif attempts >= cfg.max_attempts:
            DELIVERIES.finish(
                session,
                row_id,
                self.owner,
                DeliveryState.FAILED,
                last_status=status,
                last_error=error,
            )
            log.error("delivery.failed", **where, error=logged, attempts=attempts)
        else:
            delay = backoff_s(attempts, cfg.backoff_initial_s, cfg.backoff_max_s)
            DELIVERIES.retry_later(
                session, row_id, self.owner, delay, now=now, last_status=status, last_error=error
            )
            log.warning(
                "delivery.retry_scheduled",
                **where,
                error=logged,
                attempt=attempts,
                retry_in_s=delay,
            )


def retry_failed(
    database: Database,
    destination: str | None = None,
    *,
    refused: bool = False,
    uncommitted: bool = False,
) -> int:
    """Put failed (and, with ``refused``, refused; with ``uncommitted``, sent but declined
    by the destination's storage commitment) deliveries back in the queue
    (``ddn-node deliveries retry``)."""
    states = [DeliveryState.FAILED, *([DeliveryState.REFUSED] if refused else [])]
    chosen: ColumnElement[bool] = Delivery.state.in_(states)
    if uncommitted:
        chosen = or_(
            chosen,
            (Delivery.state == DeliveryState.SENT)
            & (Delivery.commitment == CommitmentState.FAILED),
        )
    with database.session() as session:
        stmt = update(Delivery).where(chosen)
        if destination:
            stmt = stmt.where(Delivery.destination == destination)
        result = session.execute(
            stmt.values(
                state=DeliveryState.PENDING,
                attempts=0,
                not_before=utcnow() - dt.timedelta(seconds=1),
                commitment="",
                commitment_uid=None,
                committed_at=None,
            )
        )
        return int(result.rowcount)  # type: ignore[attr-defined]
