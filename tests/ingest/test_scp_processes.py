"""Several SCP processes behind one port ([node] scp_processes): what a PACS notices.

Both processes serve associations on the one port; every instance is stored exactly once
whichever process took it; a serving process killed mid-association loses nothing it had
answered 0x0000, and is started again; identity conflicts are refused across processes
(the database is the arbiter); the per-host connection limit counts every process's
connections together.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from support.artifacts import make_test_artifact
from support.dicomgen import dataset_sha256, make_cr, raw_association, store_file, to_file_bytes
from support.net import echo, wait_for

from ddn_node.store.engine import make_database
from ddn_node.store.models import Instance, Study

SUCCESS, IDENTITY_CONFLICT = 0x0000, 0xC003
ROOT = "1.2.826.0.1.3680043.8.498.17"


def _instances(tmp: Path, study: str, count: int, first: int = 1) -> list[Path]:
    paths = []
    for i in range(first, first + count):
        ds = make_cr(study, series_uid=f"{study}.1", sop_uid=f"{study}.1.{i}", size=64, seed=i)
        path = tmp / f"{study}-{i}.dcm"
        path.write_bytes(to_file_bytes(ds))
        paths.append(path)
    return paths


def _rows(db_url: str) -> dict[str, tuple[int, str, str]]:
    """sop_instance_uid -> (how many rows, sha256, path)."""
    db = make_database(db_url)
    try:
        with db.read() as s:
            counts = dict(
                s.execute(
                    select(Instance.sop_instance_uid, func.count()).group_by(
                        Instance.sop_instance_uid
                    )
                ).all()
            )
            rows = s.execute(select(Instance.sop_instance_uid, Instance.sha256, Instance.path))
            return {uid: (counts[uid], sha, path) for uid, sha, path in rows}
    finally:
        db.dispose()


def _served_by(node: Any, calling: str) -> set[int]:
    """Which serving processes accepted an association from ``calling``."""
    return {
        int(e["scp_process"])
        for e in node.events()
        if e.get("event") == "scp.association_accepted"
        and e.get("calling_ae") == calling
        and "scp_process" in e
    }


def _pid_of(node: Any, process: int) -> int:
    started = [
        e
        for e in node.events()
        if e.get("event") == "scp.process_started" and e["process"] == process
    ]
    return int(started[-1]["pid"])


def test_two_processes_serve_one_port_and_store_every_instance_once(
    make_node, sqlite_url: str, tmp_path: Path
) -> None:
    node = make_node(sqlite_url, node={"scp_processes": 2})
    first = _instances(tmp_path, f"{ROOT}.1", 6)
    second = _instances(tmp_path, f"{ROOT}.2", 6)
    with node:
        assert {e["process"] for e in node.events() if e.get("event") == "scp.process_started"} == {
            0,
            1,
        }
        # Two associations open at once: the least busy process takes each, so one each.
        with (
            raw_association(node.port, calling="TESTSCU") as a,
            raw_association(node.port, calling="DDN_SEND") as b,
        ):
            assert a.is_established and b.is_established
            for x, y in zip(first, second, strict=True):
                assert store_file(a, x) == SUCCESS
                assert store_file(b, y) == SUCCESS
        wait_for(lambda: _served_by(node, "TESTSCU") and _served_by(node, "DDN_SEND"))
        assert _served_by(node, "TESTSCU") | _served_by(node, "DDN_SEND") == {0, 1}
        # The same files again, crosswise: identical re-sends, stored once still.
        with (
            raw_association(node.port, calling="TESTSCU") as a,
            raw_association(node.port, calling="DDN_SEND") as b,
        ):
            for x, y in zip(first, second, strict=True):
                assert store_file(a, y) == SUCCESS
                assert store_file(b, x) == SUCCESS
        rows = _rows(node.db_url)
    assert len(rows) == 12
    for path in first + second:
        uid = f"{path.stem.split('-')[0]}.1.{path.stem.split('-')[1]}"
        count, sha, relpath = rows[uid]
        assert count == 1
        assert sha == dataset_sha256(path)
        assert (node.spool / relpath).is_file()
    assert len(list((node.spool / "studies").rglob("*.dcm"))) == 12  # no spare copies


def test_a_killed_serving_process_loses_nothing_it_acknowledged(
    make_node, sqlite_url: str, tmp_path: Path
) -> None:
    node = make_node(sqlite_url, node={"scp_processes": 2})
    paths = _instances(tmp_path, f"{ROOT}.3", 40)
    acked: list[Path] = []
    paused, killed = threading.Event(), threading.Event()
    with node:

        def send() -> None:
            with raw_association(node.port, calling="TESTSCU", timeout=30) as assoc:
                for path in paths:
                    if len(acked) == 5:
                        paused.set()
                        killed.wait(60)  # the process serving this association dies here
                    try:
                        status = store_file(assoc, path)
                    except (RuntimeError, OSError):
                        return
                    if status != SUCCESS:
                        return
                    acked.append(path)

        sender = threading.Thread(target=send)
        sender.start()
        wait_for(paused.is_set, 60, "the first acknowledgements")
        serving = wait_for(lambda: _served_by(node, "TESTSCU"), 30, "the serving process")
        (index,) = serving
        victim = _pid_of(node, index)
        os.kill(victim, signal.SIGKILL)
        killed.set()
        sender.join(60)
        assert not sender.is_alive()
        assert len(acked) == 5, "an instance was acknowledged by a dead process"
        # The group starts another process in its place, and it serves.
        wait_for(
            lambda: any(
                e.get("event") == "scp.process_started"
                and e["process"] == index
                and e["pid"] != victim
                for e in node.events()
            ),
            60,
            "the replacement process",
        )
        assert any(
            e.get("event") == "scp.process_exited" and e["pid"] == victim for e in node.events()
        )
        rows = _rows(node.db_url)
        for path in acked:
            uid = f"{ROOT}.3.1.{path.stem.split('-')[1]}"
            assert uid in rows, f"{uid} was answered 0x0000 but is not stored"
            _count, sha, relpath = rows[uid]
            assert sha == dataset_sha256(path)
            assert (node.spool / relpath).is_file()
        # Everything is taken again after the loss, on both processes.
        rest = [p for p in paths if p not in acked]
        with (
            raw_association(node.port, calling="TESTSCU") as a,
            raw_association(node.port, calling="DDN_SEND") as b,
        ):
            assert a.is_established and b.is_established
            for i, path in enumerate(rest[:20]):
                assert store_file(a if i % 2 else b, path) == SUCCESS


def test_an_identity_conflict_is_refused_across_processes(
    make_node, sqlite_url: str, tmp_path: Path
) -> None:
    node = make_node(sqlite_url, node={"scp_processes": 2})
    sop = f"{ROOT}.4.1.1"
    original = make_cr(f"{ROOT}.4", series_uid=f"{ROOT}.4.1", sop_uid=sop, size=64, seed=1)
    elsewhere = make_cr(f"{ROOT}.5", series_uid=f"{ROOT}.5.1", sop_uid=sop, size=64, seed=2)
    (tmp_path / "a.dcm").write_bytes(to_file_bytes(original))
    (tmp_path / "b.dcm").write_bytes(to_file_bytes(elsewhere))
    with node:
        with raw_association(node.port, calling="TESTSCU") as a:
            assert store_file(a, tmp_path / "a.dcm") == SUCCESS
            # While the first is open the second goes to the other process, whose own
            # cache knows nothing of the first's study.
            with raw_association(node.port, calling="DDN_SEND") as b:
                assert store_file(b, tmp_path / "b.dcm") == IDENTITY_CONFLICT
        wait_for(lambda: _served_by(node, "TESTSCU") and _served_by(node, "DDN_SEND"))
        assert _served_by(node, "TESTSCU") != _served_by(node, "DDN_SEND")
        rows = _rows(node.db_url)
    assert rows[sop][1] == dataset_sha256(tmp_path / "a.dcm")
    assert len(list((node.spool / "quarantine").iterdir())) == 1


def test_the_per_host_limit_counts_every_process_together(
    make_node, sqlite_url: str, tmp_path: Path
) -> None:
    node = make_node(sqlite_url, node={"scp_processes": 2, "max_connections_per_host": 2})

    def refusals() -> int:
        return sum(
            1
            for e in node.events()
            if e.get("event") == "scp.connection_refused"
            and e.get("reason") == "too many connections from this host"
        )

    with node:
        # The start-up's port probe counts against the host until its process has said
        # it ended: the first associations may have to try again.
        with (
            _associated(node.port, "TESTSCU") as a,
            _associated(node.port, "DDN_SEND") as b,
        ):
            assert a.is_established and b.is_established
            wait_for(lambda: _served_by(node, "TESTSCU") and _served_by(node, "DDN_SEND"))
            assert _served_by(node, "TESTSCU") != _served_by(node, "DDN_SEND")
            # One connection in each process: the host has its two, a third is closed on
            # accept (never reaching a process, which would log its A-ASSOCIATE-RQ).
            assert echo(node.port, calling="ECHOSCU") is None
            wait_for(refusals, 30, "the refusal on accept")
            assert not [e for e in node.events() if e.get("calling_ae") == "ECHOSCU"]
        # Both closed (the serving processes say so): the host may connect again.
        wait_for(lambda: echo(node.port) == SUCCESS, 30, "the connections to count off")


@contextlib.contextmanager
def _associated(port: int, calling: str) -> Iterator[Any]:
    """An established association, asked for again while the node refuses it."""
    stack = contextlib.ExitStack()
    with stack:

        def attempt() -> Any:
            assoc = stack.enter_context(raw_association(port, calling=calling))
            return assoc if assoc.is_established else None

        yield wait_for(attempt, 30, f"an association as {calling}")


def test_a_study_completed_in_a_serving_process_is_analysed_without_waiting_for_a_poll(
    make_node, sqlite_url: str, tmp_path: Path
) -> None:
    """The completion timers run in the serving process that received the study; it tells
    the accepting process, whose worker claims the study at once."""
    model = make_test_artifact(tmp_path / "model", threshold=0.0)
    node = make_node(
        sqlite_url,
        roles=("scp", "worker"),
        node={"scp_processes": 2},
        # Neither the worker's poll nor the accepting process's own completion sweep comes
        # within the test: only the serving process's word can start the analysis.
        worker={"poll_interval_s": 3600, "torch_threads": 1},
        completion={"quiet_period_s": 0.2, "sweep_interval_s": 3600},
        routing=[{"name": "cxr", "model": str(model), "head": "cxr", "modalities": ["CR"]}],
    )
    (path,) = _instances(tmp_path, f"{ROOT}.9", 1)
    with node:
        wait_for(lambda: any(e.get("event") == "worker.started" for e in node.events()), 60)
        with raw_association(node.port, calling="TESTSCU") as assoc:
            assert store_file(assoc, path) == SUCCESS

        def analysed() -> bool:
            db = make_database(node.db_url)
            try:
                with db.read() as s:
                    return s.scalar(select(Study.state)) == "analysed"
            finally:
                db.dispose()

        wait_for(analysed, 60, "the study analysed")
