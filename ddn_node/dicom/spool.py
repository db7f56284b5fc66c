"""The spool: where received instances live on disk, written so that none is ever half there.

An instance arrives into ``incoming/`` (on the same filesystem), is fsync'd, renamed into
``studies/<study>/<sop>.dcm`` and the directory entry fsync'd, all before its database row
commits and before the C-STORE response says 0x0000. A crash at any point leaves either
nothing visible or a complete file; leftovers in ``incoming/`` are removed at start-up.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_HASH_CHUNK = 1 << 20


def safe_component(uid: str) -> str:
    """A UID as a path component; anything that is not a plain UID is hashed (no '../')."""
    uid = uid.strip().rstrip("\x00")
    if _UID_RE.match(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> int:
    """fsync a file's data; returns its size."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
        return os.fstat(handle.fileno()).st_size


def _fsync_fd(fd: int) -> int:
    """fsync an open file's data and close this descriptor of it; returns its size."""
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def file_sha256(path: Path, offset: int = 0) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _unlinked(path: Path) -> bool:
    path.unlink(missing_ok=True)
    return True


def _link_beside(tmp: Path, final: Path, relpath: str) -> str:
    """Give ``tmp`` the name ``final`` unless that exists, else a fresh name beside it.

    link() fails rather than replace (rename() would replace), which makes "is there one
    already" and "take the name" one atomic step even with two senders at once.
    """
    target, chosen = final, relpath
    while True:
        try:
            os.link(tmp, target)
            break
        except FileExistsError:
            token = secrets.token_hex(6)
            target = final.with_name(f"{final.stem}.{token}{final.suffix}")
            chosen = str(Path(relpath).with_name(target.name))
    tmp.unlink()
    return chosen


@dataclass(frozen=True)
class StoredFile:
    relpath: str
    size: int
    sha256: str
    # The directory entry's fsync, still running: the caller overlaps it with its own
    # commit and waits for it before acknowledging (see :meth:`Spool.commit`).
    entry_synced: Future[None] | None = None

    def wait_durable(self) -> None:
        """Block until the rename itself is on disk (re-raises its OSError)."""
        if self.entry_synced is not None:
            self.entry_synced.result()


class Spool:
    """The spool directory layout and its durable write protocol."""

    def __init__(self, root: Path, incoming: str = "incoming"):
        self.root = root
        # fsync and hashing release the GIL: overlapping them halves the wait per instance.
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool-io")
        # One of several SCP processes writes into a folder of its own under incoming/
        # (same filesystem: the rename stays atomic), so that when it starts again after a
        # crash it removes its own leftovers and never another process's file in flight.
        self.incoming = root / incoming
        self.studies = root / "studies"
        self.results = root / "results"
        self.quarantined = root / "quarantine"

    def prepare(self, *, folders: bool = False) -> int:
        """Create the layout and remove half-written leftovers; returns how many were removed.

        With ``folders``, also those in the folders of incoming/ that SCP processes write
        into (only while none runs: before a group of them starts)."""
        for path in (self.incoming, self.studies, self.results):
            path.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in self.incoming.iterdir():
            if leftover.is_dir() and folders:
                removed += sum(1 for f in leftover.iterdir() if f.is_file() and _unlinked(f))
            elif leftover.is_file():
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed

    def half_written(self) -> list[Path]:
        """Files in incoming/ and its folders: instances still arriving, or left by a crash."""
        return [p for p in self.incoming.rglob("*") if p.is_file()]

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def instance_relpath(self, study_uid: str, sop_instance_uid: str) -> str:
        return f"studies/{safe_component(study_uid)}/{safe_component(sop_instance_uid)}.dcm"

    def result_relpath(self, study_uid: str, sop_instance_uid: str, suffix: str = ".dcm") -> str:
        return f"results/{safe_component(study_uid)}/{safe_component(sop_instance_uid)}{suffix}"

    def commit(
        self,
        tmp: Path,
        relpath: str,
        sha256: str | None = None,
        hash_from: int = 0,
        *,
        overlap: bool = False,
        keep_existing: bool = False,
        synced: Future[int] | None = None,
    ) -> StoredFile:
        """Make ``tmp`` durable and move it to ``relpath`` atomically.

        ``tmp`` must be on the spool's filesystem (``incoming/``) so the rename is atomic.
        The recorded sha256 covers the bytes from ``hash_from`` (the data set, for received
        instances: what the sender put on the wire). The file's fsync runs while it is
        hashed. With ``overlap``, the fsync of the directory entry is left running in
        :attr:`StoredFile.entry_synced` so the caller can commit its database row
        meanwhile and must call :meth:`StoredFile.wait_durable` before it acknowledges;
        otherwise it is waited for here.

        With ``keep_existing``, a file already at ``relpath`` is never replaced: the new
        one goes beside it under a fresh name (returned in :attr:`StoredFile.relpath`), so
        that the database decides which one an instance names (a re-send may be identical,
        a changed version, or another patient's instance under a colliding UID).

        ``synced``: the file's fsync, started earlier with :meth:`start_sync` (so that
        it runs while the caller reads the header); the rename waits for it all the same.
        """
        if synced is None:
            synced = self.start_sync(tmp)
        digest = sha256 or file_sha256(tmp, hash_from)
        size = synced.result()
        final = self.root / relpath
        parent = final.parent
        if not parent.is_dir():
            parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(parent.parent)
        if keep_existing:
            relpath = _link_beside(tmp, final, relpath)
        else:
            os.replace(tmp, final)
        entry = self._io.submit(fsync_dir, parent)
        stored = StoredFile(relpath=relpath, size=size, sha256=digest, entry_synced=entry)
        if not overlap:
            stored.wait_durable()
        return stored

    def start_sync(self, tmp: Path, fd: int | None = None) -> Future[int]:
        """Start fsyncing a file in ``incoming/`` (its size is the result); pass it to
        :meth:`commit`. Harmless if the file is then refused and removed instead.

        ``fd``: the file, open (the SCP's received file): synced through a duplicate of
        that descriptor, which is the sync's own to close whenever the writer closes
        its, instead of opening the file again by name."""
        if fd is not None:
            return self._io.submit(_fsync_fd, os.dup(fd))
        return self._io.submit(_fsync_file, tmp)

    def quarantine(self, relpath: str) -> str:
        """Move a received file out of ``studies/`` into ``quarantine/``, durably; returns
        its new relative path. For instances refused after their bytes were written."""
        name = f"{secrets.token_hex(8)}-{Path(relpath).name}"
        target = self.quarantined / name
        self.quarantined.mkdir(parents=True, exist_ok=True)
        os.replace(self.root / relpath, target)
        fsync_dir(self.quarantined)
        fsync_dir((self.root / relpath).parent)
        return f"quarantine/{name}"

    def write_bytes(self, relpath: str, data: bytes) -> StoredFile:
        """Durably write bytes we produced ourselves (results) to ``relpath``."""
        tmp = self.incoming / f"{os.getpid()}-{hashlib.sha1(relpath.encode()).hexdigest()}.part"
        with open(tmp, "wb") as handle:
            handle.write(data)
        return self.commit(tmp, relpath, hashlib.sha256(data).hexdigest())
