"""The lease queue: each job claimed once under concurrency, expired leases reclaimed,
completion fenced by the lease owner. SKIP LOCKED on PostgreSQL, conditional UPDATE on SQLite."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable

from sqlalchemy import select

from ddn_node.store.engine import Database
from ddn_node.store.models import Job, Study, utcnow
from ddn_node.store.queue import JOBS
from ddn_node.vocabulary import URGENCY_RANK, Urgency


def _jobs(db: Database, n: int, urgency: Callable[[int], int] = lambda i: 2) -> list[int]:
    """``n`` claimable jobs, queued one second apart in order; returns their ids."""
    t0 = utcnow() - dt.timedelta(seconds=n + 1)
    ids = []
    with db.session() as s:
        for i in range(n):
            study = Study(study_uid=f"9.{i}")
            s.add(study)
            s.flush()
            job = Job(
                study_id=study.id,
                generation=1,
                not_before=t0 + dt.timedelta(seconds=i),
                urgency=urgency(i),
            )
            s.add(job)
            s.flush()
            ids.append(job.id)
    return ids


def _claim_all(db: Database, owner: str = "w") -> list[int]:
    claimed = []
    while True:
        with db.session() as s:
            job = JOBS.claim(s, owner, lease_s=60)
            if job is None:
                return claimed
            claimed.append(job.id)


def test_each_job_claimed_once_under_concurrency(db: Database) -> None:
    # Every class at once: ordering by urgency must not let two workers take one job.
    _jobs(db, 40, urgency=lambda i: i % 4)
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            with db.session() as s:
                job = JOBS.claim(s, name, lease_s=60)
                if job is None:
                    return
                job_id = job.id
            with lock:
                claimed.append(job_id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 40 and len(set(claimed)) == 40


def test_expired_lease_is_reclaimed_and_old_owner_fenced(db: Database) -> None:
    _jobs(db, 1)
    t0 = utcnow()
    with db.session() as s:
        job = JOBS.claim(s, "dead-worker", lease_s=30, now=t0)
        assert job is not None
        job_id = job.id
    with db.session() as s:
        assert JOBS.claim(s, "other", lease_s=30, now=t0 + dt.timedelta(seconds=10)) is None
    with db.session() as s:
        taken = JOBS.claim(s, "other", lease_s=30, now=t0 + dt.timedelta(seconds=31))
        assert taken is not None and taken.id == job_id and taken.attempts == 2
    with db.session() as s:
        assert not JOBS.finish(s, job_id, "dead-worker", "done")  # lost its lease
        assert JOBS.finish(s, job_id, "other", "done")
    with db.read() as s:
        assert s.scalars(select(Job)).one().state == "done"


def test_retry_later_respects_not_before(db: Database) -> None:
    _jobs(db, 1)
    # One clock for the retry and the claims: the delay is over when it says, not when a
    # loaded machine gets there.
    t0 = utcnow()
    with db.session() as s:
        job = JOBS.claim(s, "w", lease_s=30, now=t0)
        assert job is not None
        assert JOBS.retry_later(s, job.id, "w", delay_s=60, now=t0)
    with db.session() as s:
        assert JOBS.claim(s, "w", lease_s=30, now=t0 + dt.timedelta(seconds=59)) is None
        assert JOBS.claim(s, "w", lease_s=30, now=t0 + dt.timedelta(seconds=60)) is not None


def test_a_stat_job_behind_a_backlog_is_claimed_first_then_first_in_first_out(
    db: Database,
) -> None:
    """20 routine jobs queued, then a LOW one, a HIGH one and a STAT one, in that order of
    arrival: the STAT job is claimed first, then the HIGH one, then the routine backlog
    in the order it came, and the LOW one last."""
    stat, high, routine, low = (URGENCY_RANK[u] for u in Urgency)
    kinds = [routine] * 20 + [low, high, stat]
    ids = _jobs(db, len(kinds), urgency=lambda i: kinds[i])
    assert _claim_all(db) == [ids[22], ids[21], *ids[:20], ids[20]]


def test_an_expired_stat_lease_is_reclaimed_before_the_backlog(db: Database) -> None:
    """A worker died holding the STAT job: once its lease expires, the STAT job goes
    before the routine ones that waited meanwhile, and the dead worker is fenced."""
    stat, routine = URGENCY_RANK[Urgency.STAT], URGENCY_RANK[Urgency.ROUTINE]
    ids = _jobs(db, 4, urgency=lambda i: stat if i == 3 else routine)
    t0 = utcnow()
    with db.session() as s:
        first = JOBS.claim(s, "dead-worker", lease_s=30, now=t0)
        assert first is not None and first.id == ids[3]
    with db.session() as s:
        taken = JOBS.claim(s, "other", lease_s=30, now=t0 + dt.timedelta(seconds=10))
        assert taken is not None and taken.id == ids[0]  # the STAT lease still holds
    with db.session() as s:
        taken = JOBS.claim(s, "other", lease_s=30, now=t0 + dt.timedelta(seconds=31))
        assert taken is not None and (taken.id, taken.attempts) == (ids[3], 2)
    with db.session() as s:
        assert not JOBS.finish(s, ids[3], "dead-worker", "done")
        assert JOBS.finish(s, ids[3], "other", "done")
