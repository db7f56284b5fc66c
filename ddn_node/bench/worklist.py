"""Worklist latency at scale: ``/api/worklist`` and the HTML page with 10,000 and 100,000 studies.

Fills a throw-away SQLite database (and a throw-away PostgreSQL database when one is
reachable) with realistic studies, starts the real web part (``ddn-node serve --role
web``: uvicorn in its own process, as in production), logs in like a browser, and times
requests from this process over keep-alive HTTP. Each figure is the median over rounds of
that round's p50 / p95 (this machine is shared and noisy); views alternate within a round.

    python -m ddn_node.bench.worklist                 # 10k and 100k, SQLite (+ PostgreSQL)
    python -m ddn_node.bench.worklist --studies 10000 --rounds 3 --no-postgres

The database is what the migrations create, the worklist's indexes included.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import insert, text

from ddn_node.bench.common import (
    PG_ADMIN_DSN,
    cpu_seconds,
    free_port,
    postgres_reachable,
    throwaway_database,
)
from ddn_node.store.engine import Database, make_database
from ddn_node.store.migrate import upgrade
from ddn_node.store.models import Study
from ddn_node.training.data import NIH_LABELS
from ddn_node.vocabulary import RANK, TRIAGE_PRIORITIES, Priority, ReadStatus, StudyState

TOKEN = "bench-token"
USER, PASSWORD = "bench", "bench-password"

# (name, URL path + query): what a radiologist and an API client ask for most.
VIEWS: list[tuple[str, str]] = [
    ("api unread by priority (default)", "/api/worklist"),
    ("api all by priority", "/api/worklist?unread=false"),
    ("api unread by arrival", "/api/worklist?order=arrival"),
    ("api unread CT", "/api/worklist?modality=CT"),
    ("api unread STAT", "/api/worklist?priority=STAT"),
    ("api STAT in the whole archive", "/api/worklist?priority=STAT&unread=false"),
    ("page unread by priority (default)", "/"),
    ("page all by priority", "/?unread=false"),
]

FAMILY = [
    "SMITH",
    "GARCIA",
    "MÜLLER",
    "NGUYEN",
    "KOWALSKI",
    "ROSSI",
    "DUBOIS",
    "SILVA",
    "KIM",
    "OKAFOR",
    "JOHANSSON",
    "HOSSEINI",
    "TANAKA",
    "O'BRIEN",
    "VAN DER BERG",
    "LEFEBVRE",
    "PETROV",
    "SINGH",
]
GIVEN = [
    "ANNA",
    "JOHN",
    "MARIA",
    "WEI",
    "FATIMA",
    "LUCA",
    "SOPHIE",
    "ARJUN",
    "YUKI",
    "OLUWASEUN",
    "ERIK",
]
# The NIH ChestX-ray14 findings: what a worklist of chest studies shows.
LABELS = NIH_LABELS
MODALITIES = [("CR", 45), ("DX", 40), ("CT", 7), ("MR", 4), ("US", 2), ("CR\\DX", 1), ("CT\\SR", 1)]


def _pick(rng: random.Random, weighted: list[tuple[str, int]]) -> str:
    return rng.choices([w[0] for w in weighted], weights=[w[1] for w in weighted])[0]


def study_rows(n: int, now: dt.datetime, seed: int = 7) -> Iterator[dict[str, Any]]:
    """``n`` studies as a busy department accumulates them: about 1,500 a day, the
    recent ones mostly unread, nearly everything older read; analysed ones ranked by the
    triage rules, some waiting, failed or not routed, a few overridden by hand."""
    rng = random.Random(seed)
    span_s = max(1.0, n / 1500) * 86400
    offsets = sorted((rng.random() * span_s for _ in range(n)), reverse=True)
    for i, age_s in enumerate(offsets):
        received = now - dt.timedelta(seconds=age_s)
        recent = age_s < 2 * 86400
        read = rng.choices(list(ReadStatus), weights=[60, 10, 30] if recent else [1, 1, 98])[0]
        roll = rng.random()
        state = StudyState.ANALYSED
        if age_s < 600 and roll < 0.3:
            state = rng.choice([StudyState.RECEIVING, StudyState.QUEUED, StudyState.ANALYSING])
        elif roll < 0.04:
            state = StudyState.NOT_ROUTED
        elif roll < 0.06:
            state = StudyState.FAILED
        modality = _pick(rng, MODALITIES)
        row: dict[str, Any] = {
            "study_uid": f"1.2.826.0.1.3680043.10.1044.{i + 1}.{rng.randrange(10**9)}",
            "patient_id": f"P{rng.randrange(10**7):07d}",
            "patient_name": f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}",
            "patient_birth_date": f"{rng.randint(1930, 2020)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
            "patient_sex": rng.choice("MFO"),
            "accession_number": f"A{rng.randrange(10**9):09d}",
            "study_date": received.strftime("%Y%m%d"),
            "study_time": received.strftime("%H%M%S"),
            "study_description": "CHEST PA/LAT" if modality in ("CR", "DX") else f"{modality} EXAM",
            "modalities": modality,
            "body_part": "CHEST",
            "calling_ae": "ORTHANC",
            "num_instances": rng.randint(1, 3),
            "state": state,
            "state_reason": "no routing rule matches"
            if state == StudyState.NOT_ROUTED
            else ("decode error" if state == StudyState.FAILED else ""),
            "generation": 1,
            "first_received_at": received,
            "last_received_at": received,
            "completed_at": received,
            "read_status": read,
            "priority": Priority.NOT_ANALYSED.value,
            "priority_rank": RANK[Priority.NOT_ANALYSED],
            "priority_reason": "",
            "priority_override": None,
            "abnormality_score": None,
            "top_findings": None,
            "model_version": "",
            "analysed_at": None,
            "ageing_steps": 0,
        }
        if i % 1000 == 0:  # hostile headers exist in real archives
            row["patient_name"] = "<script>alert(1)</script>^X"
        if state == StudyState.ANALYSED:
            score = rng.betavariate(2, 5)
            probs = sorted(
                ((lab, rng.betavariate(1.2, 8)) for lab in LABELS), key=lambda kv: -kv[1]
            )
            probs[0] = (probs[0][0], max(probs[0][1], score))
            if rng.random() < 0.03:
                priority, reason = (
                    Priority.STAT,
                    f"critical finding: Pneumothorax {max(score, 0.6):.2f} >= 0.40",
                )
            elif score >= 0.5:
                priority, reason = Priority.HIGH, f"abnormality score {score:.2f} >= 0.50"
            else:
                priority, reason = (
                    Priority.ROUTINE,
                    f"abnormality score {score:.2f} < 0.50, no critical finding",
                )
            row.update(
                abnormality_score=score,
                priority=priority.value,
                priority_rank=RANK[priority],
                priority_reason=reason,
                top_findings=[[lab, round(p, 4)] for lab, p in probs[:3]],
                model_version="DDN chest X-ray 2026.11.27-r1",
                analysed_at=received + dt.timedelta(seconds=rng.uniform(2, 60)),
            )
        if (
            read != ReadStatus.READ
            and row["priority_rank"] >= RANK[Priority.ROUTINE]
            and state != StudyState.NOT_ROUTED
            and age_s > 4 * 3600
        ):
            row["priority_rank"] = RANK[Priority.HIGH]  # ageing, as store/lifecycle.py does
            row["ageing_steps"] = RANK[Priority.ROUTINE] - RANK[Priority.HIGH]
        if rng.random() < 0.005:
            row["priority_override"] = rng.choice(TRIAGE_PRIORITIES).value
        yield row


def fill(database: Database, n: int, now: dt.datetime | None = None, batch: int = 5000) -> None:
    now = now or dt.datetime.now(dt.UTC)
    rows = study_rows(n, now)
    while True:
        chunk = [r for _, r in zip(range(batch), rows, strict=False)]
        if not chunk:
            break
        with database.session() as session:
            session.execute(insert(Study), chunk)
    _analyze(database)


def _analyze(database: Database) -> None:
    # PostgreSQL: what autovacuum would have done by now on a running node. SQLite: the
    # node never runs ANALYZE, so neither does the bench (the plans must be good without).
    if database.is_postgres:
        with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))


# -- databases and the server ------------------------------------------------------------


@dataclass
class Server:
    base: str
    pid: int


@contextmanager
def web_server(db_url: str, tmp: Path) -> Iterator[Server]:
    """``ddn-node serve --role web`` on a free port."""
    from argon2 import PasswordHasher

    port = free_port()
    # Cheap argon2 parameters: the bench logs in once, it does not measure hashing.
    password_hash = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
    config = tmp / "bench.toml"
    config.write_text(
        f"""
