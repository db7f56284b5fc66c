"""``ddn-node demo``: the whole node on one machine in a minute.

Starts the node (SQLite, CPU, the bundled model) and, when the Debian ``orthanc`` package
is installed, a local Orthanc as the PACS; loads the sample studies into Orthanc and has
Orthanc push them to the node, exactly as a hospital PACS would; shows progress; then
prints where to look. Without Orthanc the node receives the studies directly and its own
web page is the results viewer. Ctrl-C stops everything.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import tomli_w
from argon2 import PasswordHasher
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select

from ddn_node.config import (
    CompletionSettings,
    DatabaseSettings,
    DestinationSettings,
    NodeSettings,
    PeerSettings,
    Settings,
    UserSettings,
    load_settings,
)
from ddn_node.demo.ohif import OHIF_VERSION, OhifError, OhifServer, ohif_available
from ddn_node.demo.orthanc import LocalOrthanc, OrthancError, orthanc_available
from ddn_node.dicom.scu import Peer, StoreSCU, dicom_files
from ddn_node.node import Node, start_node
from ddn_node.store.models import Delivery, Study
from ddn_node.vocabulary import DeliveryState, HeatMapPolicy, StudyState

DEMO_USER = ("radiologist", "radiologist")
# The pages under /admin (the monitor, drift, models, refused instances) need the admin
# role; the example configuration, which operators copy, has no admin with a guessable
# password, so the demo adds its own.
DEMO_ADMIN = ("admin", "admin")
CONFIG_NAME = "ddn-node.toml"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_port(preferred: int) -> int:
    if _port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DemoPlan:
    home: Path
    config: Path
    studies: Path
    use_orthanc: bool
    dicom_port: int = 11112
    web_port: int = 8080
    orthanc_http: int = 8042
    orthanc_dicom: int = 4242
    ohif_port: int = 3000
    heat_maps: HeatMapPolicy = HeatMapPolicy.EVIDENCE
    notes: list[str] = field(default_factory=list)


def demo_settings(plan: DemoPlan) -> Settings:
    """The example configuration, pointed at the demo's folder and ports."""
    base = load_settings(plan.config)
    home = plan.home
    peers = [
        PeerSettings(ae_title=ae, hosts=["127.0.0.1"], quiet_period_s=3)
        for ae in ("ORTHANC", "DDN_SEND")
    ]
    destinations = (
        [
            DestinationSettings(
                name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=plan.orthanc_dicom
            )
        ]
        if plan.use_orthanc
        else []
    )
    return base.model_copy(
        update={
            "node": NodeSettings.model_validate(
                {
                    **base.node.model_dump(),
                    "host": "127.0.0.1",
                    "port": plan.dicom_port,
                    "spool_dir": home / "spool",
                    "disk_reserve_mb": min(base.node.disk_reserve_mb, 256),
                }
            ),
            "peers": peers,
            "database": DatabaseSettings(url=f"sqlite:///{home / 'ddn-node.db'}"),
            "completion": CompletionSettings(
                quiet_period_s=3, force_complete_s=120, sweep_interval_s=0.5
            ),
            "destinations": destinations,
            "web": base.web.model_copy(
                update={
                    "port": plan.web_port,
                    "host": "127.0.0.1",
                    "users": [*base.web.users, _demo_admin(base)],
                }
            ),
            "worker": base.worker.model_copy(update={"heat_maps": plan.heat_maps}),
            "demo": True,
        }
    )


def _demo_admin(base: Settings) -> UserSettings:
    name, password = DEMO_ADMIN
    for user in base.web.users:
        if user.name == name:
            return user
    # Cheap parameters: a demo password is public anyway (every page's banner says so).
    hasher = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    return UserSettings(name=name, password_hash=hasher.hash(password), role="admin")


def write_settings(settings: Settings, path: Path) -> Path:
    """The demo's effective configuration, so that every other command (``ddn-node monitor``,
    ``model``, ``conflicts`` ...) can be pointed at the running demo with ``--config``."""
    data = settings.model_dump(mode="json", exclude_none=True)
    path.write_text(
        "# Written by 'ddn-node demo': the running demo's settings (demo credentials).\n"
        + tomli_w.dumps(data),
        encoding="utf-8",
    )
    return path


