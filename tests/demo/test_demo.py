"""`ddn-node demo` (what `make run` ends with) on this machine: node + local Orthanc + the
sample studies; it prints where to look, the results are in Orthanc, and Ctrl-C stops
everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select
from support.net import free_port, wait_for

from ddn_node.demo.orthanc import LocalOrthanc, orthanc_available
from ddn_node.store.engine import make_database
from ddn_node.store.models import Delivery, Study

pytestmark = pytest.mark.slow


def _bundled(repo_root: Path) -> None:
    if not (repo_root / "models" / "ddn-cxr" / "manifest.json").is_file():
        pytest.skip("the bundled model is not in models/ddn-cxr")


@pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed")
def test_demo_end_to_end_and_ctrl_c(repo_root: Path, tmp_path: Path) -> None:
    _bundled(repo_root)
    home = tmp_path / "demo"
    out = tmp_path / "demo.out"
    with open(out, "w") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ddn_node", "demo", "--home", str(home), "--timeout", "400"],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=repo_root,
            env={**os.environ, "COLUMNS": "160", "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_for(
            lambda: "Press Ctrl-C" in out.read_text() or proc.poll() is not None,
            450,
            "the demo summary",
        )
        text = out.read_text()
        assert proc.poll() is None, text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Worklist:  http://127.0.0.1:" in text and "radiologist / radiologist" in text
    assert "Orthanc:   http://127.0.0.1:" in text and "/app/explorer.html" in text
    assert "studies received 4, analysed 4, failed 0" in text
    assert "NOT FOR DIAGNOSTIC USE" in text
    # Nothing left running: no Orthanc of ours.
    leftover = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""

    db = make_database(f"sqlite:///{home / 'ddn-node.db'}")
    try:
        with db.read() as s:
            studies = list(s.scalars(select(Study)))
            deliveries = list(s.scalars(select(Delivery)))
    finally:
        db.dispose()
    assert len(studies) == 4 and all(st.state == "analysed" for st in studies)
    assert deliveries and all(d.state == "sent" for d in deliveries)
    # The PACS kept what the node sent: SR and heat-map series in each study.
    pacs = LocalOrthanc(home / "orthanc", free_port(), free_port(), node_port=1)
    pacs.start()
    try:
        for study in studies:
            modalities = pacs.study_modalities(study.study_uid)
            assert "SR" in modalities, modalities
    finally:
        pacs.stop()


def test_demo_without_orthanc(repo_root: Path, tmp_path: Path) -> None:
    _bundled(repo_root)
    home = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddn_node",
            "demo",
            "--home",
            str(home),
            "--no-orthanc",
            "--exit-when-done",
            "--timeout",
            "400",
        ],
        capture_output=True,
        text=True,
        cwd=repo_root,
        timeout=500,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "studies received 4, analysed 4, failed 0" in result.stdout
    assert "Orthanc:" not in result.stdout and "Worklist:" in result.stdout
    # The demo's own settings, for every other command against it (as its summary says).
    config = home / "ddn-node.toml"
    assert f"Commands: ddn-node monitor --config {config}" in " ".join(result.stdout.split())
    status = subprocess.run(
        [sys.executable, "-m", "ddn_node", "model", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=repo_root,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert status.returncode == 0, status.stderr
    assert "chest-xray" in status.stderr and "brain-mri" in status.stderr
    assert "config" in status.stderr
