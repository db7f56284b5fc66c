"""Grad-CAM correctness: a model trained to see a bright blob points at the blob."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ddn_node.model.artifact import (
    AbnormalityDef,
    HeadInfo,
    Manifest,
    ModelArtifact,
    WeightsModel,
    architecture_of,
    save_artifact,
)
from ddn_node.model.ddn import DDN, DDNConfig, HeadConfig
from ddn_node.model.gradcam import gradcam, logits_and_cams
from ddn_node.model.inference import Predictor
from ddn_node.model.preprocess import PreprocessSpec, prepare_batch
from ddn_node.model.types import Code, LabelSpec
from ddn_node.training.metrics import peak

# 256 px gives the tiny backbone an 8 x 8 last stage. At 128 px (4 x 4 cells of 32 px)
# where the Grad-CAM peak lands depended on the CPU the fixture trained on.
SIZE = 256
SPEC = PreprocessSpec(size=SIZE)


def _image(
    rng: np.random.Generator, shape: tuple[int, int], blob: tuple[float, float] | None
) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    img = 0.25 + 0.1 * (xx / w) + rng.normal(0, 0.04, shape)  # gradient + noise background
    if blob is not None:
        r = 0.06 * max(h, w)
        img += 0.6 * np.exp(-((yy - blob[0]) ** 2 + (xx - blob[1]) ** 2) / (2 * r * r))
    return np.clip(img, 0, 1).astype(np.float32)


def _blob_set(
    rng: np.random.Generator, n: int, shape: tuple[int, int], mixed: bool = False
) -> tuple[list[np.ndarray], np.ndarray, list[tuple[float, float] | None]]:
    imgs, ys, centres = [], [], []
    for i in range(n):
        # mixed: some wide and tall images too, so the model has seen the padding.
        h, w = (
            [shape, (shape[0] * 3 // 4, shape[1]), (shape[0], shape[1] * 3 // 4)][i % 3]
            if mixed
            else shape
        )
        c = (rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w) if i % 2 == 0 else None
        imgs.append(_image(rng, (h, w), c))
        ys.append([1.0 if c else 0.0])
        centres.append(c)
    return imgs, np.array(ys, dtype=np.float32), centres


@pytest.fixture(scope="module")
def blob_model() -> DDN:
    """A tiny DDN trained in the test to answer 'is there a bright blob?'."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    imgs, y, _ = _blob_set(rng, 192, (SIZE, SIZE), mixed=True)
    x, _ = prepare_batch(imgs, SPEC)
    model = DDN(DDNConfig(backbone="tiny", heads=(HeadConfig("blob", ("blob",)),), dropout=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    yt = torch.from_numpy(y)
    for _ in range(12):
        model.train()
        perm = torch.randperm(len(imgs))
        for s in range(0, len(imgs), 32):
            idx = perm[s : s + 32]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(x[idx])["blob"], yt[idx]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_the_blob_model_learned_the_task(blob_model: DDN) -> None:
    rng = np.random.default_rng(1)
    imgs, y, _ = _blob_set(rng, 40, (SIZE, SIZE))
    x, _ = prepare_batch(imgs, SPEC)
    with torch.no_grad():
        p = torch.sigmoid(blob_model(x)["blob"]).numpy()
    assert ((p > 0.5) == (y > 0.5)).mean() >= 0.9


def test_heat_map_peaks_on_the_blob(blob_model: DDN) -> None:
    """The map points at the blob: its centre is among the hottest tenth of the map, and
    the peak is typically within one feature-map cell (256 / 8 = 32 px) of it.

    Not "the argmax within one cell for 85 %": on an 8 x 8 map a second hot cell beside the
    blob wins the argmax on some CPUs and thread counts (15/20 with one thread here, 17/20
    with two), while the blob centre's rank in the map stays above 0.93 on all of them.
    """
    rng = np.random.default_rng(2)
    imgs, _, centres = _blob_set(rng, 40, (SIZE, SIZE))
    x, geoms = prepare_batch(imgs, SPEC)
    cams = gradcam(blob_model, x, "blob")
    from ddn_node.model.preprocess import map_to_source

    ranks, distances = [], []
    for i, centre in enumerate(centres):
        if centre is None:
            continue
        hm = map_to_source(cams[(i, 0)], geoms[i])
        cy, cx = centre
        ranks.append(float((hm < hm[int(cy), int(cx)]).mean()))
        r, c = peak(hm)
        distances.append(float(np.hypot(r - cy, c - cx)))
    assert len(ranks) == 20
    # A map blind to the blob would rank its centre at 0.5 on average.
    assert np.mean(np.array(ranks) >= 0.9) >= 0.9, sorted(ranks)
    assert float(np.median(distances)) <= 32, sorted(distances)


def test_gradcam_backpropagates_only_through_the_tail(blob_model: DDN) -> None:
    rng = np.random.default_rng(3)
    x, _ = prepare_batch([_image(rng, (SIZE, SIZE), (100.0, 80.0))], SPEC)
    blob_model.zero_grad(set_to_none=True)
    with torch.inference_mode():
        feats = blob_model.features(x)
    logits, cams = logits_and_cams(blob_model, feats, "blob", [[0]])
    assert cams[(0, 0)].shape == feats.shape[2:]
    assert float(cams[(0, 0)].min()) >= 0
    # Nothing before the target layer was part of the graph, and no parameter kept a grad.
    assert all(p.grad is None for p in blob_model.parameters())
    with torch.no_grad():
        assert torch.allclose(logits, blob_model(x)["blob"], atol=1e-5)


def _artifact(model: DDN, tmp_path: Path) -> ModelArtifact:
    head = HeadInfo(
        activation="sigmoid",
        labels=[LabelSpec("blob", Code("B", "99DDN", "blob"), 0.5, "test")],
        abnormality=AbnormalityDef(kind="max_probability"),
    )
    m = Manifest(
        name="blob",
        version="t",
        algorithm_name="blob finder",
        architecture=architecture_of(model.config),
        heads={"blob": head},
        preprocess=SPEC,
        weights=WeightsModel(sha256="", dtype="float32", n_parameters=0),
    )
    save_artifact(tmp_path / "blob", model, m, dtype=torch.float32)
    return ModelArtifact.load(tmp_path / "blob")


def test_predictor_heat_maps_at_source_size_only_above_threshold(
    blob_model: DDN, tmp_path: Path
) -> None:
    art = _artifact(blob_model, tmp_path)
    rng = np.random.default_rng(4)
    wide = _image(rng, (300, 480), (120.0, 350.0))  # not square: exercises resize + pad + crop back
    empty = _image(rng, (256, 256), None)
    p = Predictor(art, device="cpu")
    preds = p.predict([wide, empty], head="blob", sop_instance_uids=["1.1", "1.2"], heatmaps=True)
    assert [q.sop_instance_uid for q in preds] == ["1.1", "1.2"]
    assert preds[0].probabilities["blob"] >= 0.5 and preds[1].probabilities["blob"] < 0.5
    hm = preds[0].heatmaps["blob"]
    assert hm.shape == (300, 480) and hm.dtype == np.float32
    assert (
        float(hm.min()) >= 0 and 0.95 <= float(hm.max()) <= 1.0
    )  # scaled by its peak before the last resize
    r, c = peak(hm)
    assert np.hypot(r - 120, c - 350) <= 480 / 4
    assert preds[1].heatmaps == {}
    no_maps = p.predict([wide], head="blob", heatmaps=False)
    assert no_maps[0].heatmaps == {} and no_maps[0].probabilities["blob"] == pytest.approx(
        preds[0].probabilities["blob"], abs=1e-5
    )
