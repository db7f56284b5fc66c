"""SIGKILL the node while a study streams in: nothing acknowledged is ever lost.

After each kill and restart, every instance that got 0x0000 is in the spool (its data set's
sha256 equal to what was sent) and in the database, no half-written file is visible, and
the study completes and is queued exactly once.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

from sqlalchemy import func, select
from support.dicomgen import dataset_sha256, make_cr, raw_association, store_file, to_file_bytes
from support.net import wait_for

from ddn_node.dicom.spool import Spool
from ddn_node.store.engine import make_database
from ddn_node.store.models import Instance, Job, Study

N_INSTANCES = 30


def _study(tmp: Path, study_uid: str) -> list[Path]:
    paths = []
    series = f"{study_uid}.1"
    for i in range(N_INSTANCES):
        ds = make_cr(
            study_uid, series_uid=series, sop_uid=f"{study_uid}.1.{i + 1}", size=256, seed=i
        )
        ds.InstanceNumber = i + 1
        path = tmp / f"{i:03d}.dcm"
        path.write_bytes(to_file_bytes(ds))
        paths.append(path)
    return paths


def _send(port: int, paths: list[Path], acked: dict[str, Path], stop: threading.Event) -> None:
    try:
        with raw_association(port, timeout=5) as assoc:
            for path in paths:
                if stop.is_set() or not assoc.is_established:
                    return
                uid = f"{path.parent.name}/{path.name}"
                try:
                    status = store_file(assoc, path)
                except Exception:  # noqa: BLE001 - the node died under us: that is the test
                    return
                if status == 0x0000:
                    acked[uid] = path
    except Exception:  # noqa: BLE001
        return


def test_sigkill_during_ingest_loses_nothing(make_node, db_url: str, tmp_path: Path) -> None:
    rng = random.Random(20261127)
    # The quiet period outlasts a restart, so the kills do not complete the study early
    # (if one did, a later instance would re-open it: correct, but not this test).
    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_text("{}")  # the SCP role never loads it
    node = make_node(
        db_url,
        completion={"quiet_period_s": 6, "sweep_interval_s": 0.3},
        routing=[{"name": "cxr", "model": str(model), "head": "cxr", "modalities": ["CR"]}],
    )
    study_uid = "1.2.826.0.1.3680043.8.498.77"
    files_dir = tmp_path / "files"
    files_dir.mkdir()
    paths = _study(files_dir, study_uid)
    acked: dict[str, Path] = {}
    node.start()
    for _round in range(3):
        stop = threading.Event()
        remaining = [p for p in paths if f"{p.parent.name}/{p.name}" not in acked]
        if not remaining:
            break
        target = len(acked) + rng.randint(1, max(1, min(8, len(remaining) - 1)))
        sender = threading.Thread(target=_send, args=(node.port, remaining, acked, stop))
        sender.start()
        wait_for(
            lambda t=target, s=sender: len(acked) >= t or not s.is_alive(), 60, "acknowledgements"
        )
        node.kill()
        stop.set()
        # Restart at once, as systemd would; the old sender only learns of the death
        # through its own timeout, and can only have seen responses the dead node sent.
        node.start()
        sender.join(30)
        # Everything acknowledged so far is durable, whatever moment the kill hit.
        _check_acked(node, db_url, acked)
        assert not Spool(node.spool).half_written(), "half-written file left visible"

    # The PACS re-sends whatever was not acknowledged; then the study completes once.
    stop = threading.Event()
    _send(node.port, [p for p in paths if f"{p.parent.name}/{p.name}" not in acked], acked, stop)
    assert len(acked) == N_INSTANCES
    _check_acked(node, db_url, acked)
    db = make_database(db_url)
    try:

        def completed() -> Study | None:
            with db.read() as s:
                study = s.scalars(select(Study)).one()
                return study if study.state == "queued" else None

        study = wait_for(completed, 60, "study completion")
        with db.read() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == N_INSTANCES
            jobs = list(s.scalars(select(Job)))
        assert study.generation == 1 and study.num_instances == N_INSTANCES
        assert [(j.generation, j.state) for j in jobs] == [(1, "queued")]
    finally:
        db.dispose()
    kills = sum(1 for e in node.events() if e.get("event") == "serve.started") - 1
    assert kills == 3


def _check_acked(node, db_url: str, acked: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    db = make_database(db_url)
    try:
        with db.read() as s:
            rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
    finally:
        db.dispose()
    import pydicom

    for path in acked.values():
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert uid in rows, f"acknowledged {uid} missing from the database"
        stored = node.spool / rows[uid].path
        assert stored.is_file(), f"acknowledged {uid} missing from the spool"
        assert dataset_sha256(stored) == dataset_sha256(path) == rows[uid].sha256
