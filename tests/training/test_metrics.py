"""Metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ddn_node.training.metrics import (
    BootstrapSpec,
    Box,
    _fast_ap,
    _fast_auc,
    auc,
    average_precision,
    binary_auc_with_ci,
    box_overlaps,
    choose_threshold,
    classification_report,
    localisation_summary,
    pointing_hit,
    predicted_box,
    threshold_metrics,
)


def test_auc_by_hand() -> None:
    # positives 0.8, 0.4; negatives 0.6, 0.2: pairs (0.8>0.6, 0.8>0.2, 0.4<0.6, 0.4>0.2) -> 3/4
    y = np.array([1, 0, 1, 0])
    p = np.array([0.8, 0.6, 0.4, 0.2])
    assert auc(y, p) == pytest.approx(0.75)
    assert _fast_auc(y, p) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half
    assert auc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert auc(np.array([1, 1]), np.array([0.1, 0.2])) is None


def test_average_precision_by_hand() -> None:
    # ranking: 0.8(+), 0.6(-), 0.4(+), 0.2(-): precision at the two recalls = 1/1 and 2/3
    y = np.array([1, 0, 1, 0])
    p = np.array([0.8, 0.6, 0.4, 0.2])
    assert average_precision(y, p) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert _fast_ap(y, p) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_fast_versions_equal_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        y = rng.integers(0, 2, 40)
        if y.min() == y.max():
            continue
        p = np.round(rng.random(40), 1)
        assert _fast_auc(y, p) == pytest.approx(roc_auc_score(y, p))
        assert _fast_ap(y, p) == pytest.approx(average_precision_score(y, p))


def test_threshold_metrics_by_hand() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.7, 0.2, 0.8, 0.1, 0.1, 0.3, 0.05])
    m = threshold_metrics(y, p, 0.5)  # tp=2, fn=1, fp=1, tn=4
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 / 3)


def test_choose_threshold_maximises_f1() -> None:
    y = np.array([1, 1, 0, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.1])
    t, how = choose_threshold(y, p)
    # cuts: 0.9 ->F1 .5, 0.8 ->.8, 0.7 ->.667, 0.6 ->.857, 0.3 ->.75, 0.1 ->.667
    assert t == pytest.approx(0.6) and "max F1" in how
    assert choose_threshold(np.zeros(4), np.ones(4))[0] == 0.5


def test_classification_report_macro_and_ci() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((200, 3)) < 0.3).astype(float)
    y[:, 2] = 0  # undefined label
    p = np.clip(y * 0.3 + rng.random((200, 3)) * 0.7, 0, 1)
    groups = [str(i // 2) for i in range(200)]
    r = classification_report(y, p, ["a", "b", "c"], [0.5] * 3, groups, BootstrapSpec(300, 0))
    per = r["per_label"]
    assert per["c"]["auc"] is None and r["macro"]["labels_undefined"] == ["c"]
    assert r["macro"]["auc"] == pytest.approx((per["a"]["auc"] + per["b"]["auc"]) / 2)
    lo, hi = r["macro"]["auc_ci95"]
    assert lo < r["macro"]["auc"] < hi
    assert r["bootstrap"]["unit"] == "patient"
    b = binary_auc_with_ci(y[:, 0], p[:, 0], groups, BootstrapSpec(300, 0))
    assert (
        b["auc"] == pytest.approx(per["a"]["auc"])
        and b["auc_ci95"][0] < b["auc"] < b["auc_ci95"][1]
    )


def test_localisation_by_hand() -> None:
    hm = np.zeros((100, 100), dtype=np.float32)
    hm[20:40, 30:60] = 0.8
    hm[30, 45] = 1.0
    truth = Box(30, 20, 30, 20)  # x, y, w, h: exactly the hot rectangle
    assert pointing_hit(hm, truth)
    assert not pointing_hit(hm, Box(0, 0, 10, 10))
    pred = predicted_box(hm)
    assert pred == Box(30.0, 20.0, 30.0, 20.0)
    iou, iobb = box_overlaps(pred, truth, hm.shape)
    assert iou == pytest.approx(1.0) and iobb == pytest.approx(1.0)
    half = Box(30, 20, 15, 20)  # truth covering half of the predicted box
    iou, iobb = box_overlaps(pred, half, hm.shape)
    assert iou == pytest.approx(0.5) and iobb == pytest.approx(0.5)
    big = Box(0, 0, 100, 100)
    iou, iobb = box_overlaps(pred, big, hm.shape)
    assert iou == pytest.approx(600 / 10000) and iobb == pytest.approx(1.0)
    s = localisation_summary([True, False], [0.6, 0.05], [1.0, 0.2])
    assert (
        s["pointing_game"] == 0.5
        and s["iou_acc@0.1"] == 0.5
        and s["iobb_acc@0.25"] == 0.5
        and s["iou_acc@0.5"] == 0.5
    )


def test_pointing_uses_the_centre_of_a_flat_peak() -> None:
    hm = np.zeros((64, 64), dtype=np.float32)
    hm[0:16, 0:64] = 1.0  # flat top band (a clamped border of an upsampled map)
    assert pointing_hit(hm, Box(24, 0, 16, 16))  # centre of the plateau, not pixel (0, 0)
    assert not pointing_hit(hm, Box(0, 0, 4, 4))
