"""Localisation evidence: which labels' Grad-CAM maps say where the finding is.

A heat map is only worth showing a radiologist when it points at the finding more often
than a map that knows nothing about the image. Per label, on expert boxes:

* **pointing game** (Zhang et al., ECCV 2016): the share of boxes that hold the heat map's
  peak, with a 95% Wilson score interval (Wilson, JASA 1927). Boxes of one patient are not
  independent (follow-up films of the same heart), so the interval uses Kish's effective
  sample size for clustered data at the worst case of full within-patient correlation,
  ``n_eff = (sum m_p)^2 / sum m_p^2`` for ``m_p`` boxes of patient ``p`` (``n_eff = n``
  when every patient has one box, ``n_eff`` = the number of patients when all have the
  same number). Wilson rather than a bootstrap: with 5-15 boxes per label a percentile
  bootstrap collapses to [1, 1] or [0, 0] at all-hit or no-hit labels.
* **random baseline**: the expected hit rate of a peak placed uniformly at random in the
  image, which is the box's area fraction (counted on the pixel centres that
  :func:`~ddn_node.training.metrics.pointing_hit` tests), averaged over the label's boxes.
* **centre prior**: the hit rate of one fixed map that peaks at the image centre. Many
  findings (the heart above all) sit near the middle of a chest film, so a map that only
  ever points there already scores; a model must beat it to show it looks at the image.

The decision (:func:`decide`) is made on **validation patients** by default: the test
split is kept for reporting how the decision holds up, never to make it. The default rule
asks for the interval's lower bound to exceed both baselines (and at least
``min_boxes`` boxes); ``point_estimate`` asks only the point estimate to, for an operator
who accepts weaker evidence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy.stats import norm

from ddn_node.model.artifact import (
    PART_NAMES,
    LabelLocalisation,
    LocalisationRecord,
    LocalisationRule,
    PartLocalisation,
)
from ddn_node.training.metrics import Box, pointing_hit

RuleKind = Literal["ci_lower_bound", "point_estimate"]
RULE_KINDS: tuple[str, ...] = ("ci_lower_bound", "point_estimate")

METRIC = (
    "pointing game: share of expert boxes that hold the peak of the label's Grad-CAM map "
    "(layer4, mapped to the image, computed whatever the label's probability); 95% Wilson "
    "interval on the Kish effective number of boxes (patients as clusters, worst-case correlation)"
)
BASELINES = (
    "random: expected hit rate of a uniformly random peak = the box's area fraction of the image, "
    "mean over the label's boxes; centre: hit rate of a fixed map peaking at the image centre"
)


@dataclass(frozen=True)
class BoxOutcome:
    """One expert box and what each map did with it."""

    label: str
    image: str
    patient: str
    hit: bool  # Grad-CAM peak inside the box
    random: float  # expected hit rate of a uniformly random peak (area fraction)
    centre: bool  # the centre prior's peak inside the box


@dataclass(frozen=True)
class EvidenceRule:
    kind: RuleKind = "ci_lower_bound"
    min_boxes: int = 5
    confidence: float = 0.95
    decide_on: str = "val"  # "val", or "evaluated" (the images the metrics are about)

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ValueError(f"rule must be one of {RULE_KINDS}, got {self.kind!r}")
        if self.min_boxes < 1:
            raise ValueError("min_boxes must be at least 1")
        if not 0.5 < self.confidence < 1:
            raise ValueError("confidence must be in (0.5, 1)")


# --- the pieces ------------------------------------------------------------------------


def random_hit_rate(box: Box, shape: tuple[int, int]) -> float:
    """Probability that a peak at a uniformly random pixel lies in ``box``.

    The pixels counted are those whose centre :func:`pointing_hit` would call inside.
    """
    h, w = shape
    cols = np.arange(w) + 0.5
    rows = np.arange(h) + 0.5
    nx = int(np.count_nonzero((cols >= box.x) & (cols <= box.x + box.w)))
    ny = int(np.count_nonzero((rows >= box.y) & (rows <= box.y + box.h)))
    return nx * ny / float(h * w)


@lru_cache(maxsize=8)
def centre_map(shape: tuple[int, int]) -> np.ndarray:
    """A map that peaks at the image centre and falls off with distance (the centre prior)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    m = (1.0 - np.hypot((yy - (h - 1) / 2) / h, (xx - (w - 1) / 2) / w)).astype(np.float32)
    m.setflags(write=False)
    return m


def centre_hit(box: Box, shape: tuple[int, int]) -> bool:
    return pointing_hit(centre_map(shape), box)


def effective_n(patients: Sequence[str]) -> float:
    """Kish effective sample size of boxes clustered by patient, at full within-patient correlation."""
    if not patients:
        return 0.0
    _, counts = np.unique(np.asarray(patients, dtype=object), return_counts=True)
    return float(counts.sum() ** 2 / np.sum(counts.astype(np.float64) ** 2))


