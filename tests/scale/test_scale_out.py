"""Scale out: SCP, two workers and the web part as separate processes on separate "hosts"
(network namespaces), sharing one PostgreSQL database and one spool. Workers claim with
FOR UPDATE SKIP LOCKED; a worker killed mid-analysis loses its lease and the other finishes
the study; no study is analysed twice."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
from netns import forward, lan, netns_available
from sqlalchemy import select
from support.artifacts import make_test_artifact
from support.dicomgen import make_cr, store_file, to_file_bytes
from support.net import GiveUp, wait_for
from support.node import REPO, base_config, deep_merge

from ddn_node.store.engine import make_database
from ddn_node.store.models import Job, Result, Study

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not netns_available(), reason="network namespaces need root and iproute2"),
]

N_STUDIES = 16
TOKEN = "scale-out-test-token-3b8e"  # not a guessable one: the node would refuse it


def _events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def test_workers_on_separate_hosts_share_the_queue(postgres_url: str, tmp_path: Path) -> None:
    model = make_test_artifact(tmp_path / "model", threshold=0.5)
    with lan("scp", "w1", "w2", "web") as net, forward((net.gateway, 15432), ("127.0.0.1", 5432)):
        db_url = postgres_url.replace("127.0.0.1:5432", f"{net.gateway}:15432")
        web_port = 18080
        config = deep_merge(
            base_config(tmp_path, db_url, port=11112),
            {
                "node": {"host": "0.0.0.0"},
                "peers": [{"ae_title": "TESTSCU", "hosts": [f"{net.prefix}.0/24"]}],
                "routing": [
                    {"name": "cxr", "model": str(model), "head": "cxr", "modalities": ["CR"]}
                ],
                "queue": {"lease_s": 3, "max_attempts": 5},
                "worker": {"poll_interval_s": 0.1},
                # Plain HTTP between the test's namespaces: a demo, as far as the web part's
                # defaults go (outside a demo the node refuses a login over HTTP on 0.0.0.0).
                "demo": True,
                "web": {
                    "enabled": True,
                    "host": "0.0.0.0",
                    "port": web_port,
                    "tokens": [
                        {
                            "name": "t",
                            "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                        }
                    ],
                },
            },
        )
        path = tmp_path / "shared.toml"
        path.write_text(tomli_w.dumps(config))
        upgraded = subprocess.run(
            [sys.executable, "-m", "ddn_node", "db", "upgrade", "--config", str(path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert upgraded.returncode == 0, upgraded.stderr
        procs: dict[str, subprocess.Popen[bytes]] = {}
        logs = {name: tmp_path / f"{name}.log" for name in ("scp", "w1", "w2", "web")}
        roles = {"scp": "scp", "w1": "worker", "w2": "worker", "web": "web"}
        try:
            for name, role in roles.items():
                handle = open(logs[name], "ab")  # noqa: SIM115
                procs[name] = subprocess.Popen(
                    [
                        *net.exec_prefix(name),
                        sys.executable,
                        "-m",
                        "ddn_node",
                        "serve",
                        "--config",
                        str(path),
                        "--role",
                        role,
                    ],
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
                handle.close()

            def started(name: str) -> bool:
                if procs[name].poll() is not None:
                    raise GiveUp(f"{name} exited: {logs[name].read_text()[-3000:]}")
                return any(e.get("event") == "serve.started" for e in _events(logs[name]))

            for name in roles:
                wait_for(lambda n=name: started(n), 90, f"{name} start")
            wait_for(
                lambda: all(
                    any(e.get("event") == "serve.worker_ready" for e in _events(logs[w]))
                    for w in ("w1", "w2")
                ),
                90,
                "workers ready",
            )

            # A sender on the "PACS" (the root namespace) stores N studies on the SCP host.
            from pynetdicom import AE, _config

            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
            assoc = ae.associate(net.hosts["scp"], 11112, ae_title="DDN_NODE")
            assert assoc.is_established
            _config.STORE_SEND_CHUNKED_DATASET = True
            for i in range(N_STUDIES):
                ds = make_cr(f"1.2.826.0.1.3680043.8.498.7700.{i + 1}", size=128, seed=i)
                f = tmp_path / f"s{i}.dcm"
                f.write_bytes(to_file_bytes(ds))
                assert store_file(assoc, f) == 0
            assoc.release()

            # Kill w1 while it holds a study (its owner id is in its own log).
            db = make_database(postgres_url)

            def w1_pid_owner() -> str | None:
                for e in _events(logs["w1"]):
                    if e.get("event") == "worker.started":
                        return str(e.get("owner"))
                return None

            owner = wait_for(w1_pid_owner, 30, "w1 owner id")
            wait_for(
                lambda: any(j.lease_owner == owner and j.state == "running" for j in _jobs(db)),
                120,
                "w1 analysing",
            )
            procs["w1"].send_signal(signal.SIGKILL)
            procs["w1"].wait(30)

            def all_analysed() -> bool:
                with db.read() as s:
                    return [st.state for st in s.scalars(select(Study))].count(
                        "analysed"
                    ) == N_STUDIES

            wait_for(all_analysed, 240, "every study analysed by the surviving worker")
            with db.read() as s:
                jobs = list(s.scalars(select(Job)))
                results = list(s.scalars(select(Result)))
            db.dispose()
            # The web part on its own host lists them.
            rows = httpx.get(
                f"http://{net.hosts['web']}:{web_port}/api/worklist",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=30,
            ).json()
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    assert len(jobs) == N_STUDIES and all(j.state == "done" for j in jobs)
    assert Counter(r.job_id for r in results) == Counter(
        {j.id: 1 for j in jobs}
    )  # analysed once each
    taken_over = [j for j in jobs if j.attempts >= 2]
    assert taken_over, "the killed worker's study was not taken over"
    analysed_by = Counter(
        e.get("owner")
        for name in ("w1", "w2")
        for e in _events(logs[name])
        if e.get("event") == "worker.started"
    )
    assert len(analysed_by) == 2
    listed = rows["rows"] if isinstance(rows, dict) else rows
    assert len(listed) == N_STUDIES


def _jobs(db) -> list[Job]:  # type: ignore[no-untyped-def]
    with db.read() as s:
        return list(s.scalars(select(Job)))
