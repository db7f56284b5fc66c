"""``ddn-node bench scale``: analysis throughput with 1, 2 and 4 worker processes.

One SCP process and N ``serve --role worker`` processes (one torch thread each) share a
throw-away PostgreSQL database and one spool, as workers on several hosts would. The same
studies are sent for every N; the figure is studies analysed per minute from the first
study completed to the last analysed, with its ratio to one worker. On a 2-core machine
the curve flattens at two workers: the point here is the shape and that the queue shares
work correctly; on more cores or GPUs it keeps rising until the database is the limit.
"""

from __future__ import annotations

import subprocess
import tempfile
from functools import partial
from pathlib import Path

from pynetdicom import AE
from sqlalchemy import func, select

from ddn_node.bench.common import (
    Proc,
    ddn_node_cmd,
    free_port,
    header,
    port_open,
    postgres_reachable,
    throwaway_database,
    wait_until,
    write_instances,
)
from ddn_node.dicom.hardening import send_datasets_from_files
from ddn_node.store.engine import Database, make_database
from ddn_node.store.models import Result, Study


def _write_config(work: Path, url: str, port: int, model: Path) -> Path:
    path = work / "scale.toml"
    path.write_text(
        f'[node]\nport = {port}\nhost = "127.0.0.1"\nspool_dir = "{work / "spool"}"\ndisk_reserve_mb = 64\n'
        '[[peers]]\nae_title = "BENCH"\nhosts = ["127.0.0.1"]\nquiet_period_s = 0.5\n'
        f'[database]\nurl = "{url}"\n'
        "[completion]\nsweep_interval_s = 0.3\n"
        "[worker]\npoll_interval_s = 0.2\ntorch_threads = 1\n"
        f'[[routing]]\nname = "cxr"\nmodel = "{model}"\nhead = "cxr"\nmodalities = ["CR", "DX"]\n'
        '[web]\nenabled = false\n[logging]\nlevel = "INFO"\n'
    )
    return path


def _send(port: int, files: list[Path]) -> None:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="DDN_NODE")
    send_datasets_from_files()
    try:
        for path in files:
            assoc.send_c_store(path)
    finally:
        assoc.release()


def run(
    workers: tuple[int, ...] = (1, 2, 4), studies: int = 16, model: Path = Path("models/ddn-cxr")
) -> dict[int, float]:
    header(
        "scale out: studies analysed per minute vs worker processes (PostgreSQL)",
        "ddn-node bench scale",
    )
    if not postgres_reachable():
        print("  (skipped: PostgreSQL not reachable)")
        return {}
    if not (model / "manifest.json").is_file():
        print(f"  (skipped: no model at {model})")
        return {}
    rates: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="ddn-bench-scale-") as tmp:
        root = Path(tmp)
        files = write_instances(root / "data", studies, 1024, studies=studies)
        for n in workers:
            work = Path(tempfile.mkdtemp(dir=root, prefix=f"w{n}-"))
            with throwaway_database("postgres", work, prefix="ddn_bench") as url:
                port = free_port()
                config = _write_config(work, url, port, model.resolve())
                subprocess.run(
                    [*ddn_node_cmd(), "db", "upgrade", "--config", str(config)],
                    check=True,
                    capture_output=True,
                )
                procs = [
                    Proc(
                        [*ddn_node_cmd(), "serve", "--config", str(config), "--role", "scp"],
                        work / "scp.log",
                    ).start()
                ]
                procs += [
                    Proc(
                        [*ddn_node_cmd(), "serve", "--config", str(config), "--role", "worker"],
                        work / f"w{i}.log",
                    ).start()
                    for i in range(n)
                ]
                db = make_database(url)
                try:
                    wait_until(partial(port_open, port), 120, "SCP")

                    def workers_ready(w: Path = work, k: int = n) -> bool:
                        return all(
                            "serve.worker_ready" in (w / f"w{i}.log").read_text() for i in range(k)
                        )

                    wait_until(workers_ready, 300, "workers ready")
                    _send(port, files)

                    def analysed(db: Database = db) -> int:
                        with db.read() as s:
                            return int(s.scalar(select(func.count()).select_from(Result)) or 0)

                    wait_until(lambda: analysed() >= studies, 1800, "all studies analysed")
                    with db.read() as s:
                        first = s.scalar(select(func.min(Study.completed_at)))
                        last = s.scalar(select(func.max(Result.created_at)))
                    assert first is not None and last is not None  # all studies were analysed
                    minutes = (last - first).total_seconds() / 60
                    rates[n] = studies / minutes
                finally:
                    db.dispose()
                    for p in procs:
                        p.stop()
            print(
                f"{n} worker(s): {rates[n]:6.1f} studies/min ({rates[n] / rates[workers[0]]:.2f}x one worker)",
                flush=True,
            )
    return rates
