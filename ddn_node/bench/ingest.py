"""``ddn-node bench ingest``: receiving instances, the node against DCMTK storescp and Orthanc.

The sender is DCMTK ``storescu`` with ``TCP_NODELAY=1`` (Nagle off) for every receiver. Each
run starts the receiver with empty storage (nobody gets the cheap duplicate path), sends
the same files, and measures instances per second (wall time of the senders) and receiver
CPU milliseconds per instance (the node's with its SCP processes'). Receivers alternate
within each round; figures are medians. The node fsyncs every instance and commits its row before answering; storescp does not
fsync; Orthanc does (by default).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ddn_node.bench.common import (
    Proc,
    ddn_node_cmd,
    free_port,
    header,
    median,
    port_open,
    tree_cpu_seconds,
    wait_until,
    write_instances,
)
from ddn_node.demo.orthanc import LocalOrthanc, orthanc_available

NODELAY = {"TCP_NODELAY": "1"}


@dataclass
class Receiver:
    name: str
    start: Callable[
        [Path], tuple[Proc | LocalOrthanc, int, str]
    ]  # workdir -> (process, port, called AE)


def _node(work: Path) -> tuple[Proc, int, str]:
    port = free_port()
    config = work / "node.toml"
    config.write_text(
        "[node]\n"
        f'port = {port}\nhost = "127.0.0.1"\nspool_dir = "{work / "spool"}"\ndisk_reserve_mb = 64\n'
        "max_associations = 32\n"
        '[[peers]]\nae_title = "STORESCU"\nhosts = ["127.0.0.1"]\nquiet_period_s = 600\n'
        f'[database]\nurl = "sqlite:///{work / "node.db"}"\n'
        '[web]\nenabled = false\n[logging]\nlevel = "WARNING"\n'
    )
    proc = Proc(
        [*ddn_node_cmd(), "serve", "--config", str(config), "--role", "scp"], work / "node.log"
    ).start()
    wait_until(lambda: port_open(port), 60, "the node's SCP")
    return proc, port, "DDN_NODE"


def _storescp(work: Path) -> tuple[Proc, int, str]:
    port = free_port()
    (work / "out").mkdir()
    proc = Proc(
        ["storescp", "--fork", "-od", str(work / "out"), "-aet", "STORESCP", str(port)],
        work / "storescp.log",
        env=NODELAY,
    ).start()
    wait_until(lambda: port_open(port), 30, "storescp")
    return proc, port, "STORESCP"


def _orthanc(work: Path) -> tuple[LocalOrthanc, int, str]:
    port = free_port()
    orthanc = LocalOrthanc(work / "orthanc", free_port(), port, node_port=1)
    # Orthanc is built on DCMTK, which reads TCP_NODELAY from the environment.
    os.environ["TCP_NODELAY"] = "1"
    orthanc.start()
    return orthanc, port, "ORTHANC"


def _send(port: int, called: str, batches: list[list[Path]]) -> float:
    """Send each batch over its own association, all at once; returns wall seconds."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                "storescu",
                "-aet",
                "STORESCU",
                "-aec",
                called,
                "127.0.0.1",
                str(port),
                *map(str, batch),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **NODELAY},
        )
        for batch in batches
    ]
    for p in procs:
        _out, err = p.communicate(timeout=1800)
        if p.returncode != 0 or "Store Failed" in err:
            raise RuntimeError(f"storescu failed: {err[-500:]}")
    return time.perf_counter() - t0


@dataclass
class Figure:
    receiver: str
    size: int
    associations: int
    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)


def run(rounds: int = 3, quick: bool = False) -> dict[str, Figure]:
    header("ingest: instances per second received", "ddn-node bench ingest")
    receivers = [Receiver("ddn-node", _node)]
    if shutil.which("storescp"):
        receivers.append(Receiver("storescp", _storescp))
    if orthanc_available():
        receivers.append(Receiver("orthanc", _orthanc))
    sets = {2048: 8 if quick else 20, 512: 60 if quick else 200}
    figures: dict[str, Figure] = {}
    with tempfile.TemporaryDirectory(prefix="ddn-bench-") as tmp:
        root = Path(tmp)
        data = {size: write_instances(root / f"data{size}", n, size) for size, n in sets.items()}
        for r in range(rounds):
            for size, files in data.items():
                for assocs in (1, 2, 4, 8):
                    batches = [files[i::assocs] for i in range(assocs)] if assocs > 1 else [files]
                    order = receivers if r % 2 == 0 else list(reversed(receivers))
                    for rec in order:
                        work = Path(tempfile.mkdtemp(dir=root, prefix=f"{rec.name}-"))
                        proc, port, called = rec.start(work)
                        try:
                            pid = proc.pid if isinstance(proc, Proc) else proc.proc.pid  # type: ignore[union-attr]
                            cpu0 = tree_cpu_seconds(pid)
                            wall = _send(port, called, batches)
                            cpu1 = tree_cpu_seconds(pid)
                        finally:
                            proc.stop()
                            shutil.rmtree(work, ignore_errors=True)
                        fig = figures.setdefault(
                            f"{rec.name}/{size}/{assocs}", Figure(rec.name, size, assocs)
                        )
                        fig.rates.append(len(files) / wall)
                        fig.cpu_ms.append(1000 * (cpu1 - cpu0) / len(files))
    _print(figures)
    return figures


def _print(figures: dict[str, Figure]) -> None:
    print(
        f"{'receiver':10} {'size':>6} {'assoc':>5} {'inst/s':>8} {'CPU ms/inst':>12} {'vs storescp':>12} {'vs orthanc':>11}"
    )
    for _key, fig in sorted(
        figures.items(), key=lambda kv: (kv[1].size, kv[1].associations, kv[1].receiver)
    ):
        rate = median(fig.rates)
        ratios = []
        for peer in ("storescp", "orthanc"):
            other = figures.get(f"{peer}/{fig.size}/{fig.associations}")
            ratios.append(f"{rate / median(other.rates):.2f}x" if other else "-")
        print(
            f"{fig.receiver:10} {fig.size:>6} {fig.associations:>5} {rate:>8.1f} {median(fig.cpu_ms):>12.1f} "
            f"{ratios[0]:>12} {ratios[1]:>11}"
        )
    for size in (2048, 512):
        one, four = figures.get(f"ddn-node/{size}/1"), figures.get(f"ddn-node/{size}/4")
        if one and four:
            scaling = median(four.rates) / median(one.rates)
            print(
                f"ddn-node scaling {size}: 4 associations / 1 = {scaling:.2f}x "
                f"(goal >= 1.8x) {'met' if scaling >= 1.8 else 'NOT met'}"
            )
    # Issue 17: at least Orthanc's rate in every row, fsyncing every instance as it does.
    for _key, fig in sorted(figures.items(), key=lambda kv: (kv[1].size, kv[1].associations)):
        orth = figures.get(f"orthanc/{fig.size}/{fig.associations}")
        if fig.receiver == "ddn-node" and orth:
            ratio = median(fig.rates) / median(orth.rates)
            print(
                f"goal {fig.size}/{fig.associations}: {ratio:.2f}x Orthanc (goal >= 1.0x) "
                f"{'met' if ratio >= 1.0 else 'NOT met'}"
            )