[node]
spool_dir = "{tmp / "spool"}"
[database]
url = "{db_url}"
[worker]
enabled = false
[logging]
level = "WARNING"
[web]
host = "127.0.0.1"
port = {port}
[[web.users]]
name = "{USER}"
password_hash = "{password_hash}"
[[web.tokens]]
name = "bench"
sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"
""",
        encoding="utf-8",
    )
    log = open(tmp / "web.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddn_node", "serve", "--role", "web", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"web server exited: {(tmp / 'web.log').read_text()[-2000:]}")
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("web server did not answer /healthz within 60 s")
            time.sleep(0.1)
        yield Server(base, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def login(client: httpx.Client) -> None:
    form = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    if token is None:
        raise RuntimeError("login form without CSRF token")
    done = client.post(
        "/login",
        data={"username": USER, "password": PASSWORD, "csrf_token": token.group(1), "next": "/"},
    )
    if done.status_code != 303:
        raise RuntimeError(f"login failed: {done.status_code}")


# -- measuring ------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class Figure:
    backend: str
    n_studies: int
    view: str
    p50_ms: list[float] = field(default_factory=list)
    p95_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    rows: int = 0
    bytes: int = 0

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_ms)

    @property
    def p50(self) -> float:
        return statistics.median(self.p50_ms)

    @property
    def p95(self) -> float:
        return statistics.median(self.p95_ms)


def measure(server: Server, backend: str, n: int, rounds: int, requests: int) -> list[Figure]:
    figures = {name: Figure(backend, n, name) for name, _ in VIEWS}
    api = httpx.Client(
        base_url=server.base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    )
    browser = httpx.Client(base_url=server.base, timeout=30, follow_redirects=False)
    try:
        login(browser)
        for _name, path in VIEWS:  # warm caches and connections, not timed
            (browser if path.startswith("/?") or path == "/" else api).get(path)
        for _ in range(rounds):
            for name, path in VIEWS:
                client = browser if not path.startswith("/api") else api
                times = []
                cpu0 = cpu_seconds(server.pid, children=False)
                for _ in range(requests):
                    t0 = time.perf_counter()
                    response = client.get(path)
                    times.append((time.perf_counter() - t0) * 1000)
                    if response.status_code != 200:
                        raise RuntimeError(f"{path}: HTTP {response.status_code}")
                fig = figures[name]
                fig.cpu_ms.append(
                    (cpu_seconds(server.pid, children=False) - cpu0) * 1000 / requests
                )
                fig.p50_ms.append(_percentile(times, 0.5))
                fig.p95_ms.append(_percentile(times, 0.95))
                fig.bytes = len(response.content)
                if path.startswith("/api"):
                    fig.rows = len(response.json()["rows"])
    finally:
        api.close()
        browser.close()
    return list(figures.values())


def run(
    n_studies: int,
    *,
    backends: tuple[str, ...] = ("sqlite", "postgres"),
    rounds: int = 5,
    requests: int = 40,
    out: Any = None,
) -> list[Figure]:
    """Fill, serve and time the worklist at ``n_studies``; prints and returns the figures."""
    out = out or sys.stdout
    figures: list[Figure] = []
    for backend in backends:
        if backend == "postgres" and not postgres_reachable():
            print(f"[{backend}] skipped: PostgreSQL not reachable ({PG_ADMIN_DSN})", file=out)
            continue
        tmp = Path(tempfile.mkdtemp(prefix="ddn-bench-worklist-"))
        try:
            with throwaway_database(backend, tmp, prefix="ddn_bench") as url:
                database = make_database(url)
                try:
                    upgrade(database)
                    t0 = time.perf_counter()
                    fill(database, n_studies)
                    fill_s = time.perf_counter() - t0
                    _analyze(database)
                    print(f"[{backend}] {n_studies} studies filled in {fill_s:.1f} s", file=out)
                finally:
                    database.dispose()
                with web_server(url, tmp) as server:
                    got = measure(server, backend, n_studies, rounds, requests)
                for fig in got:
                    print(
                        f"[{backend}] {n_studies:>7} studies  {fig.view:<36} p50 {fig.p50:6.1f} ms  "
                        f"p95 {fig.p95:6.1f} ms  server CPU {fig.cpu:5.1f} ms/req  ({fig.rows or '-'} rows, {fig.bytes // 1024} KiB)",
                        file=out,
                        flush=True,
                    )
                figures.extend(got)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=40, help="requests per view per round")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)
    backends = ("sqlite",) if args.no_postgres else ("sqlite", "postgres")
    print(
        f"worklist bench: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; medians over {args.rounds} rounds of {args.requests} requests per view",
        flush=True,
    )
    results = []
    for n in args.studies:
        results += run(n, backends=backends, rounds=args.rounds, requests=args.requests)
    worst = max((f.p95 for f in results), default=0.0)
    print(f"worst p95: {worst:.1f} ms (goal: under 50 ms at 100,000 studies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
