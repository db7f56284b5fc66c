"""``ddn-node bench e2e``: from a study's last instance to its SR stored in the PACS.

Orthanc (the PACS) pushes N single-image chest studies to the node, one at a time
(steady) and all at once (burst). For each study the latency is the time between the node
receiving its last instance and Orthanc answering 0x0000 to the node's C-STORE of the SR,
minus the configured quiet period; both instants are the node's own database timestamps,
so no polling error enters. Also reports the node's memory: idle with the model loaded,
peak under ingest and inference, and the SCP role alone.

Urgent first (phase ``stat``): N routine studies are sent, then one more study behind
them, twice in the same run. The first time the last study's order says nothing (what
first in, first out gives it: the peer); the second time its Requested Procedure
Priority is STAT. Each time its time to SR is printed against the median of the routine
studies it arrived behind.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import select

from ddn_node.bench.common import (
    Proc,
    ddn_node_cmd,
    dx_instance,
    free_port,
    header,
    percentile,
    port_open,
    rss_mib,
    wait_until,
    write_instances,
)
from ddn_node.demo.orthanc import LocalOrthanc, orthanc_available
from ddn_node.store.engine import make_database
from ddn_node.store.models import Delivery, Result, Study
from ddn_node.vocabulary import DeliveryState, ResultKind, StudyState

QUIET_S = 1.0


PHASES = ("steady", "burst", "stat")


@dataclass(frozen=True)
class BehindBacklog:
    """Time to SR of one study sent behind a routine backlog, and the backlog's."""

    label: str  # what the last study's order said
    last_s: float
    backlog_p50_s: float
    backlog_max_s: float

    @property
    def ratio(self) -> float:
        return self.last_s / self.backlog_p50_s


@dataclass
class Latencies:
    steady: list[float]
    burst: list[float]
    memory: dict[str, float]
    stages_ms: dict[str, float]  # medians of the worker's own timings, and SR delivery
    behind_backlog: list[BehindBacklog] = field(default_factory=list)
    burst_stages_ms: dict[str, float] = field(default_factory=dict)  # the same, in the burst


def _config(
    work: Path, port: int, pacs_port: int, model: Path, web: bool, worker: str = ""
) -> Path:
    path = work / "node.toml"
    path.write_text(
        "demo = true\n"
        f'[node]\nport = {port}\nhost = "127.0.0.1"\nspool_dir = "{work / "spool"}"\ndisk_reserve_mb = 64\n'
        f'[[peers]]\nae_title = "ORTHANC"\nhosts = ["127.0.0.1"]\nquiet_period_s = {QUIET_S}\n'
        f'[database]\nurl = "sqlite:///{work / "node.db"}"\n'
        "[completion]\nsweep_interval_s = 0.5\n"
        f"[worker]\npoll_interval_s = 0.2\n{worker}"
        f'[[routing]]\nname = "cxr"\nmodel = "{model}"\nhead = "cxr"\nmodalities = ["CR", "DX"]\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
        "[delivery]\nsweep_interval_s = 0.5\n"
        f"[web]\nenabled = {'true' if web else 'false'}\nport = {free_port()}\n"
        '[logging]\nlevel = "WARNING"\n'
    )
    return path


def _latencies(db_url: str, study_uids: set[str]) -> list[float] | None:
    db = make_database(db_url)
    try:
        with db.read() as s:
            rows = s.execute(
                select(Study.study_uid, Study.last_received_at, Delivery.sent_at)
                .join(Delivery, Delivery.study_id == Study.id)
                .where(Delivery.kind == ResultKind.SR, Study.study_uid.in_(study_uids))
            ).all()
    finally:
        db.dispose()
    if len({r[0] for r in rows if r[2] is not None}) < len(study_uids):
        return None
    return [
        (sent - received).total_seconds() - QUIET_S
        for _uid, received, sent in rows
        if sent is not None
    ]


def _all_sent(db_url: str, study_uid: str) -> bool:
    db = make_database(db_url)
    try:
        with db.read() as s:
            states = s.execute(
                select(Study.state, Delivery.state)
                .join(Delivery, Delivery.study_id == Study.id)
                .where(Study.study_uid == study_uid)
            ).all()
    finally:
        db.dispose()
    return bool(states) and all(
        study == StudyState.ANALYSED and sent == DeliveryState.SENT for study, sent in states
    )


def _uploaded(pacs: LocalOrthanc, files: list[Path]) -> tuple[list[str], list[str]]:
    """Orthanc's study ids and the Study Instance UIDs of uploaded files."""
    ids = [pacs.upload(p)["ParentStudy"] for p in files]
    uids = [str(pacs.get(f"/studies/{i}")["MainDicomTags"]["StudyInstanceUID"]) for i in ids]
    return ids, uids


