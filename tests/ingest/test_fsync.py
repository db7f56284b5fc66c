"""0x0000 only once the instance is durable, seen by a test.

A SIGKILL keeps the page cache, so tests/ingest/test_durability.py would pass with every
fsync removed. Here the fsyncs themselves fail (an in-process SCP, ``os.fsync``
monkeypatched to raise EIO for one path): the answer must turn into 0xA700 and leave no
half-instance visible. Without the fsync of the file, of its directory entry, or the wait
for the latter (it overlaps the database commit), the node would answer 0x0000 here.
Then the order itself, on a real node process: the system calls traced with strace show
fsync(file), link, fsync(directory) and the database's own sync of its commit all done
before the C-STORE response is written to the socket.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from support.dicomgen import make_cr, raw_association, store_file
from support.net import free_port

from ddn_node.config import Settings
from ddn_node.dicom.scp import StorageSCP
from ddn_node.dicom.spool import Spool
from ddn_node.store.engine import Database
from ddn_node.store.models import Instance, Study

STUDY = "1.2.826.0.1.3680043.10.1.16.7"
SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700


@pytest.fixture
def scp(tmp_path: Path, db_url: str, db: Database) -> Iterator[StorageSCP]:
    settings = Settings.model_validate(
        {
            "node": {"host": "127.0.0.1", "port": free_port(), "spool_dir": str(tmp_path / "s")},
            "peers": [{"ae_title": "TESTSCU"}],
            "database": {"url": db_url},
        }
    )
    spool = Spool(settings.node.spool_dir)
    spool.prepare()
    server = StorageSCP(settings, db, spool)
    server.start()
    yield server
    server.stop()


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _failing_fsync(monkeypatch: pytest.MonkeyPatch, fails: Callable[[Path], bool]) -> list[Path]:
    """os.fsync raises EIO for the paths ``fails`` picks; returns the paths it was asked
    to sync (all of them, failed or not)."""
    real = os.fsync
    asked: list[Path] = []

    def fsync(fd: int) -> None:
        path = Path(_fd_path(fd))
        asked.append(path)
        if fails(path):
            raise OSError(errno.EIO, "injected: the disk did not keep it", str(path))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return asked


def _send(scp: StorageSCP, tmp_path: Path, n: int = 1) -> int | None:
    ds = make_cr(STUDY, sop_uid=f"{STUDY}.1.{n}", series_uid=f"{STUDY}.1")
    path = tmp_path / f"{n}.dcm"
    ds.save_as(path, enforce_file_format=True)
    with raw_association(scp.settings.node.port) as assoc:
        return store_file(assoc, path)


def _visible(scp: StorageSCP, db: Database) -> tuple[list[Path], int, int]:
    """What a reader sees: files under studies/, instance rows, study rows."""
    files = sorted(p for p in scp.spool.studies.rglob("*") if p.is_file())
    with db.read() as s:
        instances = s.scalar(select(func.count()).select_from(Instance)) or 0
        studies = s.scalar(select(func.count()).select_from(Study)) or 0
    return files, instances, studies


@pytest.mark.parametrize(
    "which",
    [
        "the file",  # its data, before the rename
        "the new study folder's entry",  # studies/ after mkdir of studies/<study>
    ],
)
def test_a_failed_fsync_before_the_rename_answers_a700_and_shows_nothing(
    scp: StorageSCP,
    db: Database,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    which: str,
) -> None:
    spool = scp.spool
    if which == "the file":
        asked = _failing_fsync(monkeypatch, lambda p: p.parent == spool.incoming)
    else:
        asked = _failing_fsync(monkeypatch, lambda p: p == spool.studies)
    assert _send(scp, tmp_path) == OUT_OF_RESOURCES
    assert asked, "the SCP never asked for an fsync"
    files, instances, studies = _visible(scp, db)
    assert (files, instances, studies) == ([], 0, 0)


def test_a_failed_fsync_of_the_directory_entry_answers_a700_and_a_resend_is_kept_once(
    scp: StorageSCP, db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename is not on disk: not acknowledged, although the row committed meanwhile
    (the two overlap). The file is whole (its data was synced), so what is visible is
    a complete instance that the sender re-sends, and the re-send is the same one."""
    spool = scp.spool
    folder = spool.path(spool.instance_relpath(STUDY, f"{STUDY}.1.1")).parent
    failing = True
    asked = _failing_fsync(monkeypatch, lambda p: failing and p == folder)
    assert _send(scp, tmp_path) == OUT_OF_RESOURCES
    assert folder in asked
    failing = False
    assert _send(scp, tmp_path) == SUCCESS
    files, instances, studies = _visible(scp, db)
    assert (len(files), instances, studies) == (1, 1, 1)


