"""The SR leaves from its own thread: the worker goes on to the next study while the PACS
stores the report, the SRs that queued up meanwhile share one association, and a study's
heat maps still reach the PACS after its SR.

In process, on SQLite: the worker's own code, the SR sender and a pynetdicom Storage SCP
(not the node's) as the PACS, which holds the first SR until the test lets it go. On
PostgreSQL the same path runs in the nodes of tests/results/test_shadow_models.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    EnhancedSRStorage,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from support.artifacts import make_test_artifact
from support.net import free_port, wait_for
from support.received import receive_cr

from ddn_node.config import Settings
from ddn_node.dicom.spool import Spool
from ddn_node.pipeline import reporting as reporting_module
from ddn_node.pipeline.delivery import Deliverer
from ddn_node.pipeline.registry import ModelRegistry
from ddn_node.pipeline.reporting import ReportingSteps
from ddn_node.pipeline.sr_sender import SrSender
from ddn_node.pipeline.worker import Worker
from ddn_node.store import results as records
from ddn_node.store.engine import Database, make_database
from ddn_node.store.migrate import upgrade
from ddn_node.store.models import Delivery, Job, Study

STUDY = "1.2.826.0.1.3680043.10.1.91.7"
SR_CLASSES = {Comprehensive3DSRStorage, EnhancedSRStorage}


@dataclass
class _Pacs:
    """A Storage SCP that keeps what arrived, on which association, and can hold the
    first SR until ``release`` is set."""

    port: int
    arrived: list[tuple[int, str, str]] = field(default_factory=list)  # assoc, class, study
    holding: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    _held_once: bool = False

    def handle_store(self, event: Any) -> int:
        ds = event.dataset
        if str(ds.SOPClassUID) in SR_CLASSES and not self._held_once:
            self._held_once = True
            self.holding.set()
            # Bounded so that a broken node cannot hang the suite; the test fails instead.
            self.release.wait(60)
        self.arrived.append((id(event.assoc), str(ds.SOPClassUID), str(ds.StudyInstanceUID)))
        return 0x0000

    def srs(self) -> list[tuple[int, str]]:
        return [(assoc, study) for assoc, cls, study in self.arrived if cls in SR_CLASSES]


@pytest.fixture
def pacs() -> Iterator[_Pacs]:
    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    pacs = _Pacs(free_port())
    server: ThreadedAssociationServer = ae.start_server(
        ("127.0.0.1", pacs.port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, pacs.handle_store)],
    )
    yield pacs
    pacs.release.set()
    server.shutdown()


@dataclass
class _Node:
    settings: Settings
    database: Database
    spool: Spool
    sender: SrSender
    worker: Worker


@pytest.fixture
def node(tmp_path: Path, sqlite_url: str, pacs: _Pacs) -> Iterator[_Node]:
    model = make_test_artifact(tmp_path / "model", threshold=0.0)
    settings = Settings.model_validate(
        {
            "node": {"spool_dir": str(tmp_path / "spool")},
            "database": {"url": sqlite_url},
            "completion": {"quiet_period_s": 0.01},
            "worker": {"torch_threads": 1, "heat_maps": "all"},
            "routing": [{"name": "cxr", "model": str(model), "head": "cxr", "modalities": ["CR"]}],
            "destinations": [
                {
                    "name": "pacs",
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "port": pacs.port,
                    "storage_commitment": False,
                }
            ],
        }
    )
    database = make_database(sqlite_url)
    upgrade(database)
    spool = Spool(settings.node.spool_dir)
    spool.prepare()
    sender = SrSender(Deliverer(settings, database, spool, owner="test-worker")).start()
    worker = Worker(
        settings, database, spool, ModelRegistry(settings), "test-worker", send_now=sender.submit
    )
    yield _Node(settings, database, spool, sender, worker)
    sender.stop()
    database.dispose()


def _sr_states(database: Database) -> dict[int, str]:
    with database.read() as s:
        return {
            d.study_id: d.state for d in s.scalars(select(Delivery).where(Delivery.kind == "sr"))
        }


def test_the_worker_goes_on_while_the_pacs_stores_an_sr_and_the_srs_queued_meanwhile_share_an_association(
    node: _Node, pacs: _Pacs, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, database, spool = node.settings, node.database, node.spool
    studies = [receive_cr(settings, database, spool, f"{STUDY}.{n}", seed=n) for n in range(1, 4)]
    # When each study's heat maps are queued for delivery: was its SR answered by then?
    sr_state_when_maps_queued: dict[int, str] = {}
    queue_maps = records.record_heat_maps

    def noting(session: Any, *, study_id: int, **kwargs: Any) -> Any:
        sr_state_when_maps_queued[study_id] = _sr_states(database)[study_id]
        return queue_maps(session, study_id=study_id, **kwargs)

    monkeypatch.setattr(records, "record_heat_maps", noting)
    recording = threading.Event()
    record = ReportingSteps.record

    def record_started(self: ReportingSteps, a: Any) -> bool:
        recording.set()
        return record(self, a)

    monkeypatch.setattr(ReportingSteps, "record", record_started)

    assert node.worker.run_once()  # study 1: its SR goes to the sender
    wait_for(pacs.holding.is_set, 60, "the PACS to be storing the first SR")
    # The PACS has not answered the first SR, and the worker reports studies 2 and 3.
    assert node.worker.run_once() and node.worker.run_once()
    with database.read() as s:
        reported = {st.id: st.priority for st in s.scalars(select(Study))}
    assert all(p != "NOT_ANALYSED" for p in reported.values())
    assert _sr_states(database)[studies[0]] == "sending"

    # Study 1's heat maps (the next step) are to be queued while its SR is still held;
    # only then does the PACS answer.
    maps = threading.Thread(target=node.worker.run_once)
    maps.start()
    wait_for(recording.is_set, 60, "the worker to queue study 1's heat maps")
    pacs.release.set()
    maps.join(60)
    assert not maps.is_alive()
    while node.worker.run_once():
        pass
    wait_for(lambda: set(_sr_states(database).values()) == {"sent"}, 60, "every SR sent")

    srs = pacs.srs()
    assert [study for _a, study in srs] == [f"{STUDY}.{n}" for n in range(1, 4)]
    # The two SRs that queued while the first was being stored went on one association.
    assert srs[1][0] == srs[2][0] != srs[0][0]
    # No study's heat maps were queued before its SR was answered.
    assert sr_state_when_maps_queued == dict.fromkeys(studies, "sent")


def test_a_stopping_sender_leaves_what_it_has_not_sent_to_the_delivery_loop(
    node: _Node, pacs: _Pacs
) -> None:
    settings, database, spool = node.settings, node.database, node.spool
    receive_cr(settings, database, spool, f"{STUDY}.1", seed=1)
    receive_cr(settings, database, spool, f"{STUDY}.2", seed=2)
    assert node.worker.run_once()
    wait_for(pacs.holding.is_set, 60, "the PACS to be storing the first SR")
    assert node.worker.run_once()  # the second SR queues behind the first
    stopping = threading.Thread(target=node.sender.stop)
    stopping.start()
    pacs.release.set()
    stopping.join(60)
    assert not stopping.is_alive()
    # The first SR was finished; the second was never sent and waits for the loop.
    assert sorted(_sr_states(database).values()) == ["pending", "sent"]
    assert [s for s in (f"{STUDY}.1", f"{STUDY}.2") if s in {st for _a, st in pacs.srs()}] == [
        f"{STUDY}.1"
    ]
    deliverer = Deliverer(settings, database, spool, owner="after-restart")
    assert deliverer.deliver_due() >= 1
    assert set(_sr_states(database).values()) == {"sent"}
    # A worker whose sender has stopped does not wait for it: its maps are queued at once.
    while node.worker.run_once():
        pass
    with database.read() as s:
        kinds = sorted({d.kind for d in s.scalars(select(Delivery))})
    assert kinds == ["pm", "sc", "sr"]


def test_with_a_reporter_thread_the_worker_scores_the_next_study_while_an_sr_is_built(
    node: _Node, pacs: _Pacs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime's arrangement: reports built on one thread of their own, in the order
    the studies were claimed; one that fails there is retried like any other failure."""
    settings, database, spool = node.settings, node.database, node.spool
    pacs.release.set()  # this PACS answers at once
    for n in range(1, 4):
        receive_cr(settings, database, spool, f"{STUDY}.{n}", seed=n)
    reporter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reporter")
    worker = Worker(
        settings,
        database,
        spool,
        ModelRegistry(settings),
        "test-worker",
        send_now=node.sender.submit,
        reporter=reporter,
    )
    building, finish_building = threading.Event(), threading.Event()
    scored: list[int] = []
    build = reporting_module.build_sr_result
    calls = 0

    def held_then_failing_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            building.set()
            finish_building.wait(60)
            raise RuntimeError("the SR builder fell over")
        return build(*args, **kwargs)

    score = Worker._score

    def noting_score(self: Worker, lease: Any) -> Any:
        scored.append(lease.study_id)
        return score(self, lease)

    monkeypatch.setattr(reporting_module, "build_sr_result", held_then_failing_once)
    monkeypatch.setattr(Worker, "_score", noting_score)
    try:
        assert worker.run_once()  # study 1 scored; its SR is being built
        wait_for(building.is_set, 60, "study 1's SR to be under construction")
        # While study 1's SR is still being built, study 2 is scored and its report queued.
        assert worker.run_once()
        assert len(scored) == 2 and not _sr_states(database)
        finish_building.set()
        while worker.run_once():
            pass
        # Study 1's report failed on the reporter's thread: its job waits for the queue's
        # retry delay. The other two went, in the order they were claimed.
        with database.read() as s:
            jobs = {j.study_id: (j.state, j.attempts) for j in s.scalars(select(Job))}
        first, second, third = scored[0], scored[1], scored[2]
        assert jobs == {first: ("queued", 1), second: ("done", 1), third: ("done", 1)}
        wait_for(lambda: set(_sr_states(database).values()) == {"sent"}, 60, "the SRs sent")
        assert [study for _a, study in pacs.srs()] == [f"{STUDY}.2", f"{STUDY}.3"]
    finally:
        reporter.shutdown(wait=True)
