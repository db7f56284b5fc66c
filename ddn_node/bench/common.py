"""Shared pieces of the benchmarks: synthetic data, processes, timing, printing.

Benchmarks print figures with their ratio against a peer measured in the same run, in
alternating rounds, as medians: the machines are shared and noisy, so absolute numbers
from different runs are not comparable, ratios from one run are.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

DX_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
PG_ADMIN_DSN = os.environ.get(
    "DDN_BENCH_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test"
)


def postgres_reachable(dsn: str = PG_ADMIN_DSN) -> bool:
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=3):
            return True
    except Exception:  # noqa: BLE001 - any failure means: not available
        return False


@contextmanager
def throwaway_database(
    kind: str, tmp: Path, dsn: str = PG_ADMIN_DSN, prefix: str = "ddn_tmp"
) -> Iterator[str]:
    """A URL to an empty database: a SQLite file in ``tmp``, or a new PostgreSQL database
    (dropped afterwards) on the server ``dsn`` names."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / f'{prefix}.sqlite'}"
        return
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = dict(kv.split("=", 1) for kv in dsn.split())
    try:
        yield (
            f"postgresql+psycopg://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:"
            f"{params.get('port', '5432')}/{name}"
        )
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU ({cpu}), Python {platform.python_version()}, {platform.system()} {platform.release()}"


def header(title: str, command: str) -> None:
    print(f"\n== {title} ==")
    print(f"command: {command}")
    print(f"machine: {machine()}")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=float), q))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def dx_instance(study_uid: str, series_uid: str, size: int, seed: int) -> Dataset:
    """A synthetic 16-bit DX instance (12 bits stored) of size x size pixels."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName, ds.PatientID = "BENCH^PATIENT", "BENCH"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20261127", "120000", "BENCH"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    return ds


def write_instances(folder: Path, n: int, size: int, studies: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    uids = [(generate_uid(), generate_uid()) for _ in range(studies)]
    paths = []
    for i in range(n):
        study_uid, series_uid = uids[i % studies]
        path = folder / f"{i:05d}.dcm"
        dx_instance(study_uid, series_uid, size, seed=i).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU seconds of a process (and its reaped children), from /proc: the
    process's own cost, apart from the waiting a shared machine adds to wall time."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = sum(int(fields[i]) for i in ((11, 12, 13, 14) if children else (11, 12)))
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """:func:`cpu_seconds` of a process and of all its live descendants (a node with
    several SCP processes does its work in children that outlive the measurement)."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        total += cpu_seconds(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue  # exited meanwhile: its reaped children counted with its parent
    return total


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


@dataclass
class Proc:
    """A background process with its log file."""

    args: list[str]
    log: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        handle = open(self.log, "ab")  # noqa: SIM115 - given to the child
        self.popen = subprocess.Popen(
            self.args,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(self.env or {})},
            cwd=self.cwd,
        )
        handle.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


@contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def ddn_node_cmd() -> list[str]:
    return [sys.executable, "-m", "ddn_node"]


def need(tool: str) -> bool:
    if shutil.which(tool) is None:
        print(f"  (skipped: {tool} not installed)")
        return False
    return True
