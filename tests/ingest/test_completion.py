"""Study completion: quiet period per calling AE, force-complete cap, several associations,
re-opening, and exactly one job per completion even with concurrent sweepers."""

from __future__ import annotations

import datetime as dt
import threading

from sqlalchemy import select

from ddn_node.config import PeerSettings, RoutingRule, Settings
from ddn_node.pipeline.completion import CompletionTracker
from ddn_node.pipeline.scheduler import CompletionTimers
from ddn_node.store.engine import Database
from ddn_node.store.ingest import InstanceRecord, record_instance
from ddn_node.store.models import Job, Study

T0 = dt.datetime(2026, 11, 27, 9, 0, tzinfo=dt.UTC)


def settings(**kw) -> Settings:  # type: ignore[no-untyped-def]
    base = Settings(
        peers=[PeerSettings(ae_title="FAST", quiet_period_s=5), PeerSettings(ae_title="SLOW")],
        routing=[RoutingRule(name="cxr", model="models/x", head="cxr", modalities=["CR"])],
    )
    return base.model_copy(update=kw)


def instance(study: str, n: int, modality: str = "CR", ae: str = "SLOW") -> InstanceRecord:
    return InstanceRecord(
        study_uid=study,
        series_uid=f"{study}.1",
        sop_instance_uid=f"{study}.1.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"studies/{study}/{n}.dcm",
        size=10,
        sha256=f"{n:064x}",
        calling_ae=ae,
        modality=modality,
    )


def receive(db: Database, s: Settings, rec: InstanceRecord, at: dt.datetime):  # type: ignore[no-untyped-def]
    return record_instance(
        db,
        rec,
        quiet_period_s=s.quiet_period_for(rec.calling_ae),
        force_complete_s=s.completion.force_complete_s,
        now=at,
    )


def jobs(db: Database) -> list[tuple[int, str]]:
    with db.read() as session:
        return [(j.generation, j.state) for j in session.scalars(select(Job).order_by(Job.id))]


def test_quiet_period_per_calling_ae(db: Database) -> None:
    s = settings()
    tracker = CompletionTracker(s, db)
    receive(db, s, instance("1.1", 1, ae="FAST"), T0)
    receive(db, s, instance("1.2", 1, ae="SLOW"), T0)
    assert tracker.sweep(T0 + dt.timedelta(seconds=4)) == []
    done = tracker.sweep(T0 + dt.timedelta(seconds=6))
    assert [d.study_uid for d in done] == ["1.1"]  # FAST's 5 s passed, SLOW's 30 s not
    assert [d.study_uid for d in tracker.sweep(T0 + dt.timedelta(seconds=31))] == ["1.2"]
    assert jobs(db) == [(1, "queued"), (1, "queued")]


def test_several_associations_are_one_study_and_quiet_restarts(db: Database) -> None:
    s = settings()
    tracker = CompletionTracker(s, db)
    for n, sec in ((1, 0), (2, 20), (3, 45)):  # three associations, gaps below 30 s
        receive(db, s, instance("2.1", n), T0 + dt.timedelta(seconds=sec))
        assert tracker.sweep(T0 + dt.timedelta(seconds=sec + 29)) == []
    done = tracker.sweep(T0 + dt.timedelta(seconds=45 + 30))
    assert len(done) == 1 and done[0].generation == 1
    with db.read() as session:
        study = session.scalars(select(Study)).one()
    assert study.num_instances == 3 and study.state == "queued"


def test_force_complete_cap_for_trickling_studies(db: Database) -> None:
    s = settings(completion=Settings().completion.model_copy(update={"force_complete_s": 100}))
    tracker = CompletionTracker(s, db)
    for n in range(1, 12):  # one instance every 20 s, never 30 s of quiet
        at = T0 + dt.timedelta(seconds=20 * (n - 1))
        receive(db, s, instance("3.1", n), at)
        done = tracker.sweep(at + dt.timedelta(seconds=1))
        if done:
            break
    assert done and done[0].forced and 100 <= 20 * (n - 1) + 1 < 130


def test_late_instance_reopens_and_supersedes(db: Database) -> None:
    s = settings()
    tracker = CompletionTracker(s, db)
    receive(db, s, instance("4.1", 1), T0)
    assert tracker.sweep(T0 + dt.timedelta(seconds=31))
    outcome = receive(db, s, instance("4.1", 2), T0 + dt.timedelta(minutes=5))
    assert outcome.reopened
    assert jobs(db) == [(1, "superseded")]  # not started yet: the full study replaces it
    done = tracker.sweep(T0 + dt.timedelta(minutes=6))
    assert done[0].generation == 2
    assert jobs(db) == [(1, "superseded"), (2, "queued")]
    # A re-send of an instance we have changes nothing.
    again = receive(db, s, instance("4.1", 2), T0 + dt.timedelta(minutes=7))
    assert not (again.new_instance or again.changed or again.reopened)


