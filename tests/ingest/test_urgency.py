"""Urgent first: the order's priority and the study's source decide the analysis queue's
order. From the wire (an in-process Storage SCP) through completion to the claim, on both
databases: a STAT order that arrives behind a backlog of routine studies is analysed
first, the emergency department's studies next, the backlog first in, first out."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select
from support.dicomgen import make_cr, raw_association, store_file
from support.net import free_port

from ddn_node.config import Settings, UrgencyRule
from ddn_node.dicom.headers import order_priority, read_header
from ddn_node.dicom.scp import StorageSCP
from ddn_node.dicom.spool import Spool
from ddn_node.pipeline.completion import CompletionTracker
from ddn_node.pipeline.urgency import decide_urgency
from ddn_node.store import lifecycle
from ddn_node.store.engine import Database
from ddn_node.store.models import Study, utcnow
from ddn_node.vocabulary import Urgency

UID = "1.2.826.0.1.3680043.10.1.16.5"


def _settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings.model_validate(
        {
            "node": {"host": "127.0.0.1", "port": free_port(), "spool_dir": str(tmp_path)},
            "peers": [{"ae_title": "TESTSCU"}, {"ae_title": "ED_CR"}],
            "database": {"url": db_url},
            "routing": [{"name": "cxr", "model": "models/x", "head": "cxr", "modalities": ["CR"]}],
            "queue": {
                "urgency": [
                    {"departments": ["EMERG*"], "urgency": "HIGH"},
                    {"calling_aes": ["ED_CR"], "urgency": "HIGH"},
                ]
            },
        }
    )


@pytest.fixture
def scp(tmp_path: Path, db_url: str, db: Database) -> Iterator[StorageSCP]:
    settings = _settings(tmp_path / "spool", db_url)
    spool = Spool(settings.node.spool_dir)
    spool.prepare()
    server = StorageSCP(settings, db, spool)
    server.start()
    yield server
    server.stop()


def _send(tmp_path: Path, port: int, ds: Dataset, calling: str = "TESTSCU") -> None:
    path = tmp_path / f"{ds.StudyInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    with raw_association(port, calling=calling) as assoc:
        assert store_file(assoc, path) == 0x0000


def test_a_stat_order_behind_a_backlog_is_claimed_first(
    scp: StorageSCP, db: Database, tmp_path: Path
) -> None:
    port = scp.settings.node.port
    backlog = [f"{UID}.{i}" for i in range(8)]
    for uid in backlog:
        _send(tmp_path, port, make_cr(uid))
    from_ed = make_cr(f"{UID}.91")
    from_ed.InstitutionalDepartmentName = "Emergency"
    _send(tmp_path, port, from_ed)
    _send(tmp_path, port, make_cr(f"{UID}.92"), calling="ED_CR")
    stat = make_cr(f"{UID}.93")
    # As a modality copies it from the worklist: in the Request Attributes Sequence.
    request = Dataset()
    request.RequestedProcedureID = "RP1"
    request.RequestedProcedurePriority = "STAT"
    stat.RequestAttributesSequence = [request]
    _send(tmp_path, port, stat)

    with db.read() as s:
        said = dict(s.execute(select(Study.study_uid, Study.order_priority)).all())
    assert said[f"{UID}.93"] == "STAT" and said[backlog[0]] == ""
    # Everything completes in one sweep, in order of arrival (FIFO within a class).
    later = utcnow() + dt.timedelta(hours=1)  # every quiet period is over
    done = CompletionTracker(scp.settings, db).sweep(later)
    assert [d.study_uid for d in done] == [*backlog, f"{UID}.91", f"{UID}.92", f"{UID}.93"]

    claimed = []
    while True:
        with db.session() as s:
            lease = lifecycle.claim(s, "worker", lease_s=60, now=later)
            if lease is None:
                break
            uid = s.scalar(select(Study.study_uid).where(Study.id == lease.study_id))
        claimed.append(uid)
    assert claimed == [f"{UID}.93", f"{UID}.91", f"{UID}.92", *backlog]


def test_the_most_urgent_source_decides_and_routine_when_none_says() -> None:
    rules = [
        UrgencyRule(calling_aes=["RESEARCH"], urgency=Urgency.LOW),
        UrgencyRule(stations=["icu-*"], departments=["Emerg*"], urgency=Urgency.HIGH),
    ]

    def decide(**given: str) -> Urgency:
        facts = {"order_priority": "", "calling_ae": "PACS", "station": "", "department": ""}
        return decide_urgency(rules, **{**facts, **given}).urgency

    assert decide() is Urgency.ROUTINE
    assert decide(order_priority="medium") is Urgency.ROUTINE
    assert decide(order_priority="LOW") is Urgency.LOW
    assert decide(order_priority="URGENT") is Urgency.ROUTINE  # not a DICOM term: ignored
    assert decide(calling_ae="RESEARCH") is Urgency.LOW
    # A LOW source never delays an order marked STAT.
    assert decide(calling_ae="RESEARCH", order_priority="STAT") is Urgency.STAT
    # Every criterion a rule names must match.
    assert decide(station="ICU-3", department="EMERGENCY") is Urgency.HIGH
    assert decide(station="ICU-3") is Urgency.ROUTINE
    with pytest.raises(ValueError, match="at least one"):
        UrgencyRule(urgency=Urgency.HIGH)


def test_the_order_priority_is_read_wherever_the_modality_put_it(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"

    def said(ds: Dataset) -> str:
        ds.save_as(path, enforce_file_format=True)
        return order_priority(read_header(path))

    assert said(make_cr(UID)) == ""
    top = make_cr(UID)
    top.RequestedProcedurePriority = "HIGH"
    assert said(top) == "HIGH"
    step = make_cr(UID)
    step.ScheduledProcedureStepPriority = "MEDIUM"
    assert said(step) == "MEDIUM"
    both = make_cr(UID)
    both.ScheduledProcedureStepPriority = "LOW"
    items = []
    for value in ("ROUTINE", "STAT"):
        item = Dataset()
        item.RequestedProcedurePriority = value
        items.append(item)
    both.RequestAttributesSequence = items
    assert said(both) == "STAT"  # the most urgent of the requests it fulfils