def _behind_backlog(
    pacs: LocalOrthanc, db_url: str, folder: Path, n_backlog: int, size: int, priority: str
) -> BehindBacklog:
    """``n_backlog`` routine studies, then one whose order says ``priority`` ("" for
    nothing), each study waited for until everything of it is delivered."""
    files = write_instances(folder, n_backlog, size, studies=n_backlog)
    last = dx_instance(generate_uid(), generate_uid(), size, seed=n_backlog)
    if priority:
        last.RequestedProcedurePriority = priority
    last_path = folder / "last.dcm"
    last.save_as(last_path, enforce_file_format=True)
    ids, uids = _uploaded(pacs, [*files, last_path])
    pacs.send_to_node(ids[:-1])  # one association; returns once the node has them all
    pacs.send_to_node(ids[-1:])
    for uid in uids:
        wait_until(partial(_all_sent, db_url, uid), 900, f"study {uid} behind the backlog")
    backlog = _latencies(db_url, set(uids[:-1])) or []
    (last_s,) = _latencies(db_url, {uids[-1]}) or [float("nan")]
    return BehindBacklog(
        priority or "(none)", last_s, percentile(backlog, 50), max(backlog, default=float("nan"))
    )


def run(
    n_studies: int = 20,
    model: Path = Path("models/ddn-cxr"),
    size: int = 2048,
    phases: tuple[str, ...] = PHASES,
    backend: str | None = None,
    precision: str | None = None,
) -> Latencies | None:
    header("end to end: last instance in -> SR stored in the PACS", "ddn-node bench e2e")
    if not orthanc_available():
        print("  (skipped: Orthanc not installed)")
        return None
    if not (model / "manifest.json").is_file():
        print(f"  (skipped: no model at {model})")
        return None
    with tempfile.TemporaryDirectory(prefix="ddn-bench-e2e-") as tmp:
        work = Path(tmp)
        node_port = free_port()
        pacs = LocalOrthanc(work / "orthanc", free_port(), free_port(), node_port)
        pacs.start()
        # The node's defaults unless asked: the figures are what an operator gets.
        worker = "".join(
            f'{k} = "{v}"\n' for k, v in (("backend", backend), ("precision", precision)) if v
        )
        if worker:
            print(f"  [worker] {worker.strip().replace(chr(10), ', ')}")
        config = _config(work, node_port, pacs.dicom_port, model.resolve(), web=True, worker=worker)
        node = Proc([*ddn_node_cmd(), "serve", "--config", str(config)], work / "node.log").start()
        memory: dict[str, float] = {}
        try:
            wait_until(lambda: port_open(node_port), 120, "the node")
            files = write_instances(work / "data", 2 * n_studies, size, studies=2 * n_studies)
            ids, uids = _uploaded(pacs, files)
            db_url = f"sqlite:///{work / 'node.db'}"
            # Warm-up study (model load, first allocations), not counted.
            pacs.send_to_node([ids[0]])
            wait_until(lambda: _latencies(db_url, {uids[0]}) is not None, 300, "warm-up study")
            memory["serve idle, model loaded"] = rss_mib(node.pid)[0]
            steady: list[float] = []
            for i in range(1, n_studies if "steady" in phases else 1):
                pacs.send_to_node([ids[i]])

                def measured(i: int = i) -> bool:
                    return _latencies(db_url, {uids[i]}) is not None

                wait_until(measured, 120, f"study {i}")
                steady += _latencies(db_url, {uids[i]}) or []
                # Steady means one study at a time: its heat maps, drawn after the SR left,
                # are delivered too before the next study comes.
                wait_until(partial(_all_sent, db_url, uids[i]), 120, f"study {i} heat maps")
            burst, burst_stages = (
                _burst(pacs, db_url, ids[n_studies:], uids[n_studies:])
                if "burst" in phases
                else ([], {})
            )
            behind: list[BehindBacklog] = []
            if "stat" in phases:
                # The peer first: the same study with nothing in its order.
                for n, priority in enumerate(("", "STAT")):
                    behind.append(
                        _behind_backlog(
                            pacs, db_url, work / f"backlog{n}", n_studies, size, priority
                        )
                    )
            memory["serve peak (ingest + inference)"] = rss_mib(node.pid)[1]
            stages = _stages(db_url, set(uids[1:n_studies]))
        finally:
            node.stop()
            pacs.stop()
        scp_memory = _scp_only_rss(work)
        memory["SCP role alone, after 20 instances"] = scp_memory
    result = Latencies(steady, burst, memory, stages, behind, burst_stages_ms=burst_stages)
    _print(result, size)
    return result


def _burst(
    pacs: LocalOrthanc, db_url: str, ids: list[str], uids: list[str]
) -> tuple[list[float], dict[str, float]]:
    """All the studies at once: each one's time to SR, and the stages' medians."""
    burst_uids = set(uids)
    pacs.send_to_node(ids)
    wait_until(lambda: _latencies(db_url, burst_uids) is not None, 600, "burst")
    burst = _latencies(db_url, burst_uids) or []
    # The worker's timings are recorded with the heat maps, after the SRs.
    for uid in burst_uids:
        wait_until(partial(_all_sent, db_url, uid), 600, "the burst's heat maps")
    return burst, _stages(db_url, burst_uids)


