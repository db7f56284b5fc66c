"""Load: eight senders at once (DCMTK storescu processes and pynetdicom SCUs), a study of
hundreds of instances, and an instance of hundreds of MB streamed to disk. No association
is rejected below the limit, nothing is dropped, and the node's memory stays flat."""

from __future__ import annotations

import os
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from pydicom.filewriter import dcmwrite
from sqlalchemy import func, select
from support.dicomgen import dataset_sha256, make_cr, raw_association, store_file, to_file_bytes
from support.net import wait_for

from ddn_node.dicom.spool import Spool
from ddn_node.store.engine import make_database
from ddn_node.store.models import Instance, Study

pytestmark = pytest.mark.slow


def _rss_kb(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB, from /proc."""
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _files(tmp: Path, tag: str, n: int, size: int) -> list[Path]:
    folder = tmp / tag
    folder.mkdir()
    study = f"1.2.826.0.1.3680043.8.498.{abs(hash(tag)) % 10**8}"
    out = []
    for i in range(n):
        ds = make_cr(
            study, series_uid=f"{study}.1", sop_uid=f"{study}.1.{i + 1}", size=size, seed=i
        )
        path = folder / f"{i:04d}.dcm"
        path.write_bytes(to_file_bytes(ds))
        out.append(path)
    return out


@pytest.mark.parametrize(
    "per_sender",
    [
        pytest.param(int(os.environ.get("DDN_LOAD_FILES", "25")), id="ci"),
        # Minutes of sustained load for `make soak`: 8 x 1,500 instances.
        pytest.param(
            int(os.environ.get("DDN_SOAK_LOAD_FILES", "1500")), id="soak", marks=pytest.mark.soak
        ),
    ],
)
def test_eight_concurrent_senders(
    make_node, sqlite_url: str, tmp_path: Path, per_sender: int
) -> None:
    # Eight senders from one host is this test's load, not a per-host limit test: the
    # start-up port probe may still hold one of the host's connections while they connect
    # (tests/hostile/test_port_abuse.py tests the limit itself).
    node = make_node(sqlite_url, node={"max_associations": 16, "max_connections_per_host": 16})
    batches = [_files(tmp_path, f"sender{k}", per_sender, 256) for k in range(8)]
    with node:
        assert node.proc is not None
        rss_before, _ = _rss_kb(node.proc.pid)
        procs = [
            subprocess.Popen(
                [
                    "storescu",
                    "-aet",
                    "STORESCU",
                    "-aec",
                    "DDN_NODE",
                    "127.0.0.1",
                    str(node.port),
                    *map(str, batch),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
            for batch in batches[:4]
        ]
        statuses: list[int | None] = []
        lock = threading.Lock()

        def pynetdicom_sender(batch: list[Path]) -> None:
            with raw_association(node.port) as assoc:
                assert assoc.is_established, "association rejected below the limit"
                for path in batch:
                    status = store_file(assoc, path)
                    with lock:
                        statuses.append(status)

        threads = [threading.Thread(target=pynetdicom_sender, args=(b,)) for b in batches[4:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        for p in procs:
            _out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            assert "Store Failed" not in err and "Rejected" not in err
        assert statuses == [0] * (4 * per_sender)
        db = make_database(sqlite_url)
        try:

            def count() -> int:
                with db.read() as s:
                    return int(s.scalar(select(func.count()).select_from(Instance)) or 0)

            wait_for(lambda: count() == 8 * per_sender, 30, "every instance recorded")
        finally:
            db.dispose()
        rss_after, peak = _rss_kb(node.proc.pid)
    rejected = [e for e in node.events() if e.get("event") == "scp.association_rejected"]
    assert rejected == []
    print(
        f"8 senders x {per_sender}: RSS {rss_before // 1024} -> {rss_after // 1024} MiB, peak {peak // 1024} MiB"
    )
    assert rss_after - rss_before < 100 * 1024, "memory grew with the load"


def test_a_study_of_hundreds_of_instances(make_node, sqlite_url: str, tmp_path: Path) -> None:
    node = make_node(sqlite_url, completion={"quiet_period_s": 1, "sweep_interval_s": 0.2})
    files = _files(tmp_path, "big-study", int(os.environ.get("DDN_BIG_STUDY", "300")), 64)
    with node, raw_association(node.port) as assoc:
        assert [store_file(assoc, p) for p in files] == [0] * len(files)
    db = make_database(sqlite_url)
    try:
        with db.read() as s:
            study = s.scalars(select(Study)).one()
    finally:
        db.dispose()
    assert study.num_instances == len(files)


def _write_large_instance(path: Path, frames: int, rows: int, cols: int) -> None:
    """A multi-frame 16-bit instance written in chunks, never whole in memory."""
    ds = make_cr("1.2.826.0.1.3680043.8.498.909", size=8)
    del ds.PixelData
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = (
        "1.2.840.10008.5.1.4.1.1.12.1"  # XA: multi-frame
    )
    ds.Modality = "XA"
    with open(path, "wb") as handle:
        dcmwrite(handle, ds, enforce_file_format=True)
        length = frames * rows * cols * 2
        handle.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        chunk = os.urandom(1 << 20)
        written = 0
        while written < length:
            n = min(len(chunk), length - written)
            handle.write(chunk[:n])
            written += n


def test_a_large_instance_is_streamed_to_disk(make_node, sqlite_url: str, tmp_path: Path) -> None:
    frames = int(os.environ.get("DDN_LARGE_FRAMES", "20"))
    path = tmp_path / "large.dcm"
    _write_large_instance(path, frames, 2048, 2048)  # 20 x 8 MiB = 160 MiB
    size_mb = path.stat().st_size / 2**20
    node = make_node(sqlite_url, node={"max_instance_mb": 4096})
    with node:
        assert node.proc is not None
        rss_before, _ = _rss_kb(node.proc.pid)
        with raw_association(
            node.port,
            contexts=[("1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.1.2.1")],
            timeout=120,
        ) as assoc:
            assert store_file(assoc, path) == 0
        _rss, peak = _rss_kb(node.proc.pid)
    stored = next((node.spool / "studies").rglob("*.dcm"))
    assert dataset_sha256(stored) == dataset_sha256(path)
    print(
        f"{size_mb:.0f} MiB instance: node peak RSS {peak // 1024} MiB (before {rss_before // 1024} MiB)"
    )
    assert (peak - rss_before) / 1024 < size_mb / 2, "the instance was held in memory"


def test_an_instance_above_the_configured_maximum_is_refused(
    make_node, sqlite_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "big.dcm"
    _write_large_instance(path, 3, 1024, 1024)  # 6 MiB
    node = make_node(sqlite_url, node={"max_instance_mb": 2})
    with node:
        with raw_association(
            node.port, contexts=[("1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.1.2.1")]
        ) as assoc:
            assert store_file(assoc, path) == 0xA700
        assert not list((node.spool / "studies").rglob("*.dcm"))
        assert not Spool(node.spool).half_written()
    assert any(e.get("reason") == "instance above max_instance_mb" for e in node.events())
