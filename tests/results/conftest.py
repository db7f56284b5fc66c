"""Fixtures for the end-to-end results tests: the node with its worker, and Orthanc as PACS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.net import free_port
from support.orthanc import Orthanc, orthanc_available

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "ddn-cxr"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A tiny artifact whose findings are all positive, so every result type is produced."""
    from support.artifacts import make_test_artifact

    return make_test_artifact(tmp_path / "model", threshold=0.0)


@pytest.fixture
def bundled_model() -> Path:
    if not (MODEL / "manifest.json").is_file():
        pytest.skip("the bundled model models/ddn-cxr is not there")
    return MODEL


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    if not orthanc_available():
        pytest.skip("Orthanc (Debian package) not installed")
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port)
    orthanc.start()
    yield orthanc
    orthanc.stop()


def worker_config(model_dir: Path, pacs: Orthanc, **extra: object) -> dict[str, object]:
    """Overrides for make_node: routing to the bundled model, Orthanc as the destination."""
    config: dict[str, object] = {
        "node": {"port": pacs.node_port},
        "routing": [
            {
                "name": "chest-xray",
                "model": str(model_dir),
                "head": "cxr",
                "modalities": ["CR", "DX"],
                "body_parts": ["CHEST", ""],
                "views": ["PA", "AP", ""],
            }
        ],
        "destinations": [
            {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
        ],
        # Maps for every finding: the tiny test model has no localisation record, and these
        # tests follow every kind of result object through.
        "worker": {"poll_interval_s": 0.2, "torch_threads": 2, "heat_maps": "all"},
        "demo": True,
    }
    config.update(extra)
    return config
