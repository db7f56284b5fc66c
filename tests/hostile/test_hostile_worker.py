"""Hostile instances that the SCP rightly stores (their headers are fine) reach the worker:
the node (SCP + worker in one process, as ``ddn-node serve`` runs) must survive them.

Each instance once killed or stalled the process or would have: a JPEG whose header says
64 bits allocated and a JPEG-LS frame whose header says 3 samples (python-gdcm aborted
the process on both), an RLE segment that made pylibjpeg-rle panic (a BaseException),
and RLE / JPEG frames declaring 20000x20000 and 8000x8000 in a few hundred bytes
(gigabytes allocated before decoding failed). Every study ends analysed or failed with a
clear reason, the image problems are logged as worker.image_unreadable, nothing as
worker.unexpected_error, and the process is the same one from start to end.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hostile_gen import bomb, seed
from pydicom.encaps import encapsulate, generate_frames
from sqlalchemy import select
from support.dicomgen import make_cr, raw_association, store_file, to_file_bytes
from support.net import wait_for

from ddn_node.store.engine import make_database
from ddn_node.store.models import Study
from ddn_node.vocabulary import StudyState

pytestmark = pytest.mark.slow

ROOT = "1.2.826.0.1.3680043.10.1.77"


def _rle_panic() -> bytes:
    """The RLE seed with two bytes changed (found by fuzzing): pylibjpeg-rle 2.2 indexes
    past its output buffer and panics, which pyo3 raises as PanicException, a
    BaseException that ``except Exception`` does not catch."""
    ds = pydicom.dcmread(io.BytesIO(seed("rle").file))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    frame[310], frame[601] = 145, 255
    ds.PixelData = encapsulate([bytes(frame)])
    return to_file_bytes(ds)


HOSTILE: dict[str, Callable[[], bytes]] = {
    "jpeg_64_bits_allocated": lambda: bomb("jpeg_baseline", 16, 16, bits_allocated=64),
    "jpeg_ls_3_samples": lambda: bomb("jpeg_ls", 16, 16, samples=3),
    "rle_panic": _rle_panic,
    "rle_20000x20000": lambda: bomb("rle", 20000, 20000),
    "jpeg_8000x8000": lambda: bomb("jpeg_baseline", 8000, 8000),
}


def _as_instance(data: bytes, n: int, study: str | None = None) -> tuple[pydicom.Dataset, bytes]:
    """The file with its own UIDs (one study per case unless ``study``), routed (CR, CHEST, PA)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.StudyInstanceUID = study or f"{ROOT}.{n}"
    ds.SeriesInstanceUID = f"{ROOT}.{n}.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ROOT}.{n}.1.1"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    return ds, to_file_bytes(ds)


def _states(db_url: str) -> dict[str, tuple[str, str]]:
    db = make_database(db_url)
    try:
        with db.read() as s:
            return {
                st.study_uid: (str(st.state), st.state_reason or "")
                for st in s.scalars(select(Study))
            }
    finally:
        db.dispose()


def test_hostile_instances_do_not_take_the_worker_down(
    make_node: Any, sqlite_url: str, tmp_path: Path
) -> None:
    from support.artifacts import make_test_artifact

    model = make_test_artifact(tmp_path / "model")
    node = make_node(
        sqlite_url,
        roles=("scp", "worker"),
        routing=[
            {
                "name": "chest",
                "model": str(model),
                "head": "cxr",
                "modalities": ["CR"],
                "body_parts": ["CHEST"],
                "views": ["PA"],
            }
        ],
        completion={"quiet_period_s": 1, "force_complete_s": 60, "sweep_interval_s": 0.3},
        queue={"max_attempts": 2, "retry_delay_s": 1},
        worker={"poll_interval_s": 0.2, "torch_threads": 1},
        demo=True,
    )
    files: dict[str, tuple[pydicom.Dataset, bytes]] = {}
    for n, (name, build) in enumerate(sorted(HOSTILE.items()), 1):
        files[name] = _as_instance(build(), n)
    # A study with a good image and a hostile one: analysed from the good one.
    mixed = f"{ROOT}.99"
    files["mixed:good"] = _as_instance(to_file_bytes(make_cr(mixed, size=64)), 98, study=mixed)
    files["mixed:hostile"] = _as_instance(HOSTILE["jpeg_64_bits_allocated"](), 99, study=mixed)

    with node:
        pid = node.proc.pid
        contexts = sorted(
            {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds, _ in files.values()}
        )
        with raw_association(node.port, contexts=contexts) as assoc:
            for name, (_ds, data) in files.items():
                path = tmp_path / f"{name.replace(':', '_')}.dcm"
                path.write_bytes(data)
                assert store_file(assoc, path) == 0x0000, name

        wanted = {ds.StudyInstanceUID for ds, _ in files.values()}

        def settled() -> dict[str, tuple[str, str]] | None:
            if node.proc.poll() is not None:
                raise AssertionError(f"the node died: {node.log_path.read_text()[-3000:]}")
            states = _states(sqlite_url)
            done = {StudyState.ANALYSED.value, StudyState.FAILED.value}
            return (
                states
                if wanted <= set(states) and all(states[u][0] in done for u in wanted)
                else None
            )

        states = wait_for(settled, 240, "every study analysed or failed", interval=0.5)
        assert node.proc.pid == pid and node.proc.poll() is None

    print(dict(states.items()))
    assert states[mixed][0] == StudyState.ANALYSED.value, states[mixed]
    failed = 0
    for name, (ds, _data) in files.items():
        if name.startswith("mixed"):
            continue
        state, reason = states[ds.StudyInstanceUID]
        if name == "rle_panic":
            # After the panic pydicom's own RLE decoder is tried, and it may make an image
            # of the damaged segment: analysed or failed, either is an answer.
            assert state in (StudyState.ANALYSED.value, StudyState.FAILED.value), (
                name,
                state,
                reason,
            )
        else:
            assert state == StudyState.FAILED.value and "decoded" in reason, (name, state, reason)
        failed += state == StudyState.FAILED.value
    events = list(node.events())
    unreadable = {
        e["sop_instance_uid"] for e in events if e.get("event") == "worker.image_unreadable"
    }
    assert len(unreadable) == failed + 1  # + the hostile image of the mixed study
    assert not [e for e in events if e.get("event") == "worker.unexpected_error"]
