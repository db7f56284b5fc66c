"""The lease queue: each job claimed once under concurrency, expired leases reclaimed,
completion fenced by the lease owner. SKIP LOCKED on PostgreSQL, conditional UPDATE on SQLite."""

from __future__ import annotations

import datetime as dt
import threading

from sqlalchemy import select

from ddn_node.store.engine import Database
from ddn_node.store.models import Job, Study, utcnow
from ddn_node.store.queue import JOBS


def _jobs(db: Database, n: int) -> None:
    with db.session() as s:
        for i in range(n):
            study = Study(study_uid=f"9.{i}")
            s.add(study)
            s.flush()
            s.add(
                Job(study_id=study.id, generation=1, not_before=utcnow() - dt.timedelta(seconds=1))
            )


def test_each_job_claimed_once_under_concurrency(db: Database) -> None:
    _jobs(db, 40)
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
    with db.session() as s:
        job = JOBS.claim(s, "w", lease_s=30)
        assert job is not None
        assert JOBS.retry_later(s, job.id, "w", delay_s=60)
    with db.session() as s:
        assert JOBS.claim(s, "w", lease_s=30) is None
        assert JOBS.claim(s, "w", lease_s=30, now=utcnow() + dt.timedelta(seconds=61)) is not None
