"""A worker on ``[worker] backend = "onnxruntime"`` reports what a worker on torch reports:
the same findings, probabilities and outlines in the SR, from the same study.

In process: the worker's own code against a real spool and schema (SQLite), once per
backend, on the tiny test artifact (every finding positive, so every finding is outlined).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from support.artifacts import make_test_artifact
from support.received import receive_cr
from support.sr_reader import SRContent, read_sr

from ddn_node.config import Settings
from ddn_node.dicom.spool import Spool
from ddn_node.pipeline.registry import ModelRegistry
from ddn_node.pipeline.worker import Worker
from ddn_node.store.engine import make_database
from ddn_node.store.migrate import upgrade
from ddn_node.store.models import Result

pytest.importorskip("onnxruntime")

STUDY = "1.2.826.0.1.3680043.10.1.92.1"
SIZE = 300  # not the model's 224: the maps are resized back to the source


def _analyse(home: Path, model: Path, backend: str) -> tuple[Result, SRContent]:
    settings = Settings.model_validate(
        {
            "node": {"spool_dir": str(home / "spool")},
            "database": {"url": f"sqlite:///{home / 'ddn.sqlite'}"},
            "completion": {"quiet_period_s": 0.01},
            "worker": {"torch_threads": 1, "heat_maps": "all", "backend": backend},
            "routing": [{"name": "cxr", "model": str(model), "head": "cxr", "modalities": ["CR"]}],
        }
    )
    database = make_database(settings.database.url)
    upgrade(database)
    spool = Spool(settings.node.spool_dir)
    spool.prepare()
    try:
        receive_cr(settings, database, spool, STUDY, size=SIZE, seed=5)
        worker = Worker(settings, database, spool, ModelRegistry(settings), owner=backend)
        assert worker.run_once()  # phase 1: the SR
        assert worker.run_once()  # phase 2: the heat-map objects
        with database.read() as s:
            (result,) = s.scalars(select(Result)).all()
            s.expunge(result)
        assert result.sr_path is not None and result.completed_at is not None
        return result, read_sr(pydicom.dcmread(spool.path(result.sr_path)))
    finally:
        database.dispose()


def test_onnxruntime_worker_reports_the_torch_workers_findings(tmp_path: Path) -> None:
    model = make_test_artifact(tmp_path / "model", threshold=0.0)
    ref, ref_sr = _analyse(tmp_path / "torch", model, "torch")
    got, got_sr = _analyse(tmp_path / "ort", model, "onnxruntime")
    assert got.positive == ref.positive and ref.positive
    assert got.priority == ref.priority
    for name, p in ref.probabilities.items():
        assert got.probabilities[name] == pytest.approx(p, abs=1e-5)
    assert set(got_sr.findings) == set(ref_sr.findings)
    assert any(f.regions for f in ref_sr.findings.values())  # outlines to compare
    for name, finding in ref_sr.findings.items():
        other = got_sr.findings[name]
        assert (other.present, other.probability) == (finding.present, finding.probability)
        assert len(other.regions) == len(finding.regions)
        for a, b in zip(finding.regions, other.regions, strict=True):
            assert a.graphic_type == b.graphic_type
            # The same outline, within a pixel of the 300-pixel source.
            if len(a.points) == len(b.points):
                assert (
                    max(
                        abs(x - u) + abs(y - v)
                        for (x, y), (u, v) in zip(a.points, b.points, strict=True)
                    )
                    <= 2.0
                )
