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
    assert (
        bundled.algorithm.is_demo
        and "not for diagnostic use" in bundled.algorithm.intended_use.lower()
    )
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


def test_bf16_precision_keeps_the_bundled_models_calls_and_heat_maps(
    bundled: ModelArtifact,
) -> None:
    """precision = "bf16" runs the backbone in bf16 only: probabilities stay within a few
    hundredths of fp32 on chest-like images, and the same findings get heat maps (but for
    one whose probability sits at its threshold)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:320, 0:280]
    imgs = [
        np.clip(
            0.3
            + 0.4 * np.exp(-((yy - 160) ** 2 + (xx - c) ** 2) / 6000.0)
            + rng.normal(0, 0.03, (320, 280)),
            0,
            1,
        ).astype(np.float32)
        for c in (90, 140, 190)
    ]
    fp32 = Predictor(bundled).predict(imgs, head="cxr", heatmaps=True)
    bf16 = Predictor(bundled, precision="bf16").predict(imgs, head="cxr", heatmaps=True)
    thresholds = {lab.name: lab.threshold for lab in bundled.heads["cxr"].labels}
    for a, b in zip(fp32, bf16, strict=True):
        assert max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities) < 0.03
        assert a.heatmaps, "these images should have findings above threshold"
        for name in set(a.heatmaps) ^ set(b.heatmaps):
            assert abs(a.probabilities[name] - thresholds[name]) < 0.03
        assert all(hm.shape == (320, 280) and np.isfinite(hm).all() for hm in b.heatmaps.values())
    with pytest.raises(ValueError, match="precision"):
        Predictor(bundled, precision="int4")


def test_bundled_manifest_records_localisation_evidence_for_every_label(
    bundled: ModelArtifact,
) -> None:
    """`ddn-node evaluate --bboxes ... --record-in-manifest` was run for the shipped weights:
    every CXR label has a decision, made on validation patients, with a reason."""
    rec = bundled.heads["cxr"].localisation
    assert rec is not None, "re-run ddn-node evaluate with --bboxes --record-in-manifest"
    assert rec.weights_sha256 == bundled.weights_sha256
    assert rec.rule.decided_on == "val" and rec.rule.kind == "ci_lower_bound"
    assert set(rec.labels) == set(NIH_LABELS)
    ev = bundled.localisation("cxr")
    assert set(ev) == set(NIH_LABELS)
    boxed = {lab for lab, e in rec.labels.items() if e.parts.get("val") and e.parts["val"].n_boxes}
    assert boxed, "the validation patients have expert boxes"
    for lab, e in ev.items():
        assert e.recorded and e.split == "val" and e.reason
        assert "test" in e.parts  # the held-out figures are reported beside the decision
        if lab not in boxed:
            assert not e.shown and e.reason.startswith("no boxes for this label")
            continue
        assert e.ci is not None and e.ci[0] <= e.pointing_game <= e.ci[1]
        assert e.random is not None and e.centre is not None
        assert e.shown == (e.n_boxes >= rec.rule.min_boxes and e.ci[0] > max(e.random, e.centre))
    assert bundled.heatmap_labels("cxr") == {lab for lab, e in ev.items() if e.shown}
    # The brain MRI head has no boxes, so no evidence and no maps.
    assert bundled.heatmap_labels("brain_mri") == frozenset()
    metrics = json.loads((bundled.path / "evaluation" / "metrics.json").read_text())
    assert (
        metrics["localization"]["evidence"]["labels"] == json.loads(rec.model_dump_json())["labels"]
    )
    assert (bundled.path / "evaluation" / "localisation.png").is_file()
    card = (bundled.path / "README.md").read_text()
    for lab in boxed:
        assert lab in card.split("Which labels get heat maps", 1)[1]
