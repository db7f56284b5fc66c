"""PostgreSQL restarted under load: the node answers 0xA700 while it is away (never 0x0000
for what it could not record), reconnects by itself, and loses nothing acknowledged."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from sqlalchemy import select
from support.dicomgen import dataset_sha256, make_cr, raw_association, store_file, to_file_bytes
from support.net import wait_for

from ddn_node.store.engine import make_database
from ddn_node.store.models import Instance

pytestmark = [pytest.mark.slow, pytest.mark.serial]


def _pg_restart() -> subprocess.CompletedProcess[str]:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    return subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(
    shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir(),
    reason="no local PostgreSQL cluster to restart",
)
def test_ingest_survives_a_database_restart(make_node, postgres_url: str, tmp_path: Path) -> None:
    node = make_node(postgres_url)
    files = []
    for i in range(150):
        ds = make_cr(
            "1.2.826.0.1.3680043.8.498.515",
            series_uid="1.2.826.0.1.3680043.8.498.515.1",
            sop_uid=f"1.2.826.0.1.3680043.8.498.515.1.{i + 1}",
            size=128,
            seed=i,
        )
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(to_file_bytes(ds))
        files.append(path)
    statuses: dict[str, int | None] = {}
    with node:

        def send(batch: list[Path]) -> None:
            with raw_association(node.port) as assoc:
                for p in batch:
                    statuses[p.name] = store_file(assoc, p)

        sender = threading.Thread(target=send, args=(files,))
        sender.start()
        wait_for(lambda: len(statuses) >= 20, 60, "ingest under way")
        restarted = _pg_restart()
        assert restarted.returncode == 0, restarted.stderr
        sender.join(120)
        refused = [name for name, st in statuses.items() if st != 0]
        assert set(statuses.values()) <= {0x0000, 0xA700}
        # The PACS re-sends what was refused; the node has reconnected by then.
        send([p for p in files if statuses[p.name] != 0])
        assert all(st == 0 for st in statuses.values())
    db = make_database(postgres_url)
    try:
        with db.read() as s:
            rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
    finally:
        db.dispose()
    assert len(rows) == len(files)
    for i, path in enumerate(files):
        assert dataset_sha256(
            node.spool / rows[f"1.2.826.0.1.3680043.8.498.515.1.{i + 1}"].path
        ) == dataset_sha256(path)
    print(f"refused while PostgreSQL restarted: {len(refused)} of {len(files)}")