@dataclass
class Counts:
    received: int = 0
    analysed: int = 0
    failed: int = 0
    delivered: int = 0
    pending_deliveries: int = 0


def _counts(node: Node) -> Counts:
    with node.database.read() as s:
        c = Counts()
        c.received = int(s.scalar(select(func.count()).select_from(Study)) or 0)
        c.analysed = int(
            s.scalar(
                select(func.count())
                .select_from(Study)
                .where(Study.state.in_([StudyState.ANALYSED, StudyState.NOT_ROUTED]))
            )
            or 0
        )
        c.failed = int(
            s.scalar(
                select(func.count()).select_from(Study).where(Study.state == StudyState.FAILED)
            )
            or 0
        )
        c.delivered = int(
            s.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.state == DeliveryState.SENT)
            )
            or 0
        )
        c.pending_deliveries = int(
            s.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING]))
            )
            or 0
        )
        return c


def _send(
    plan: DemoPlan, orthanc: LocalOrthanc | None, files: list[Path], console: Console
) -> None:
    if orthanc is not None:
        uploaded = [orthanc.upload(p) for p in files]
        studies = sorted({u["ParentStudy"] for u in uploaded})
        job = orthanc.send_to_node(studies)
        failed = job.get("FailedInstancesCount", 0)
        if failed:
            console.print(
                f"[yellow]Orthanc reported {failed} instance(s) not accepted by the node[/yellow]"
            )
        return
    outcomes = StoreSCU("DDN_SEND", Peer("DDN_NODE", "127.0.0.1", plan.dicom_port)).send(files)
    bad = [o for o in outcomes if not o.ok]
    for o in bad:
        console.print(f"[yellow]not stored[/yellow] {o.path.name}: {o.error}")


def run_demo(
    config: Path,
    studies: Path,
    home: Path,
    *,
    use_orthanc: bool = True,
    heat_maps: HeatMapPolicy = HeatMapPolicy.EVIDENCE,
    exit_when_done: bool = False,
    timeout_s: float = 600,
    console: Console | None = None,
) -> int:
    """Run the demo; returns a process exit code."""
    console = console or Console()
    home.mkdir(parents=True, exist_ok=True)
    plan = _plan(home, config, studies, use_orthanc, heat_maps)
    settings = demo_settings(plan)
    files = dicom_files(studies)
    study_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in files}
    orthanc: LocalOrthanc | None = None
    viewer: OhifServer | None = None
    node: Node | None = None
    try:
        if plan.use_orthanc:
            orthanc = _start_orthanc(plan)
            if orthanc is None:
                settings = settings.model_copy(update={"destinations": []})
            else:
                viewer = _start_viewer(plan, orthanc)
        console.print("Starting the node (SQLite, CPU, bundled model)...")
        written = write_settings(settings, home / CONFIG_NAME)
        node = start_node(settings)
        sender = threading.Thread(target=_send, args=(plan, orthanc, files, console), daemon=True)
        sender.start()
        _wait_for_results(node, sender, len(study_uids), timeout_s, console)
        _summary(console, node, plan, orthanc, viewer, study_uids)
        console.print(
            f"Commands:  ddn-node monitor --config {written}   (also: model status, conflicts list)",
            highlight=False,
        )
        if exit_when_done:
            return 0
        console.print("\nThe node keeps running. Press Ctrl-C to stop everything.")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("\nStopping...")
        return 0
    finally:
        for part in (node, viewer, orthanc):
            if part is not None:
                part.stop()


def _plan(
    home: Path, config: Path, studies: Path, use_orthanc: bool, heat_maps: HeatMapPolicy
) -> DemoPlan:
    plan = DemoPlan(
        home=home,
        config=config,
        studies=studies,
        use_orthanc=use_orthanc and orthanc_available(),
        heat_maps=heat_maps,
    )
    if use_orthanc and not plan.use_orthanc:
        plan.notes.append(
            "Orthanc is not installed: results are shown in the node's own web page only."
        )
    plan.dicom_port = _pick_port(plan.dicom_port)
    plan.web_port = _pick_port(plan.web_port)
    plan.orthanc_http = _pick_port(plan.orthanc_http)
    plan.orthanc_dicom = _pick_port(plan.orthanc_dicom)
    plan.ohif_port = _pick_port(plan.ohif_port)
    return plan


