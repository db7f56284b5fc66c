"""Below the free-disk reserve the node refuses politely and keeps everything it accepted."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from support.dicomgen import make_cr, raw_association, store_file, to_file_bytes

from ddn_node.dicom.spool import Spool


def _associates(port: int) -> tuple[bool, bool]:
    """(established, rejected) for a plain echo association."""
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="DDN_NODE")
    established, rejected = assoc.is_established, assoc.is_rejected
    if established:
        assoc.release()
    return established, rejected


def test_reserve_above_free_space_rejects_associations(make_node, sqlite_url: str) -> None:
    node = make_node(sqlite_url, node={"disk_reserve_mb": 10**9})
    with node:
        established, rejected = _associates(node.port)
        assert not established and rejected
    assert any(
        e.get("event") == "scp.association_rejected" and "reserve" in e.get("reason", "")
        for e in node.events()
    )


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "smallfs"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_answers_a700_then_resumes(
    make_node, sqlite_url: str, small_fs: Path, tmp_path: Path
) -> None:
    node = make_node(sqlite_url, node={"spool_dir": str(small_fs / "spool"), "disk_reserve_mb": 8})
    files = []
    for i in range(120):
        ds = make_cr(
            "1.2.826.0.1.3680043.8.498.5",
            series_uid="1.2.826.0.1.3680043.8.498.5.1",
            sop_uid=f"1.2.826.0.1.3680043.8.498.5.1.{i + 1}",
            size=256,
            seed=i,
        )
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(to_file_bytes(ds))
        files.append(path)
    filler = small_fs / "filler.bin"
    with node:
        statuses = []
        with raw_association(node.port) as assoc:
            for path in files[:5]:
                statuses.append(store_file(assoc, path))
            # Something else fills the disk down to ~12 MB free...
            free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
            with open(filler, "wb") as handle:
                handle.write(b"\0" * (free - 12 * 1024 * 1024))
            # ... and ingest runs into the 8 MB reserve: 0xA700, on the same association.
            for path in files[5:60]:
                statuses.append(store_file(assoc, path))
        assert statuses[:5] == [0] * 5
        assert 0xA700 in statuses
        first_refusal = statuses.index(0xA700)
        assert all(s == 0 for s in statuses[:first_refusal])
        assert all(s == 0xA700 for s in statuses[first_refusal:]), (
            "accepted again below the reserve"
        )

        # The refused instance's partial file is gone, so free space sits just around the
        # reserve; once it is clearly below, new associations are refused.
        with open(filler, "ab") as handle:
            handle.write(b"\0" * (1024 * 1024))
        assert _associates(node.port) == (False, True)
        assert not Spool(small_fs / "spool").half_written(), "half-written file visible"

        # Space returns: ingest resumes.
        filler.unlink()
        assert _associates(node.port) == (True, False)
        with raw_association(node.port) as assoc:
            assert store_file(assoc, files[first_refusal]) == 0

    stored = list((small_fs / "spool" / "studies").rglob("*.dcm"))
    assert len(stored) == first_refusal + 1
