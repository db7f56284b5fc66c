"""Files only the node can read (issue 15): whatever umask the administrator's shell has,
the spool (received instances, results, quarantine), the SQLite database with its WAL and
the log file are created for the node's user alone: files 0600, folders 0700."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sqlalchemy import select
from support.artifacts import make_test_artifact
from support.dicomgen import make_cr, raw_association, store_file, to_file_bytes
from support.net import wait_for

from ddn_node.store.engine import make_database
from ddn_node.store.models import Result


def _open_to_others(root: Path) -> list[str]:
    """Every path under root that its group or others may read, write or enter."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            found.append(f"{path.relative_to(root.parent)} {mode:o}")
    return found


def test_everything_the_node_writes_is_private_under_a_permissive_umask(
    make_node, tmp_path: Path
) -> None:
    model = make_test_artifact(tmp_path / "model", threshold=0.0)
    home = tmp_path / "private"
    home.mkdir()
    db_path = home / "var" / "ddn-node.db"
    node = make_node(
        f"sqlite:///{db_path}",
        roles=("scp", "worker"),
        routing=[{"name": "cxr", "model": str(model), "head": "cxr", "modalities": ["CR"]}],
        logging={"level": "INFO", "json": True, "file": str(home / "log" / "ddn-node.log")},
    )
    node.config["node"]["spool_dir"] = str(home / "spool")
    node.__post_init__()
    # The harness reads the node's own log file (and creates it first, open to everyone:
    # the node must close it to others all the same).
    node.log_path = home / "log" / "ddn-node.log"
    node.log_path.parent.mkdir(mode=0o700)
    image = tmp_path / "cr.dcm"
    image.write_bytes(to_file_bytes(make_cr("1.2.826.0.1.3680043.8.498.7070")))
    # The node inherits this process's umask: the most permissive one a shell may have.
    previous = os.umask(0)
    try:
        node.start()
    finally:
        os.umask(previous)
    try:
        with raw_association(node.port) as assoc:
            assert store_file(assoc, image) == 0
        db = make_database(node.db_url)
        try:

            def analysed() -> bool:
                with db.read() as s:
                    return s.scalar(select(Result.completed_at)) is not None

            wait_for(analysed, 120, "the study analysed (results written)")
        finally:
            db.dispose()
    finally:
        node.stop()
    assert list((home / "spool" / "studies").rglob("*.dcm")), "no instance stored"
    assert list((home / "spool" / "results").rglob("*.dcm")), "no result written"
    assert (home / "log" / "ddn-node.log").stat().st_size > 0
    opened = [p for sub in ("spool", "var", "log") for p in _open_to_others(home / sub)]
    assert opened == []