def _stages(db_url: str, study_uids: set[str]) -> dict[str, float]:
    """Where the steady studies' time went, in order: completion after the quiet period,
    queue and claim, the worker's phases (decode, model, SR), the SR's delivery; and the
    heat maps, drawn while the SR travels."""
    db = make_database(db_url)
    try:
        with db.read() as s:
            rows = s.execute(
                select(
                    Result.timings_ms,
                    Study.last_received_at,
                    Study.completed_at,
                    Delivery.created_at,
                    Delivery.sent_at,
                )
                .join(Study, Result.study_id == Study.id)
                .join(Delivery, Delivery.result_id == Result.id)
                .where(Delivery.kind == ResultKind.SR, Study.study_uid.in_(study_uids))
            ).all()
    finally:
        db.dispose()
    stages: dict[str, list[float]] = {}
    for timings, received, completed, queued, sent in rows:
        assert completed is not None  # an SR was queued, so the study completed
        timings = timings or {}
        for key, value in timings.items():
            stages.setdefault(key, []).append(float(value))
        stages.setdefault("completion_lag_ms", []).append(
            ((completed - received).total_seconds() - QUIET_S) * 1000
        )
        to_sr = sum(float(timings.get(k, 0.0)) for k in ("decode_ms", "model_ms", "sr_ms"))
        stages.setdefault("queue_and_claim_ms", []).append(
            (queued - completed).total_seconds() * 1000 - to_sr
        )
        if sent is not None:
            stages.setdefault("sr_delivery_ms", []).append((sent - queued).total_seconds() * 1000)
    return {key: percentile(values, 50) for key, values in stages.items()}


def _scp_only_rss(work: Path) -> float:
    port = free_port()
    config = work / "scp.toml"
    config.write_text(
        f'[node]\nport = {port}\nhost = "127.0.0.1"\nspool_dir = "{work / "spool2"}"\ndisk_reserve_mb = 64\n'
        '[[peers]]\nae_title = "STORESCU"\nhosts = ["127.0.0.1"]\n'
        f'[database]\nurl = "sqlite:///{work / "scp.db"}"\n[web]\nenabled = false\n[logging]\nlevel = "WARNING"\n'
    )
    proc = Proc(
        [*ddn_node_cmd(), "serve", "--config", str(config), "--role", "scp"], work / "scp.log"
    ).start()
    try:
        wait_until(lambda: port_open(port), 60, "SCP")
        files = sorted((work / "data").glob("*.dcm"))[:20]
        subprocess.run(
            [
                "storescu",
                "-aet",
                "STORESCU",
                "-aec",
                "DDN_NODE",
                "127.0.0.1",
                str(port),
                *map(str, files),
            ],
            capture_output=True,
            timeout=300,
            check=False,
        )
        return rss_mib(proc.pid)[1]
    finally:
        proc.stop()


def _print(r: Latencies, size: int) -> None:
    print(
        f"single-image uncompressed {size}x{size} DX studies, quiet period {QUIET_S:g} s subtracted"
    )
    for name, values in (("steady", r.steady), ("burst", r.burst)):
        if not values:
            continue  # a phase not run (--phases)
        print(
            f"{name:7} n={len(values):3}  p50 {percentile(values, 50):6.3f} s  p95 {percentile(values, 95):6.3f} s"
            f"  max {max(values) if values else float('nan'):6.3f} s"
        )
    order = [
        "completion_lag_ms",
        "queue_and_claim_ms",
        "decode_ms",
        "model_ms",
        "forward_ms",
        "sr_ms",
        "sr_delivery_ms",
        "gradcam_ms",
        "results_ms",
        "total_ms",
    ]
    for name, stages in (("steady", r.stages_ms), ("burst", r.burst_stages_ms)):
        keys = [k for k in order if k in stages] + sorted(set(stages) - set(order))
        if stages:
            print(
                f"{name}, median per stage (SR path, then the whole analysis with heat maps): "
                + ", ".join(f"{k} {stages[k]:.0f}" for k in keys)
            )
    if r.steady:
        p95 = percentile(r.steady, 95)
        print(f"goal steady p95 < 1 s on CPU: {'met' if p95 < 1 else 'NOT met'} ({p95:.3f} s)")
    if r.burst:
        p95 = percentile(r.burst, 95)
        print(f"goal burst p95 < 5 s on CPU: {'met' if p95 < 5 else 'NOT met'} ({p95:.3f} s)")
    for b in r.behind_backlog:
        print(
            f"behind a backlog, last study's order {b.label:6}: time to SR {b.last_s:7.3f} s;"
            f" the routine ones p50 {b.backlog_p50_s:7.3f} s, max {b.backlog_max_s:7.3f} s;"
            f" ratio {b.ratio:5.2f} x the routine p50"
        )
    for name, mib in r.memory.items():
        print(f"memory {name}: {mib:.0f} MiB")
    scp = r.memory.get("SCP role alone, after 20 instances")
    if scp is not None:
        print(
            f"goal SCP alone < 150 MB: {'met' if scp * 1.048576 < 150 else 'NOT met'} ({scp * 1.048576:.0f} MB)"
        )