def _start_orthanc(plan: DemoPlan) -> LocalOrthanc | None:
    orthanc = LocalOrthanc(
        plan.home / "orthanc", plan.orthanc_http, plan.orthanc_dicom, plan.dicom_port
    )
    try:
        return orthanc.start()
    except OrthancError as exc:
        plan.notes.append(f"Orthanc did not start ({exc}); continuing without it.")
        return None


def _start_viewer(plan: DemoPlan, orthanc: LocalOrthanc) -> OhifServer | None:
    """OHIF in front of the demo's Orthanc: the results as a radiologist's viewer shows them."""
    if not ohif_available():
        plan.notes.append("OHIF is not fetched (deploy/fetch-ohif.sh): no viewer link.")
        return None
    if orthanc.dicomweb_url is None:
        plan.notes.append(
            "Orthanc's DICOMweb plugin (orthanc-dicomweb) is missing: no viewer link."
        )
        return None
    viewer = OhifServer(orthanc.url, port=plan.ohif_port)
    try:
        viewer.start()
    except OhifError as exc:
        plan.notes.append(f"OHIF did not start ({exc}).")
        return None
    return viewer


def _wait_for_results(
    node: Node, sender: threading.Thread, total: int, timeout_s: float, console: Console
) -> None:
    deadline = time.monotonic() + timeout_s
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        t_recv = progress.add_task("studies received", total=total)
        t_done = progress.add_task("studies analysed", total=total)
        while time.monotonic() < deadline:
            c = _counts(node)
            progress.update(t_recv, completed=min(c.received, total))
            progress.update(t_done, completed=min(c.analysed + c.failed, total))
            if (
                c.analysed + c.failed >= total
                and c.pending_deliveries == 0
                and not sender.is_alive()
            ):
                return
            time.sleep(0.25)


def _summary(
    console: Console,
    node: Node,
    plan: DemoPlan,
    orthanc: LocalOrthanc | None,
    viewer: OhifServer | None,
    study_uids: set[str],
) -> None:
    c = _counts(node)
    table = Table(
        "study", "patient", "priority", "score", "top findings", "status", title="Triage worklist"
    )
    with node.database.read() as s:
        rows = list(
            s.scalars(select(Study).order_by(Study.priority_rank, Study.abnormality_score.desc()))
        )
    for st in rows:
        findings = ", ".join(f"{name} {p:.2f}" for name, p in (st.top_findings or [])[:3])
        score = f"{st.abnormality_score:.2f}" if st.abnormality_score is not None else "-"
        table.add_row(st.study_uid[-12:], st.patient_name, st.priority, score, findings, st.state)
    console.print(table)
    console.print(
        f"studies received {c.received}, analysed {c.analysed}, failed {c.failed}; "
        f"result objects delivered {c.delivered}, pending {c.pending_deliveries}",
        highlight=False,
    )
    settings = node.settings
    if settings.web.enabled:
        console.print(
            f"Worklist:  http://127.0.0.1:{settings.web.port}/   (login {DEMO_USER[0]} / {DEMO_USER[1]};"
            f" {DEMO_ADMIN[0]} / {DEMO_ADMIN[1]} for /admin/monitor, /admin/models, /admin/drift)",
            highlight=False,
        )
    if orthanc is not None:
        console.print(
            f"Orthanc:   {orthanc.explorer_url}   (the SR and the overlay series are in each study)",
            highlight=False,
        )
    if viewer is not None:
        first = next((st.study_uid for st in rows), None)
        console.print(
            f"Viewer:    {viewer.url}/   (OHIF {OHIF_VERSION}; the SR draws each finding on its image)",
            highlight=False,
        )
        if first is not None:
            console.print(f"           e.g. {viewer.viewer_url(first)}", highlight=False)
    console.print(
        f"DICOM:     AE DDN_NODE on 127.0.0.1:{plan.dicom_port}; data in {plan.home}",
        highlight=False,
    )
    for note in plan.notes:
        console.print(f"[yellow]note[/yellow] {note}")
    console.print("[bold red]Demonstration model: NOT FOR DIAGNOSTIC USE.[/bold red]")
