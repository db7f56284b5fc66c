"""SIGKILL the whole node at random moments, many times: during C-STORE, during analysis
and during delivery. After the last restart, every acknowledged instance is on disk with
the sha256 of what was sent, every completed study generation was analysed exactly once,
and every result is in the PACS exactly once.

CI runs 15 kills, 5 in each phase (DDN_CRASH_ROUNDS; 21 took 190 s of one test process on
a quiet 2-core machine, the longest test by three times, and 50 took five of the suite's
twenty minutes); ``make soak`` runs the long variant (300).
"""

from __future__ import annotations

import os
import random
import threading
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select
from support.artifacts import make_test_artifact
from support.dicomgen import dataset_sha256, make_cr, raw_association, store_file, to_file_bytes
from support.net import wait_for
from support.orthanc import Orthanc, orthanc_available

from ddn_node.store.engine import make_database
from ddn_node.store.models import Delivery, Instance, Job, Result, Study

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed"),
]

PHASES = ("store", "analysis", "delivery")


def _studies(tmp: Path, n: int) -> list[list[Path]]:
    out = []
    for s in range(n):
        study_uid = f"1.2.826.0.1.3680043.8.498.4242.{s + 1}"
        paths = []
        for i in range(2):
            ds = make_cr(
                study_uid,
                series_uid=f"{study_uid}.1",
                sop_uid=f"{study_uid}.1.{i + 1}",
                size=192,
                seed=100 * s + i,
            )
            path = tmp / f"s{s:03d}_{i}.dcm"
            path.write_bytes(to_file_bytes(ds))
            paths.append(path)
        out.append(paths)
    return out


def _sender(port: int, files: list[Path], acked: dict[str, Path], lock: threading.Lock) -> None:
    try:
        with raw_association(port, timeout=5) as assoc:
            for path in files:
                if not assoc.is_established:
                    return
                try:
                    status = store_file(assoc, path)
                except Exception:  # noqa: BLE001 - killed under our feet: the point of the test
                    return
                if status == 0:
                    with lock:
                        acked[path.name] = path
    except Exception:  # noqa: BLE001
        return


def _count_events(node, name: str) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for e in node.events() if e.get("event") == name)


@pytest.mark.parametrize(
    "rounds",
    [
        pytest.param(int(os.environ.get("DDN_CRASH_ROUNDS", "15")), id="ci"),
        pytest.param(
            int(os.environ.get("DDN_SOAK_CRASH_ROUNDS", "300")), id="soak", marks=pytest.mark.soak
        ),
    ],
)
def test_kills_lose_nothing_and_duplicate_nothing(
    make_node, sqlite_url: str, tmp_path: Path, rounds: int
) -> None:
    rng = random.Random(4242)
    model = make_test_artifact(tmp_path / "model", threshold=0.5)
    pacs = Orthanc(tmp_path / "orthanc", node_port=0)
    node = make_node(
        sqlite_url,
        roles=("scp", "worker"),
        routing=[{"name": "cxr", "model": str(model), "head": "cxr", "modalities": ["CR"]}],
        completion={"quiet_period_s": 0.4, "sweep_interval_s": 0.2},
        queue={"lease_s": 2, "max_attempts": 1000, "retry_delay_s": 0.5},
        delivery={
            "sweep_interval_s": 0.2,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 1,
            "max_attempts": 1000,
            "timeout_s": 5,
        },
        worker={"poll_interval_s": 0.1},
    )
    pacs.node_port = node.port
    pacs.start()
    node.config["destinations"] = [
        {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}
    ]
    node.__post_init__()  # rewrite the config with the destination
    studies = _studies(tmp_path, rounds)
    acked: dict[str, Path] = {}
    lock = threading.Lock()
    kills = Counter()
    try:
        node.start()
        for r in range(rounds):
            phase = PHASES[r % 3]
            files = studies[r]
            sender = threading.Thread(target=_sender, args=(node.port, files, acked, lock))
            analysed_before = _count_events(node, "worker.study_analysed")
            sent_before = _count_events(node, "delivery.sent")
            sender.start()
            if phase == "store":
                # Somewhere inside the first C-STORE exchanges.
                threading.Event().wait(rng.uniform(0.0, 0.08))
            elif phase == "analysis":
                wait_for(
                    lambda r=r, sender=sender: (
                        _count_events(node, "completion.study_complete") > r // 3
                        or not sender.is_alive()
                    ),
                    30,
                    "completion",
                )
                threading.Event().wait(rng.uniform(0.0, 0.3))
            else:
                wait_for(
                    lambda b=analysed_before: _count_events(node, "worker.study_analysed") > b,
                    60,
                    "analysis",
                )
                threading.Event().wait(rng.uniform(0.0, 0.15))
            node.kill()
            kills[phase] += 1
            node.start()
            sender.join(30)
            _ = sent_before
        # The PACS re-sends what was not acknowledged; then everything settles.
        missing = [p for files in studies for p in files if p.name not in acked]
        if missing:
            _sender(node.port, missing, acked, lock)
        assert len(acked) == 2 * rounds
        db = make_database(sqlite_url)
        try:

            def settled() -> bool:
                with db.read() as s:
                    studies_left = s.scalar(
                        select(func.count()).select_from(Study).where(Study.state != "analysed")
                    )
                    pending = s.scalar(
                        select(func.count()).select_from(Delivery).where(Delivery.state != "sent")
                    )
                    return studies_left == 0 and pending == 0

            wait_for(settled, 300, "all studies analysed and delivered")
            with db.read() as s:
                instances = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
                jobs = list(s.scalars(select(Job)))
                results = list(s.scalars(select(Result)))
                deliveries = list(s.scalars(select(Delivery)))
                generations = {st.id: st.generation for st in s.scalars(select(Study))}
        finally:
            db.dispose()
    finally:
        node.kill()
        pacs_objects: dict[str, list[str]] = {}
        try:
            for files in studies:
                uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                pacs_objects[uid] = [str(d.SOPInstanceUID) for d in pacs.instance_datasets(uid)]
        finally:
            pacs.stop()

    # Every acknowledged instance, byte for byte.
    for path in acked.values():
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_sha256(node.spool / instances[uid].path) == dataset_sha256(path)
    # Each completed generation analysed once (one done job, one result per generation).
    done = Counter((j.study_id, j.generation) for j in jobs if j.state == "done")
    assert all(n == 1 for n in done.values())
    for study_id, generation in generations.items():
        assert done[(study_id, generation)] == 1
    assert len(results) == len(done)
    # Each result object in the PACS once: what the PACS holds beyond the sources is
    # exactly the delivery rows, every one sent.
    delivered = {d.sop_instance_uid for d in deliveries}
    assert len(delivered) == len(deliveries)
    # The SR, queued before the heat maps, ended linked to its generation's one result
    # even when a kill fell between the two phases.
    assert all(d.result_id is not None for d in deliveries)
    sources = set(instances)
    in_pacs = [uid for uids in pacs_objects.values() for uid in uids if uid not in sources]
    assert sorted(in_pacs) == sorted(delivered)
    print(
        f"kills: {dict(kills)}; studies: {rounds}; results: {len(results)}; objects delivered: {len(delivered)}"
    )
    assert sum(kills.values()) == rounds