def wilson_interval(p_hat: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``p_hat`` observed on ``n`` (possibly effective) trials."""
    if n <= 0:
        return (0.0, 1.0)
    z = float(norm.ppf(1 - (1 - confidence) / 2))
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p_hat + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p_hat * (1 - p_hat) / n + z2 / (4 * n * n), 0.0))
    # The bounds always hold p_hat; clamping keeps rounding from putting it outside.
    return (max(0.0, min(p_hat, centre - half)), min(1.0, max(p_hat, centre + half)))


def summarise(outcomes: Sequence[BoxOutcome], confidence: float = 0.95) -> PartLocalisation:
    """Pointing game, interval and both baselines over ``outcomes`` (one label, one part)."""
    n = len(outcomes)
    if n == 0:
        return PartLocalisation()
    hits = sum(o.hit for o in outcomes)
    pg = hits / n
    n_eff = effective_n([o.patient for o in outcomes])
    return PartLocalisation(
        n_boxes=n,
        n_images=len({o.image for o in outcomes}),
        n_patients=len({o.patient for o in outcomes}),
        hits=int(hits),
        pointing_game=pg,
        ci95=wilson_interval(pg, n_eff, confidence),
        n_effective=round(n_eff, 3),
        random=float(np.mean([o.random for o in outcomes])),
        centre=float(np.mean([o.centre for o in outcomes])),
    )


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _figures(part: PartLocalisation) -> str:
    ci = part.ci95 or (None, None)
    return f"{_f(part.pointing_game)} [{_f(ci[0])}-{_f(ci[1])}] on n={part.n_boxes} boxes"


def decide(part: PartLocalisation, rule: EvidenceRule, where: str = "val") -> tuple[bool, str]:
    """``(maps_shown, reason)`` for one label from its figures on the deciding part ``where``."""
    on = PART_NAMES.get(where, where)
    if part.n_boxes == 0 or part.pointing_game is None:
        return False, f"no boxes for this label on {on}"
    pg = part.pointing_game
    rnd = part.random if part.random is not None else 0.0
    ctr = part.centre if part.centre is not None else 0.0
    if part.n_boxes < rule.min_boxes:
        return (
            False,
            f"too few boxes on {on}: {_figures(part)}, the rule needs at least {rule.min_boxes}",
        )
    fail = [
        (name, b)
        for name, b in (("the random baseline", rnd), ("the centre prior", ctr))
        if pg <= b
    ]
    baselines = f"random {_f(rnd)}, centre {_f(ctr)}"
    if fail:
        which = " and ".join(f"{'below' if pg < b else 'level with'} {name}" for name, b in fail)
        return False, f"{which} on {on}: {_figures(part)} ({baselines})"
    bar = max(rnd, ctr)
    pct = f"{round(100 * rule.confidence)}%"
    if rule.kind == "ci_lower_bound":
        lo = part.ci95[0] if part.ci95 is not None else 0.0
        if lo <= bar:
            return False, (
                f"above random {_f(rnd)} and centre {_f(ctr)} but not with {pct} confidence on {on}: "
                f"{_figures(part)} (the interval's lower bound must exceed {_f(bar)})"
            )
        how = f"{pct} lower bound above both"
    else:
        how = "point estimate above both"
    return True, f"beats random {_f(rnd)} and centre {_f(ctr)} on {on}: {_figures(part)} ({how})"


def rule_description(rule: EvidenceRule, decided_on: str, note: str = "") -> str:
    on = PART_NAMES.get(decided_on, decided_on)
    pct = f"{round(100 * rule.confidence)}%"
    what = (
        f"the {pct} Wilson lower bound of the pointing game exceeds both the random baseline and the centre prior"
        if rule.kind == "ci_lower_bound"
        else "the pointing game's point estimate exceeds both the random baseline and the centre prior"
    )
    text = (
        f"heat maps are drawn for a label when, on {on}, {what}, on at least {rule.min_boxes} boxes"
    )
    if decided_on == "val":
        text += "; the test split is reported beside it and never used to decide"
    return text + (f"; {note}" if note else "")


def build_record(
    labels: Sequence[str],
    outcomes: Mapping[str, Sequence[BoxOutcome]],
    rule: EvidenceRule,
    weights_sha256: str,
    evaluated_part: str,
    command: str = "",
    created: str = "",
) -> LocalisationRecord:
    """The manifest record: per label, figures for every part and the decision.

    ``outcomes`` maps a part name ("val", "test" or "all") to its boxes; ``evaluated_part``
    names the part the evaluation's other metrics are about. A requested ``val`` decision
    falls back to ``evaluated_part`` (said in the rule) when the artifact has no split.
    """
    note = ""
    want = evaluated_part if rule.decide_on == "evaluated" else rule.decide_on
    if want not in outcomes:
        note = f"the artifact records no {PART_NAMES.get(want, want)}, so {PART_NAMES.get(evaluated_part, evaluated_part)} decide"
        want = evaluated_part
    by_part_label: dict[str, dict[str, list[BoxOutcome]]] = {
        part: {lab: [o for o in outs if o.label == lab] for lab in labels}
        for part, outs in outcomes.items()
    }
    entries: dict[str, LabelLocalisation] = {}
    for lab in labels:
        parts = {part: summarise(by_part_label[part][lab], rule.confidence) for part in outcomes}
        shown, reason = decide(parts.get(want, PartLocalisation()), rule, want)
        if not shown and parts.get(want, PartLocalisation()).n_boxes == 0:
            others = [
                f"{p.n_boxes} on {PART_NAMES.get(k, k)}"
                for k, p in parts.items()
                if k != want and p.n_boxes
            ]
            if others:
                reason += f" ({', '.join(others)}: reported, not used to decide)"
        entries[lab] = LabelLocalisation(maps_shown=shown, reason=reason, parts=parts)
    return LocalisationRecord(
        metric=METRIC,
        baselines=BASELINES,
        rule=LocalisationRule(
            kind=rule.kind,
            confidence=rule.confidence,
            min_boxes=rule.min_boxes,
            decided_on=want,
            description=rule_description(rule, want, note),
        ),
        weights_sha256=weights_sha256,
        labels=entries,
        command=command,
        created=created,
    )
