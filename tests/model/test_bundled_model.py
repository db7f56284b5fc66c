"""The bundled artifact loads, verifies, and says what it is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ddn_node.model.artifact import ModelArtifact
from ddn_node.model.inference import Predictor
from ddn_node.training.data import NIH_LABELS


@pytest.fixture(scope="module")
def bundled(repo_root: Path) -> ModelArtifact:
    path = repo_root / "models" / "ddn-cxr"
    if not (path / "manifest.json").is_file():
        pytest.skip("models/ddn-cxr is not in this checkout")
    return ModelArtifact.load(path)


def test_bundled_model_is_a_labelled_demo_with_held_out_metrics(bundled: ModelArtifact) -> None:
    assert bundled.algorithm.is_demo and "not for diagnostic use" in bundled.algorithm.intended_use.lower()
    assert set(bundled.heads) == {"cxr", "brain_mri"}
    assert [lab.name for lab in bundled.heads["cxr"].labels] == list(NIH_LABELS)
    assert all(lab.code.value and 0 <= lab.threshold <= 1 for lab in bundled.heads["cxr"].labels)
    test = bundled.heads["cxr"].metrics["test"]
    assert test["n_images"] > 100 and len(test["macro"]["auc_ci95"]) == 2
    m = bundled.manifest
    assert m.training["init"].startswith("random initialisation")
    assert m.training["command"].startswith("ddn-node train")
    assert m.weights.dtype == "float16"
    card = (bundled.path / "README.md").read_text()
    assert "not for diagnostic use" in card.lower() and f"{test['macro']['auc']:.3f}" in card
    metrics = json.loads((bundled.path / "evaluation" / "metrics.json").read_text())
    assert metrics["model"]["weights_sha256"] == bundled.weights_sha256


def test_bundled_model_predicts_with_heat_maps(bundled: ModelArtifact) -> None:
    rng = np.random.default_rng(0)
    img = rng.random((300, 260)).astype(np.float32)
    p = Predictor(bundled)
    pred = p.predict([img], head="cxr", heatmaps=True)[0]
    assert set(pred.probabilities) == set(NIH_LABELS)
    assert all(hm.shape == (300, 260) for hm in pred.heatmaps.values())
    mri = p.predict([img], head="brain_mri", heatmaps=False)[0]
    assert abs(sum(mri.probabilities.values()) - 1) < 1e-4
