"""Shared plumbing of the peer harnesses: subprocesses whose output is watched line by line,
readiness by the kernel's listening-socket table, per-file store results.

Nothing here sleeps to guess timing: every wait is on a condition (a line printed, a socket
listening, a process ended) with a generous timeout, for a busy 2-core CI machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

#: Default patience for a peer to start or answer (CI is a busy 2-core box; a JVM starts slowly).
START_TIMEOUT_S = 120.0
#: Default limit for one sender run (association + all C-STOREs).
SEND_TIMEOUT_S = 300.0


class PeerError(RuntimeError):
    """A peer failed to start, died, or printed something the harness cannot read."""


@dataclass(frozen=True)
class StoreResult:
    """What one sender reported for one file.

    ``status`` is the DIMSE status of the C-STORE response when the peer exposes it (DCMTK,
    dcmjs); ``None`` when there was no response (presentation context refused, association
    refused, file unreadable) or the peer only says succeeded / failed (PixelMed).
    ``ok`` is the sender's own verdict (success or warning). ``context_refused`` is true when
    the SCP refused the presentation context of the file's SOP class, so nothing was sent.
    """

    file: Path
    ok: bool
    status: int | None = None
    context_refused: bool = False
    detail: str = ""

    @property
    def status_hex(self) -> str | None:
        return None if self.status is None else f"0x{self.status:04X}"


def tool(name: str, *fallbacks: str) -> str | None:
    """Absolute path of a command-line tool, or None."""
    for candidate in (name, *fallbacks):
        found = shutil.which(candidate)
        if found:
            return found
        if os.path.isabs(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _listening_sockets() -> dict[int, set[str]]:
    """Listening TCP port -> socket inodes, from the kernel's tables."""
    found: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A":  # TCP_LISTEN
                found.setdefault(int(parts[1].rsplit(":", 1)[1], 16), set()).add(parts[9])
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        entries = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in entries:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def port_listening(port: int, pid: int | None = None) -> bool:
    """True once something (process ``pid`` when given) listens on ``port``.

    Read from /proc/net/tcp{,6} and /proc/PID/fd, deliberately not by a connect() probe:
    CTN simple_storage exits when a connection closes before an A-ASSOCIATE-RQ, and other
    peers log spurious errors. With ``pid`` a port taken by some other process between
    free_port() and our bind is not mistaken for ours.
    """
    if not Path("/proc/net/tcp").exists():  # pragma: no cover - non-Linux fallback
        import socket

        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0
    inodes = _listening_sockets().get(port)
    if not inodes:
        return False
    return pid is None or bool(inodes & _socket_inodes(pid))


class WatchedProcess:
    """A subprocess with stdout+stderr merged, copied to ``log_path`` and kept in memory so
    callers can wait for a line (or any condition on the lines) to appear."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        stdin_data: bytes | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by the reader
        self._log.write(f"$ {' '.join(self.argv)}\n")
        self._log.flush()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() reaches forked children too
        )
        if stdin_data is not None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(stdin_data)
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        self._reader = threading.Thread(
            target=self._read, name=f"peer-log-{Path(self.argv[0]).name}", daemon=True
        )
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self._log.write(line + "\n")
            self._log.flush()
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        self.proc.stdout.close()
        self._log.close()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_until(
        self,
        predicate: Callable[[list[str]], object],
        timeout: float,
        what: str,
        poll: float = 0.05,
    ) -> object:
        """Wait until ``predicate(lines)`` is truthy; PeerError when the process ends first.

        Re-checked on every new output line and at least every ``poll`` seconds, so the
        predicate may also look at the outside world (a listening socket, files)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate(self._lines)
                if value:
                    return value
                if self._eof:
                    raise PeerError(
                        f"{what}: process ended (rc={self.proc.poll()}) first; log {self.log_path}:\n{self._tail()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"timed out after {timeout:.0f}s waiting for {what}; log {self.log_path}:\n{self._tail()}"
                    )
                self._cond.wait(min(remaining, poll))

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to end and its output to be read completely."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(
                f"{self.argv[0]} did not finish within {timeout:.0f}s; log {self.log_path}:\n{self._tail()}"
            ) from None
        self._reader.join(timeout)
        return rc

    def _tail(self, n: int = 40) -> str:
        return "\n".join(self._lines[-n:])

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group()
        self._reader.join(timeout)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # the kernel will reap it
            self.proc.wait(10)

    def _reap_group(self) -> None:
        # Forked children (storescp --fork, simple_storage -f) share the process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def run_to_end(
    argv: Sequence[str],
    log_path: Path,
    *,
    timeout: float = SEND_TIMEOUT_S,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stdin_data: bytes | None = None,
) -> tuple[int, list[str]]:
    """Run a sender to completion: (exit status, output lines)."""
    proc = WatchedProcess(argv, log_path, cwd=cwd, env=env, stdin_data=stdin_data)
    rc = proc.wait_exit(timeout)
    return rc, proc.lines


@dataclass
class Receiver:
    """Base of the receiver harnesses: start() / stop() / context manager, a store folder,
    a port, a log. Subclasses give the command line and say when it is ready."""

    folder: Path
    port: int = 0
    aet: str = "PEER_SCP"
    start_timeout: float = START_TIMEOUT_S
    process: WatchedProcess | None = field(default=None, init=False, repr=False)

    name = "peer"

    @property
    def store_dir(self) -> Path:
        return self.folder / "received"

    @property
    def log_path(self) -> Path:
        return self.folder / f"{self.name}.log"

    # -- to override -------------------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def cwd(self) -> Path | None:
        return None

    def env(self) -> dict[str, str] | None:
        return None

    def prepare(self) -> None:
        """Write config files etc. before the process starts."""

    def wait_ready(self, proc: WatchedProcess) -> None:
        proc.wait_until(
            lambda _lines: port_listening(self.port, proc.proc.pid),
            self.start_timeout,
            f"{self.name} listening on {self.port}",
        )

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Self:
        from support.net import free_port

        if self.process is not None and self.process.alive():
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        fixed_port = bool(self.port)
        last: Exception | None = None
        for _attempt in range(3):  # a free_port() can be taken by someone else before we bind
            if not fixed_port:
                self.port = free_port()
            self.prepare()
            proc = WatchedProcess(self.command(), self.log_path, cwd=self.cwd(), env=self.env())
            self.process = proc
            try:
                self.wait_ready(proc)
                return self
            except PeerError as exc:
                last = exc
                proc.stop()
                if fixed_port:
                    break
            except BaseException:
                proc.stop()
                raise
        raise PeerError(f"{self.name} did not start: {last}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what arrived ------------------------------------------------------------------------
    def received_files(self) -> list[Path]:
        """Complete files received so far (subclasses skip their partial/temporary names)."""
        return sorted(
            p for p in self.store_dir.rglob("*") if p.is_file() and not p.name.startswith(".")
        )

    def received_sop_instances(self) -> set[str]:
        import pydicom

        uids: set[str] = set()
        for path in self.received_files():
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            uids.add(str(ds.SOPInstanceUID))
        return uids

    def wait_for_files(self, count: int, timeout: float = START_TIMEOUT_S) -> list[Path]:
        """Wait until at least ``count`` files were received (complete, see received_files)."""
        assert self.process is not None, "not started"
        value = self.process.wait_until(
            lambda _lines: files if len(files := self.received_files()) >= count else None,
            timeout,
            f"{count} file(s) in {self.store_dir}",
        )
        assert isinstance(value, list)
        return value
