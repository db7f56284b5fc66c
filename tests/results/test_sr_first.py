"""The SR leaves before the heat maps: the worker queues it with its result (fenced by the
job's lease) before it draws any map, and a failure while drawing them neither holds the SR
back nor sends it twice; the retry finishes the maps on the same result.

One truth: when the worker gives up after a report left, the worklist keeps that report's
priority and says what is missing - the PACS, the worklist and the SR never disagree.

In process, on both databases: the worker's own code against a real spool and schema.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from support.artifacts import make_test_artifact
from support.clock import ManualClock
from support.received import receive_cr
from support.sr_reader import read_sr

from ddn_node.config import Settings
from ddn_node.dicom.spool import Spool
from ddn_node.pipeline import reporting as reporting_module
from ddn_node.pipeline.analysis import ModelSteps
from ddn_node.pipeline.delivery import Deliverer
from ddn_node.pipeline.registry import AnalysisError, ModelRegistry
from ddn_node.pipeline.worker import Worker
from ddn_node.pipeline.worklist import fetch_row
from ddn_node.store.engine import Database, make_database
from ddn_node.store.migrate import upgrade
from ddn_node.store.models import Delivery, Job, Result, Study, utcnow

STUDY = "1.2.826.0.1.3680043.10.1.91.1"


def _settings(tmp_path: Path, db_url: str, model: Path) -> Settings:
    return Settings.model_validate(
        {
            "node": {"spool_dir": str(tmp_path / "spool")},
            "database": {"url": db_url},
            "completion": {"quiet_period_s": 0.01},
            "queue": {"retry_delay_s": 0.001, "max_attempts": 3},
            # Every finding gets a map: the test model has no localisation record.
            "worker": {"torch_threads": 1, "heat_maps": "all"},
            # A failed send backs off 5 s (the default): the tests that send move a
            # ManualClock, so it elapses only when they say, however slow the machine.
            "delivery": {"backoff_initial_s": 5},
            "routing": [{"name": "cxr", "model": str(model), "head": "cxr", "modalities": ["CR"]}],
            # Two destinations: the SR is queued once for each.
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 105},
            ],
        }
    )


def _receive(
    settings: Settings, database: Any, spool: Spool, study_uid: str = STUDY, seed: int = 3
) -> int:
    """One CR instance stored as the SCP stores it, and its study completed; returns the
    study id."""
    return receive_cr(settings, database, spool, study_uid, seed=seed)


@dataclass
class _Node:
    settings: Settings
    database: Database
    spool: Spool

    def worker(
        self,
        owner: str = "test-worker",
        send_now: Callable[[int, str], object] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> Worker:
        return Worker(
            self.settings,
            self.database,
            self.spool,
            ModelRegistry(self.settings),
            owner=owner,
            send_now=send_now,
            clock=clock,
        )


@pytest.fixture
def node(tmp_path: Path, db_url: str) -> Iterator[_Node]:
    """Settings, a migrated database and a spool; the model finds every finding positive."""
    model = make_test_artifact(tmp_path / "model", threshold=0.0)
    settings = _settings(tmp_path, db_url, model)
    database = make_database(db_url)
    upgrade(database)
    spool = Spool(settings.node.spool_dir)
    spool.prepare()
    yield _Node(settings, database, spool)
    database.dispose()


def test_sr_queued_before_heat_maps_and_not_twice_after_a_failure(
    node: _Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, database, spool = node.settings, node.database, node.spool
    study_id = _receive(settings, database, spool)
    # Nothing listens on the destinations' ports: sending fails fast and backs off. Time
    # moves only when the test moves it (the job's retry delay, the SR's back-off).
    clock = ManualClock(utcnow())
    deliverer = Deliverer(settings, database, spool, owner="test-worker", clock=clock)
    worker = node.worker(send_now=deliverer.deliver_object, clock=clock)

    seen_when_drawing: list[list[tuple[str, str, int | None, int]]] = []
    draw = reporting_module.add_heat_map_objects

    def failing_draw(*args: Any, **kwargs: Any) -> None:
        with database.read() as s:
            seen_when_drawing.append(
                [
                    (d.kind, d.destination, d.result_id, d.attempts)
                    for d in s.scalars(select(Delivery))
                ]
            )
        raise RuntimeError("the overlay renderer fell over")

    monkeypatch.setattr(reporting_module, "add_heat_map_objects", failing_draw)
    assert worker.run_once()  # claim, SR
    assert worker.run_once()  # heat maps: fail

    # When the maps were about to be drawn, the SR was already queued with its result,
    # once per destination, and nothing else was; the worker had already tried to send it.
    with database.read() as s:
        (reported,) = s.scalars(select(Result)).all()
    assert sorted(seen_when_drawing[0]) == [
        ("sr", "archive", reported.id, 1),
        ("sr", "pacs", reported.id, 1),
    ]
    with database.read() as s:
        job = s.scalars(select(Job)).one()
        assert job.state == "queued" and "overlay renderer" in job.last_error
        # The result says what the SR says; its heat maps are still to come.
        (result,) = s.scalars(select(Result)).all()
        assert result.completed_at is None and result.sr_sop_instance_uid
        assert result.thresholds == {"Pneumothorax": 0.0, "Effusion": 0.0, "Nodule": 0.0}
        sr_rows = s.scalars(select(Delivery)).all()
        sr_path = spool.path(sr_rows[0].path)
    first_sr = sr_path.read_bytes()

    monkeypatch.setattr(reporting_module, "add_heat_map_objects", draw)
    # The job's retry delay passes; the SR's back-off has not.
    assert settings.queue.retry_delay_s < settings.delivery.backoff_initial_s
    clock.advance(settings.queue.retry_delay_s)
    assert worker.run_once() and worker.run_once()
    assert not worker.run_once()

    def sr_attempts() -> set[int]:
        with database.read() as s:
            return {d.attempts for d in s.scalars(select(Delivery).where(Delivery.kind == "sr"))}

    # The retry did not send the SR again itself (its rows wait for their back-off), nor
    # does the delivery loop before the back-off is over...
    assert sr_attempts() == {1}
    deliverer.deliver_due()
    assert sr_attempts() == {1}
    # ...and once the back-off is over, the delivery loop tries each SR row once more.
    clock.advance(settings.delivery.backoff_initial_s)
    assert deliverer.deliver_due() > 0
    assert sr_attempts() == {2}

    with database.read() as s:
        job = s.scalars(select(Job)).one()
        result = s.scalars(select(Result)).one()
        assert result.id == reported.id and result.completed_at is not None
        deliveries = s.scalars(select(Delivery)).all()
        study = s.get(Study, study_id)
        assert study is not None and study.state == "analysed"
    assert job.state == "done"
    srs = [d for d in deliveries if d.kind == "sr"]
    # Still one SR per destination: the retry kept the first attempt's, byte for byte
    # (a PACS may hold it already), and linked it to the one result.
    assert sorted(d.destination for d in srs) == ["archive", "pacs"]
    assert {d.sop_instance_uid for d in srs} == {result.sr_sop_instance_uid}
    assert sr_path.read_bytes() == first_sr
    assert all(d.result_id == result.id for d in deliveries)
    kinds = sorted({d.kind for d in deliveries})
    assert kinds == ["pm", "sc", "sr"]
    assert (
        "sr_ms" in result.timings_ms
        and result.timings_ms["sr_ms"] <= result.timings_ms["results_ms"]
    )


def test_a_waiting_study_gets_its_sr_before_the_previous_study_gets_heat_maps(node: _Node) -> None:
    settings, database, spool = node.settings, node.database, node.spool
    first = _receive(settings, database, spool, STUDY + ".1")
    second = _receive(settings, database, spool, STUDY + ".2")
    worker = node.worker()

    def kinds() -> dict[int, list[str]]:
        with database.read() as s:
            out: dict[int, list[str]] = {first: [], second: []}
            for d in s.scalars(select(Delivery).where(Delivery.destination == "pacs")):
                out[d.study_id].append(d.kind)
            return {k: sorted(set(v)) for k, v in out.items()}

    def priorities() -> dict[int, str]:
        with database.read() as s:
            return {st.id: st.priority for st in s.scalars(select(Study))}

    assert worker.run_once()
    assert kinds() == {first: ["sr"], second: []}
    assert worker.run_once()
    # Both SRs are out, and both studies have their place in the worklist, before
    # either study's heat maps are drawn.
    assert kinds() == {first: ["sr"], second: ["sr"]}
    assert "NOT_ANALYSED" not in priorities().values()
    assert worker.run_once()
    assert kinds() == {first: ["pm", "sc", "sr"], second: ["sr"]}
    assert worker.run_once()
    assert kinds() == {first: ["pm", "sc", "sr"], second: ["pm", "sc", "sr"]}
    assert not worker.run_once()
    with database.read() as s:
        assert {st.state for st in s.scalars(select(Study))} == {"analysed"}
        assert len(s.scalars(select(Result)).all()) == 2


def test_a_clean_stop_gives_waiting_heat_maps_back_to_the_queue(node: _Node) -> None:
    settings, database, spool = node.settings, node.database, node.spool
    study_id = _receive(settings, database, spool)
    first = node.worker("stopping-worker")
    assert first.run_once()  # phase 1: the SR is queued, the heat maps wait
    stop = threading.Event()
    stop.set()
    first.run(stop, threading.Event())  # the shutdown path
    with database.read() as s:
        job = s.scalars(select(Job)).one()
        # Claimable now, not after the 300 s lease, and the clean stop cost no attempt.
        assert (job.state, job.lease_owner, job.attempts) == ("queued", None, 0)

    second = node.worker("next-worker")
    assert second.run_once() and second.run_once()
    with database.read() as s:
        job = s.scalars(select(Job)).one()
        kinds = sorted(
            d.kind for d in s.scalars(select(Delivery).where(Delivery.destination == "pacs"))
        )
        study = s.get(Study, study_id)
    assert (job.state, job.attempts) == ("done", 1)
    assert kinds.count("sr") == 1 and "pm" in kinds and "sc" in kinds
    assert study is not None and study.state == "analysed"


def _sr_priority(database: Database, spool: Spool) -> str:
    """The priority the SR in the PACS says (read back from the file that was sent)."""
    with database.read() as s:
        (sr_row,) = s.scalars(
            select(Delivery)
            .where(Delivery.kind == "sr", Delivery.destination == "pacs")
            .order_by(Delivery.id.desc())
            .limit(1)
        )
    content = read_sr(pydicom.dcmread(spool.path(sr_row.path)))
    assert content.priority is not None
    return str(content.priority)


def test_heat_maps_given_up_after_the_sr_left_the_worklist_keeps_the_report(
    node: _Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, database, spool = node.settings, node.database, node.spool
    _receive(settings, database, spool)
    worker = node.worker()

    def failing_draw(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the overlay renderer fell over")

    monkeypatch.setattr(reporting_module, "add_heat_map_objects", failing_draw)
    while worker.run_once():  # SR, then the maps fail on every attempt (max_attempts 3)
        pass
    with database.read() as s:
        job = s.scalars(select(Job)).one()
        assert job.state == "failed" and job.attempts == 3
        row = fetch_row(s, STUDY)
        kinds = {d.kind for d in s.scalars(select(Delivery))}
    assert kinds == {"sr"}  # the report went; no map was ever queued
    said = _sr_priority(database, spool)
    assert said == "STAT"  # threshold 0: every finding positive
    assert row is not None
    # The worklist agrees with the SR the PACS holds, and says what is missing.
    assert row.priority == said and row.rank == 0 and row.state == "analysed"
    assert "heat maps not made" in row.status_text and "overlay renderer" in row.status_text
    assert row.top_findings


def test_a_failed_re_analysis_keeps_the_priority_of_the_report_the_pacs_holds(
    node: _Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, database, spool = node.settings, node.database, node.spool
    _receive(settings, database, spool)
    worker = node.worker()
    assert worker.run_once() and worker.run_once() and not worker.run_once()
    said = _sr_priority(database, spool)

    # A late image re-opens the study; its analysis fails for good.
    _receive(settings, database, spool, seed=4)

    def unreadable(self: ModelSteps, a: Any) -> Any:
        raise AnalysisError("pixel data unreadable", permanent=True)

    monkeypatch.setattr(ModelSteps, "decode", unreadable)
    assert worker.run_once() and not worker.run_once()
    with database.read() as s:
        jobs = sorted((j.generation, j.state) for j in s.scalars(select(Job)))
        row = fetch_row(s, STUDY)
    assert jobs == [(1, "done"), (2, "failed")]
    assert row is not None
    # Not buried in the routine band as "not analysed": the PACS still shows analysis 1's
    # STAT report, and the worklist says that the latest images were not analysed.
    assert row.priority == said == "STAT" and row.rank == 0
    assert row.state == "failed" and row.analysed
    assert "latest images were not analysed" in row.status_text
    assert "pixel data unreadable" in row.status_text and "analysis 1" in row.status_text


def test_nothing_reported_ever_is_listed_as_not_analysed(
    node: _Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, database, spool = node.settings, node.database, node.spool
    _receive(settings, database, spool)
    worker = node.worker()

    def unreadable(self: ModelSteps, a: Any) -> Any:
        raise AnalysisError("pixel data unreadable", permanent=True)

    monkeypatch.setattr(ModelSteps, "decode", unreadable)
    assert worker.run_once() and not worker.run_once()
    with database.read() as s:
        row = fetch_row(s, STUDY)
        assert not s.scalars(select(Delivery)).all()
    assert row is not None
    assert row.priority == "NOT_ANALYSED" and row.state == "failed" and not row.analysed
    assert "analysis failed" in row.status_text and "pixel data unreadable" in row.why


def test_a_destination_that_never_answers_fails_after_the_last_attempt(node: _Node) -> None:
    """Attempts run out: the rows end ``failed`` with the error, are not claimed again,
    and the worklist's line says so per destination (a refusal is tested with real peers
    in tests/peers/test_refusals.py)."""
    delivery = node.settings.delivery.model_copy(update={"max_attempts": 1})
    settings = node.settings.model_copy(update={"delivery": delivery})
    study_id = _receive(settings, node.database, node.spool)
    deliverer = Deliverer(settings, node.database, node.spool, owner="test-worker")
    worker = Worker(
        settings,
        node.database,
        node.spool,
        ModelRegistry(settings),
        owner="test-worker",
        send_now=deliverer.deliver_object,
    )
    assert worker.run_once()  # claim, SR: nothing listens on either destination's port
    with node.database.read() as s:
        rows = list(s.scalars(select(Delivery).where(Delivery.kind == "sr")))
        study = s.get(Study, study_id)
        assert study is not None
        summary = study.delivery_summary
    assert sorted((r.destination, r.state, r.attempts) for r in rows) == [
        ("archive", "failed", 1),
        ("pacs", "failed", 1),
    ]
    assert all(r.last_error and r.sent_at is None for r in rows)
    assert summary == "archive: SR failed | pacs: SR failed"
    assert deliverer.deliver_due() == 0