# -- the order of the system calls, on a node process ---------------------------------

_SYSCALLS = "fsync,fdatasync,link,linkat,rename,renameat,renameat2,sendto,write,sendmsg"
# One strace -f line: "<pid> <name>(<args>) = <ret>", or an unfinished / resumed half.
_LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()(.*)$")


def _can_trace() -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-o", "/dev/null", "true"], capture_output=True, check=False)
    return probe.returncode == 0  # ptrace may be forbidden in a container


@pytest.mark.skipif(not _can_trace(), reason="strace missing, or ptrace not permitted here")
def test_fsyncs_and_the_commit_precede_the_success_response(
    make_node, sqlite_url: str, tmp_path: Path
) -> None:
    trace = tmp_path / "strace.txt"
    node = make_node(sqlite_url)
    node.wrapper = (
        "strace", "-f", "-qq", "-yy", "-x", "-s", "4", "-e", f"trace={_SYSCALLS}",
        "-o", str(trace),
    )  # fmt: skip
    node.start(timeout=120)
    ds = make_cr(STUDY, sop_uid=f"{STUDY}.1.1", series_uid=f"{STUDY}.1")
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    with raw_association(node.port) as assoc:
        assert store_file(assoc, path) == SUCCESS
        client_port = assoc.local["port"]
    # Stop the node itself (strace would only detach on SIGTERM), then strace ends.
    assert node.proc is not None
    children = Path(f"/proc/{node.proc.pid}/task/{node.proc.pid}/children").read_text()
    os.kill(int(children.split()[0]), signal.SIGTERM)
    node.proc.wait(60)

    # Per call: the line it started on and the line it completed on (strace -f splits a
    # call that another thread interrupts into "<unfinished ...>" and "<... resumed>").
    started: dict[str, list[tuple[int, str]]] = {}
    calls: list[tuple[str, str, int, int]] = []  # name, arguments, start line, end line
    for n, line in enumerate(trace.read_text().splitlines()):
        m = _LINE.match(line)
        if not m:
            continue
        pid, resumed, name, rest = m.group(1), m.group(2), m.group(3), m.group(4)
        if resumed:
            begun = started.get(pid + resumed, [])
            if begun:
                start, args = begun.pop()
                calls.append((resumed, args + rest, start, n))
        elif rest.endswith("<unfinished ...>"):
            started.setdefault(pid + name, []).append((n, rest))
        else:
            calls.append((name, rest, n, n))

    study_dir = f"/studies/{STUDY}>"
    sock = f"127.0.0.1:{client_port}]"

    def first(pick: Callable[[str, str], bool], what: str, after: int = -1) -> tuple[int, int]:
        for name, args, start, end in calls:
            if start > after and pick(name, args):
                return start, end
        raise AssertionError(f"no {what} in the trace:\n{trace.read_text()[-3000:]}")

    # The C-STORE response: the first P-DATA-TF (PDU type 04) written to the client.
    response, _ = first(
        lambda n, a: n in ("sendto", "write", "sendmsg") and sock in a and '"\\x04' in a,
        "C-STORE response",
    )
    _, file_synced = first(
        lambda n, a: n == "fsync" and "/incoming/" in a.split(">", 1)[0], "fsync of the file"
    )
    _, linked = first(
        lambda n, a: n in ("link", "linkat") and f"/studies/{STUDY}/" in a, "link into studies/"
    )
    _, entry_synced = first(
        lambda n, a: n == "fsync" and study_dir in a.split(",", 1)[0], "fsync of the folder"
    )
    # The instance's commit (synchronous=FULL): the first sync of SQLite's write-ahead
    # log after the file took its name (the node's start-up committed before).
    _, committed = first(
        lambda n, a: n in ("fsync", "fdatasync") and "-wal>" in a.split(",", 1)[0],
        "sync of the database's write-ahead log",
        after=linked,
    )
    assert file_synced < linked < entry_synced < response
    assert committed < response
