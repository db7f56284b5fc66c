"""A database-backed work queue with leases, shared by analysis jobs and deliveries.

Claiming is one atomic step on both back-ends: ``SELECT ... FOR UPDATE SKIP LOCKED`` on
PostgreSQL, so several workers on several hosts never take the same row, and a single
conditional ``UPDATE ... RETURNING`` on SQLite, whose writers are serialised anyway. A
claimed row carries a lease; a worker that dies stops renewing it, and once it expires the
row is claimable again. Completion is fenced by the lease owner, so a worker whose lease
was taken over cannot also complete the row.

Rows are claimed in the queue's ``order``: deliveries first in, first out; analysis jobs
by urgency first (``jobs.urgency``: a STAT order before a backlog of routine ones), first
in, first out within a class. The order is part of the same single statement, so it
changes nothing of the exactly-once claim.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from ddn_node.store.models import Delivery, Job, utcnow
from ddn_node.vocabulary import DeliveryState, JobState

Row = TypeVar("Row", Job, Delivery)


@dataclass(frozen=True)
class LeaseQueue(Generic[Row]):
    """Claim / renew / release over one table with the lease columns."""

    model: type[Row]
    ready: str
    running: str
    # The columns a claim orders by, most significant first (the last one unique).
    order: tuple[str, ...] = ("not_before", "id")

    def _order(self) -> list[Any]:
        return [getattr(self.model, name) for name in self.order]

    def _claimable(self, now: dt.datetime) -> Any:
        m = self.model
        return or_(
            and_(m.state == self.ready, m.not_before <= now),
            and_(m.state == self.running, m.lease_expires_at < now),
        )

    def _claim_values(self, owner: str, lease_s: float, now: dt.datetime) -> dict[str, Any]:
        return {
            "state": self.running,
            "lease_owner": owner,
            "lease_expires_at": now + dt.timedelta(seconds=lease_s),
            "attempts": self.model.attempts + 1,
        }

    def claim(
        self, session: Session, owner: str, lease_s: float, now: dt.datetime | None = None
    ) -> Row | None:
        """Take the first claimable row in the queue's order; the caller commits."""
        now = now or utcnow()
        m = self.model
        values = self._claim_values(owner, lease_s, now)
        if session.get_bind().dialect.name == "postgresql":
            row_id = session.scalar(
                select(m.id)
                .where(self._claimable(now))
                .order_by(*self._order())
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if row_id is None:
                return None
            session.execute(update(m).where(m.id == row_id).values(**values))
        else:
            subq = (
                select(m.id).where(self._claimable(now)).order_by(*self._order()).limit(1)
            ).scalar_subquery()
            row_id = session.scalar(
                update(m).where(m.id == subq, self._claimable(now)).values(**values).returning(m.id)
            )
            if row_id is None:
                return None
        session.expire_all()
        return session.get(m, row_id)

    def claim_where(
        self,
        session: Session,
        owner: str,
        lease_s: float,
        *criteria: Any,
        now: dt.datetime | None = None,
    ) -> list[int]:
        """Take every claimable row that also meets ``criteria`` (for example one object's
        deliveries); returns their ids. Rows another owner holds are skipped, as in
        :meth:`claim`. The caller commits the session."""
        now = now or utcnow()
        m = self.model
        values = self._claim_values(owner, lease_s, now)
        wanted = and_(self._claimable(now), *criteria)
        if session.get_bind().dialect.name == "postgresql":
            ids = list(
                session.scalars(
                    select(m.id).where(wanted).order_by(m.id).with_for_update(skip_locked=True)
                )
            )
            if ids:
                session.execute(update(m).where(m.id.in_(ids)).values(**values))
        else:
            ids = list(session.scalars(update(m).where(wanted).values(**values).returning(m.id)))
        session.expire_all()
        return sorted(ids)

    def renew(self, session: Session, row_id: int, owner: str, lease_s: float) -> bool:
        m = self.model
        result = session.execute(
            update(m)
            .where(m.id == row_id, m.lease_owner == owner, m.state == self.running)
            .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_s))
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def finish(self, session: Session, row_id: int, owner: str, state: str, **values: Any) -> bool:
        """Move a claimed row to ``state`` if we still hold its lease."""
        m = self.model
        result = session.execute(
            update(m)
            .where(m.id == row_id, m.lease_owner == owner, m.state == self.running)
            .values(state=state, lease_owner=None, lease_expires_at=None, **values)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def retry_later(
        self,
        session: Session,
        row_id: int,
        owner: str,
        delay_s: float,
        now: dt.datetime | None = None,
        **values: Any,
    ) -> bool:
        """Give a claimed row back, claimable ``delay_s`` after ``now`` (the caller's
        clock, the one its claims use: a back-off is then never shorter or longer than
        that clock says, however slow the machine)."""
        return self.finish(
            session,
            row_id,
            owner,
            self.ready,
            not_before=(now or utcnow()) + dt.timedelta(seconds=delay_s),
            **values,
        )

    def release(
        self, session: Session, row_id: int, owner: str, now: dt.datetime | None = None
    ) -> bool:
        """Give a claimed row back, claimable at once, without counting the attempt (a
        worker shutting down cleanly did not fail at it)."""
        return self.finish(
            session,
            row_id,
            owner,
            self.ready,
            not_before=now or utcnow(),
            attempts=self.model.attempts - 1,
        )

    def depth(self, session: Session) -> int:
        from sqlalchemy import func

        m = self.model
        return int(
            session.scalar(
                select(func.count()).select_from(m).where(m.state.in_([self.ready, self.running]))
            )
            or 0
        )


JOBS: LeaseQueue[Job] = LeaseQueue(
    Job, JobState.QUEUED, JobState.RUNNING, order=("urgency", "not_before", "id")
)
DELIVERIES: LeaseQueue[Delivery] = LeaseQueue(
    Delivery, DeliveryState.PENDING, DeliveryState.SENDING
)
