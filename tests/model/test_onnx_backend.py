"""The ONNX Runtime backend (trunk in ONNX Runtime, the Grad-CAM tail in torch) gives the
answers torch fp32 gives: the same probabilities and the same heat maps, on the tiny test
artifact; heat maps capped at a side are the full-size maps, sampled more coarsely."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from support.artifacts import make_test_artifact

from ddn_node.config import WorkerSettings
from ddn_node.model.artifact import ModelArtifact
from ddn_node.model.inference import Predictor
from ddn_node.model.preprocess import fit_geometry, map_size, map_to_source

pytest.importorskip("onnxruntime")


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    # Square, wide and tall, and more than one batch of the predictor's batch size (4).
    shapes = [(256, 256), (200, 320), (330, 210), (64, 64), (96, 80), (128, 128)]
    return [rng.random(s).astype(np.float32) for s in shapes]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    # Threshold 0: every finding positive, so every label gets a heat map to compare.
    return ModelArtifact.load(make_test_artifact(tmp_path_factory.mktemp("m") / "model", 0.0))


def test_onnx_backend_matches_torch_fp32_probabilities_and_heat_maps(
    artifact: ModelArtifact,
) -> None:
    images = _images()
    ref = Predictor(artifact, batch_size=4).predict(images, head="cxr", heatmaps=True)
    ort = Predictor(artifact, batch_size=4, backend="onnxruntime").predict(
        images, head="cxr", heatmaps=True
    )
    for r, o, img in zip(ref, ort, images, strict=True):
        assert set(r.probabilities) == set(o.probabilities)
        for name, p in r.probabilities.items():
            assert o.probabilities[name] == pytest.approx(p, abs=1e-5)
        assert set(r.heatmaps) == set(o.heatmaps) and r.heatmaps
        for name, hm in r.heatmaps.items():
            assert o.heatmaps[name].shape == hm.shape == img.shape
            assert float(np.abs(o.heatmaps[name] - hm).max()) < 1e-3


def test_deferred_heat_maps_from_onnx_features_match_torch(artifact: ModelArtifact) -> None:
    images = _images()[:2]
    torch_p = Predictor(artifact)
    ort_p = Predictor(artifact, backend="onnxruntime")
    (ref, fwd_ref), (got, fwd_got) = (
        torch_p.predict_deferred(images, "cxr"),
        ort_p.predict_deferred(images, "cxr"),
    )
    torch_p.add_heatmaps(ref, fwd_ref, only={"Effusion"})
    ort_p.add_heatmaps(got, fwd_got, only={"Effusion"})
    for r, o in zip(ref, got, strict=True):
        assert set(r.heatmaps) == set(o.heatmaps) == {"Effusion"}
        assert float(np.abs(r.heatmaps["Effusion"] - o.heatmaps["Effusion"]).max()) < 1e-3


def test_onnx_trunk_is_cached_by_the_weights_sha256(
    artifact: ModelArtifact, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = Predictor(artifact, backend="onnxruntime", onnx_cache_dir=cache)
    (graph,) = cache.glob("*.onnx")
    assert artifact.weights_sha256[:32] in graph.name
    stamp = graph.stat().st_mtime_ns
    second = Predictor(artifact, backend="onnxruntime", onnx_cache_dir=cache)
    assert graph.stat().st_mtime_ns == stamp  # read back, not exported again
    img = _images()[:1]
    a = first.predict(img, "cxr", heatmaps=False)[0].probabilities
    b = second.predict(img, "cxr", heatmaps=False)[0].probabilities
    assert a == b


def test_onnx_backend_refuses_what_it_cannot_do(artifact: ModelArtifact) -> None:
    with pytest.raises(ValueError, match="bf16"):
        Predictor(artifact, backend="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="backend"):
        Predictor(artifact, backend="tensorrt")
    with pytest.raises(ValidationError, match="fp32"):
        WorkerSettings(backend="onnxruntime", precision="bf16")
    with pytest.raises(ValidationError, match="CPU"):
        WorkerSettings(backend="onnxruntime", device="cuda")
    assert WorkerSettings(backend="onnxruntime").effective_backend == "onnxruntime"
    # The default: ONNX Runtime where it runs (the CPU, fp32), torch where it does not.
    assert WorkerSettings().effective_backend == "onnxruntime"
    assert WorkerSettings(precision="bf16").effective_backend == "torch"
    assert WorkerSettings(device="cuda").effective_backend == "torch"
    assert WorkerSettings(backend="torch").effective_backend == "torch"


def test_capped_heat_maps_are_the_full_maps_sampled_coarsely(artifact: ModelArtifact) -> None:
    rng = np.random.default_rng(3)
    big = rng.random((1200, 900)).astype(np.float32)
    full = Predictor(artifact).predict([big], "cxr", heatmaps=True)[0]
    small = Predictor(artifact, heatmap_max_side=256).predict([big], "cxr", heatmaps=True)[0]
    assert small.probabilities == full.probabilities
    for name, hm in full.heatmaps.items():
        s = small.heatmaps[name]
        assert s.shape == (256, 192) and s.dtype == np.float32  # the aspect kept
        # The full map at the small map's pixel centres (nearest), within a grey level or two.
        rows = ((np.arange(256) + 0.5) * 1200 / 256).astype(int)
        cols = ((np.arange(192) + 0.5) * 900 / 192).astype(int)
        assert float(np.abs(hm[np.ix_(rows, cols)] - s).max()) < 0.05
        # Scaled by its peak like the full map (an all-zero map stays zero).
        assert float(s.max()) == pytest.approx(float(hm.max()), abs=0.05)
        assert float(s.max()) <= 1.0 and float(s.min()) >= 0.0


def test_map_size_keeps_small_sources_and_the_aspect() -> None:
    assert map_size(fit_geometry(200, 100, 224), 256) == (200, 100)
    assert map_size(fit_geometry(2048, 1536, 224), 256) == (256, 192)
    assert map_size(fit_geometry(2048, 1536, 224), None) == (2048, 1536)
    cam = torch.rand(7, 7)
    assert map_to_source(cam, fit_geometry(2048, 1536, 224), max_side=256).shape == (256, 192)
