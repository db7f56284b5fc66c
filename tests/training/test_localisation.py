"""Localisation evidence: which labels' heat maps beat the random and centre baselines."""

from __future__ import annotations

import numpy as np
import pytest

from ddn_node.model.artifact import PartLocalisation
from ddn_node.training.localisation import (
    BoxOutcome,
    EvidenceRule,
    build_record,
    centre_hit,
    centre_map,
    decide,
    effective_n,
    random_hit_rate,
    summarise,
    wilson_interval,
)
from ddn_node.training.metrics import Box, pointing_hit

SHAPE = (64, 64)


def _blob(shape: tuple[int, int], row: float, col: float, sigma: float = 3.0) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * sigma**2)).astype(np.float32)


def _off_centre_boxes(n: int, seed: int = 0) -> list[Box]:
    """Boxes scattered over the lungs, none holding the image centre."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        x, y = rng.uniform(2, 50), rng.uniform(2, 50)
        b = Box(float(x), float(y), 10.0, 10.0)
        if not centre_hit(b, SHAPE):
            out.append(b)
    return out


def _outcomes(
    label: str, boxes: list[Box], heatmaps: list[np.ndarray], patients: list[str] | None = None
) -> list[BoxOutcome]:
    patients = patients or [f"p{i}" for i in range(len(boxes))]
    return [
        BoxOutcome(
            label,
            f"{i}.png",
            patients[i],
            pointing_hit(hm, b),
            random_hit_rate(b, SHAPE),
            centre_hit(b, SHAPE),
        )
        for i, (b, hm) in enumerate(zip(boxes, heatmaps, strict=True))
    ]


def test_random_baseline_is_the_box_area_fraction() -> None:
    assert random_hit_rate(Box(0, 0, 64, 64), SHAPE) == 1.0
    assert random_hit_rate(Box(0, 0, 32, 32), SHAPE) == pytest.approx(0.25)
    assert random_hit_rate(Box(10, 20, 8, 4), SHAPE) == pytest.approx(8 * 4 / 64**2, rel=0.3)
    assert random_hit_rate(Box(-10, -10, 20, 20), SHAPE) == pytest.approx(
        100 / 64**2, rel=0.3
    )  # clipped to the image
    # It is what a uniformly random peak pixel scores, counted the way pointing_hit counts.
    b = Box(5.3, 17.8, 11.1, 6.6)
    per_pixel = np.zeros(SHAPE)
    for r in range(SHAPE[0]):
        for c in range(SHAPE[1]):
            one = np.zeros(SHAPE, dtype=np.float32)
            one[r, c] = 1.0
            per_pixel[r, c] = pointing_hit(one, b)
    assert random_hit_rate(b, SHAPE) == pytest.approx(per_pixel.mean())


def test_wilson_interval_and_patient_clustering() -> None:
    lo, hi = wilson_interval(0.0, 10)
    assert lo == 0.0 and 0.2 < hi < 0.35
    lo, hi = wilson_interval(1.0, 10)
    assert hi == 1.0 and 0.65 < lo < 0.8
    lo, hi = wilson_interval(0.4, 20)
    assert lo < 0.4 < hi
    lo2, hi2 = wilson_interval(0.4, 200)
    assert lo < lo2 < 0.4 < hi2 < hi  # more boxes, narrower
    assert effective_n(["a", "b", "c", "d"]) == 4
    assert effective_n(["a", "a", "b", "b"]) == 2
    assert 1 < effective_n(["a", "a", "a", "b"]) < 2
    # Same hit rate, but the boxes come from fewer patients: a wider interval.
    boxes = _off_centre_boxes(12)
    maps = [_blob(SHAPE, b.y + b.h / 2, b.x + b.w / 2) for b in boxes]
    spread = summarise(_outcomes("X", boxes, maps))
    clustered = summarise(_outcomes("X", boxes, maps, patients=[f"p{i // 4}" for i in range(12)]))
    assert spread.pointing_game == clustered.pointing_game == 1.0
    assert clustered.n_patients == 3 and clustered.n_effective < spread.n_effective
    assert clustered.ci95[0] < spread.ci95[0]


def test_a_map_that_peaks_in_the_box_beats_both_baselines() -> None:
    boxes = _off_centre_boxes(20)
    maps = [_blob(SHAPE, b.y + b.h / 2, b.x + b.w / 2) for b in boxes]
    part = summarise(_outcomes("Nodule", boxes, maps))
    assert part.n_boxes == 20 and part.hits == 20 and part.pointing_game == 1.0
    assert part.centre == 0.0 and 0 < part.random < 0.1
    shown, reason = decide(part, EvidenceRule(), "val")
    assert shown, reason
    assert reason.startswith("beats random") and "n=20 boxes" in reason and "validation" in reason


def test_a_centre_map_does_not_beat_the_centre_prior() -> None:
    # Boxes around the heart: the centre prior hits most of them, and so does a map that
    # always peaks at the centre, whatever the image shows.
    rng = np.random.default_rng(1)
    boxes = [
        Box(float(rng.uniform(16, 30)), float(rng.uniform(16, 30)), 20.0, 18.0) for _ in range(30)
    ]
    maps = [centre_map(SHAPE).copy() for _ in boxes]
    part = summarise(_outcomes("Cardiomegaly", boxes, maps))
    assert part.pointing_game == part.centre > part.random
    for kind in ("ci_lower_bound", "point_estimate"):
        shown, reason = decide(part, EvidenceRule(kind=kind), "val")
        assert not shown
        assert "centre prior" in reason


def test_noise_maps_do_not_beat_the_random_baseline() -> None:
    rng = np.random.default_rng(2)
    boxes = _off_centre_boxes(25, seed=3)
    maps = [rng.random(SHAPE).astype(np.float32) for _ in boxes]
    part = summarise(_outcomes("Mass", boxes, maps))
    shown, reason = decide(part, EvidenceRule(), "val")
    assert not shown, reason


def test_labels_without_boxes_or_with_too_few_get_no_maps() -> None:
    shown, reason = decide(PartLocalisation(), EvidenceRule(), "val")
    assert not shown and reason.startswith("no boxes for this label")
    boxes = _off_centre_boxes(3)
    maps = [_blob(SHAPE, b.y + b.h / 2, b.x + b.w / 2) for b in boxes]
    part = summarise(_outcomes("Nodule", boxes, maps))
    shown, reason = decide(part, EvidenceRule(min_boxes=5), "val")
    assert not shown and "too few boxes" in reason
    assert decide(part, EvidenceRule(min_boxes=3), "val")[0]


def test_the_ci_rule_is_stricter_than_the_point_estimate() -> None:
    # Above both baselines as a point estimate, but the interval reaches below the centre prior.
    part = PartLocalisation(
        n_boxes=10,
        n_images=10,
        n_patients=10,
        hits=4,
        pointing_game=0.4,
        ci95=(0.17, 0.69),
        n_effective=10,
        random=0.1,
        centre=0.3,
    )
    pt_shown, pt_reason = decide(part, EvidenceRule(kind="point_estimate"), "val")
    ci_shown, ci_reason = decide(part, EvidenceRule(kind="ci_lower_bound"), "val")
    assert pt_shown and "point estimate" in pt_reason
    assert not ci_shown and "not with 95% confidence" in ci_reason and "0.30" in ci_reason
    sure = part.model_copy(update={"ci95": (0.32, 0.5)})
    assert decide(sure, EvidenceRule(), "val")[0]


def _perfect(label: str, n: int, seed: int) -> list[BoxOutcome]:
    boxes = _off_centre_boxes(n, seed)
    return _outcomes(label, boxes, [_blob(SHAPE, b.y + b.h / 2, b.x + b.w / 2) for b in boxes])


def _miss(label: str, n: int, seed: int) -> list[BoxOutcome]:
    boxes = _off_centre_boxes(n, seed)
    return _outcomes(label, boxes, [centre_map(SHAPE).copy() for _ in boxes])


def test_the_record_decides_on_validation_and_only_reports_test() -> None:
    labels = ["Good", "GoodOnTestOnly", "NoBoxes", "TestBoxesOnly"]
    parts = {
        "val": _perfect("Good", 12, 0) + _miss("GoodOnTestOnly", 12, 1),
        "test": _miss("Good", 12, 2)
        + _perfect("GoodOnTestOnly", 12, 3)
        + _perfect("TestBoxesOnly", 12, 4),
    }
    rec = build_record(
        labels, parts, EvidenceRule(), "f" * 64, "test", "ddn-node evaluate ...", "2026-01-01"
    )
    assert set(rec.labels) == set(labels)
    assert rec.rule.decided_on == "val" and "never used to decide" in rec.rule.description
    assert rec.labels["Good"].maps_shown  # poor on test: reported, not used
    assert rec.labels["Good"].parts["test"].pointing_game == 0.0
    assert not rec.labels["GoodOnTestOnly"].maps_shown
    assert not rec.labels["NoBoxes"].maps_shown and rec.labels["NoBoxes"].reason.startswith(
        "no boxes for this label"
    )
    tb = rec.labels["TestBoxesOnly"]
    assert not tb.maps_shown and "not used to decide" in tb.reason
    assert rec.weights_sha256 == "f" * 64


def test_without_a_validation_split_the_evaluated_images_decide_and_say_so() -> None:
    rec = build_record(["Good"], {"all": _perfect("Good", 10, 0)}, EvidenceRule(), "0" * 64, "all")
    assert rec.rule.decided_on == "all" and "records no validation" in rec.rule.description
    assert rec.labels["Good"].maps_shown
    rec = build_record(
        ["Good"],
        {"val": _miss("Good", 10, 0), "test": _perfect("Good", 10, 1)},
        EvidenceRule(decide_on="evaluated"),
        "0" * 64,
        "test",
    )
    assert rec.rule.decided_on == "test" and rec.labels["Good"].maps_shown


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValueError):
        EvidenceRule(kind="vibes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        EvidenceRule(min_boxes=0)