def test_unrouted_study_is_stored_and_listed_but_not_queued(db: Database) -> None:
    s = settings()
    tracker = CompletionTracker(s, db)
    receive(db, s, instance("5.1", 1, modality="US"), T0)
    done = tracker.sweep(T0 + dt.timedelta(seconds=31))
    assert done[0].routed_to is None and jobs(db) == []
    with db.read() as session:
        study = session.scalars(select(Study)).one()
    assert study.state == "not_routed" and "no routing rule" in study.state_reason


def test_concurrent_sweepers_complete_once(db: Database) -> None:
    s = settings()
    for i in range(20):
        receive(db, s, instance(f"6.{i}", 1), T0)
    trackers = [CompletionTracker(s, db) for _ in range(4)]
    results: list[int] = []
    lock = threading.Lock()

    def sweep(tracker: CompletionTracker) -> None:
        done = tracker.sweep(T0 + dt.timedelta(seconds=31))
        with lock:
            results.extend(d.study_id for d in done)

    threads = [threading.Thread(target=sweep, args=(t,)) for t in trackers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(set(results)) and len(results) == 20
    assert len(jobs(db)) == 20


def test_fast_path_for_known_series_keeps_the_same_semantics(db: Database) -> None:
    from ddn_node.store.ingest import KnownSeries, series_key

    s = settings()
    known = KnownSeries()
    tracker = CompletionTracker(s, db)

    def rx(n: int, at: dt.datetime):  # type: ignore[no-untyped-def]
        rec = instance("7.1", n)
        return record_instance(
            db, rec, quiet_period_s=30, force_complete_s=900, now=at, known=known
        )

    first = rx(1, T0)
    assert first.new_instance and known.get(series_key(instance("7.1", 1))) is not None
    second = rx(2, T0 + dt.timedelta(seconds=1))  # fast path
    assert second.new_instance and not second.reopened
    assert not rx(2, T0 + dt.timedelta(seconds=2)).new_instance  # duplicate via the full path
    assert tracker.sweep(T0 + dt.timedelta(seconds=40))
    late = rx(3, T0 + dt.timedelta(minutes=5))  # study completed: re-opened via the full path
    assert late.reopened
    with db.read() as session:
        study = session.scalars(select(Study)).one()
    assert study.num_instances == 3 and study.state == "receiving"
    # A stale cache entry (the study was purged) falls back to the full path.
    with db.session() as session:
        session.delete(session.get(Study, study.id))
    again = rx(4, T0 + dt.timedelta(minutes=6))
    assert again.new_instance and again.study_id != study.id  # ids are never reused


def test_ageing_raises_what_waits_to_be_read_and_only_lists_the_unrouted(db: Database) -> None:
    """A CT no rule routes is listed as not analysed in the routine band and stays there;
    a chest film received at the same time, whose analysis is pending, climbs to HIGH."""
    from ddn_node.pipeline.triage import apply_ageing
    from ddn_node.pipeline.worklist import WorklistQuery, fetch_worklist

    s = settings()
    tracker = CompletionTracker(s, db)
    receive(db, s, instance("11.1", 1, modality="CT"), T0)
    receive(db, s, instance("11.2", 1, modality="CR"), T0)
    assert {d.routed_to for d in tracker.sweep(T0 + dt.timedelta(seconds=31))} == {None, "cxr"}
    later = T0 + dt.timedelta(minutes=2 * 240 + 1)
    assert apply_ageing(db, s.triage, now=later) == 1
    with db.read() as session:
        rows = {r.study_uid: r for r in fetch_worklist(session, WorklistQuery(), later).rows}
    unrouted, waiting = rows["11.1"], rows["11.2"]
    assert (unrouted.state, unrouted.priority.value) == ("not_routed", "NOT_ANALYSED")
    assert unrouted.rank == 2 and not unrouted.aged
    assert "raised by ageing" not in unrouted.why
    assert waiting.rank == 1 and waiting.aged and "raised by ageing" in waiting.why


def test_completion_timer_is_armed_once_per_quiet_period_and_never_late() -> None:
    """A study receiving instance after instance arms its timer once; a timer that fires
    before the study's latest deadline is armed again for that deadline; an earlier
    deadline (force-complete) re-arms at once; a due study is forgotten."""
    timers = CompletionTimers()
    second = dt.timedelta(seconds=1)
    assert timers.note(1, T0 + 5 * second)  # the first instance arms it
    assert not any(timers.note(1, T0 + (5 + i) * second) for i in range(1, 50))  # 49 more
    assert timers.note(2, T0 + 7 * second)  # another study has its own timer
    # The timer fires at the first deadline: the study's quiet period has moved on.
    assert timers.fired(1, T0 + 5 * second) == T0 + 54 * second
    assert not timers.note(1, T0 + 55 * second)  # armed for 54 s: noted, not re-armed
    assert timers.fired(1, T0 + 54 * second) == T0 + 55 * second
    assert timers.fired(1, T0 + 55 * second) is None  # due: the caller completes it
    assert len(timers) == 1  # only study 2 is still waiting
    assert timers.note(1, T0 + 70 * second)  # a new instance after completion: a new timer
    assert timers.note(1, T0 + 60 * second)  # force-complete moved it earlier: re-armed
    assert timers.fired(1, T0 + 60 * second) is None  # the latest deadline is the one kept
