"""Drift: does what the node sees still look like what the model was validated on?

Per scored image the worker records a handful of numbers (``ImageInputs``: intensity mean
and spread, long side, manufacturer, view, abnormality score, label probabilities) in
``drift_observations``, in the report's transaction. After each report ``check`` compares
the latest ``[drift] window`` images of that model version and head with the artifact's
``drift_reference.json`` (``model/drift_reference.py``), feature by feature:

- numeric features: the population stability index over the reference's quintiles, and the
  two-sample Kolmogorov-Smirnov statistic (the largest gap between the two CDFs);
- the view: PSI over its categories. The manufacturer has no reference (the validation
  labels do not name one): it is counted and shown, never judged.

A feature whose PSI reaches ``psi_alarm`` (with at least ``min_images`` in the window) is
in alarm until it falls under ``psi_clear``; the check that raises one or more alarms
writes one ``model.drift_alarm`` audit event naming them, so each crossing is audited once.
The figures go to ``drift_states``, which ``/metrics`` and ``/admin/drift`` read.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ddn_node.config import DriftSettings
from ddn_node.model.drift_reference import (
    INTENSITY_MEAN,
    INTENSITY_STD,
    SCORE,
    SIZE,
    VIEW,
    DriftReference,
    intensity_stats,
    load_reference,
)
from ddn_node.store.audit import AuditEventName, add_audit
from ddn_node.store.engine import Database
from ddn_node.store.models import DriftObservation, DriftState, utcnow

log = structlog.get_logger("ddn_node.drift")

# Quintiles, not deciles: the reference holds one value per validation image (144 for
# ddn-cxr), and PSI's sampling noise grows with the bins: about (bins - 1) x (1/n + 1/N)
# for two samples of one distribution, 0.07 at 5 bins for a window of 100 against 144,
# 0.15 at 10, too near the 0.25 alarm when some twenty features are judged at once.
QUANTILES = 5
# An empty bin would make PSI infinite; a share is floored at this (the usual practice).
PSI_FLOOR = 1e-4


# -- the statistics --------------------------------------------------------------------


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of two distributions over the same bins (shares or
    counts; each is normalised): sum of (a - e) * ln(a / e)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64) / max(sum(expected), 1e-12), PSI_FLOOR)
    a = np.maximum(np.asarray(actual, dtype=np.float64) / max(sum(actual), 1e-12), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def quantile_edges(reference: Sequence[float]) -> list[float]:
    """The inner bin edges: the reference's quintiles, ties merged (a feature the reference
    holds few values of gets fewer bins)."""
    qs = np.quantile(np.asarray(reference, dtype=np.float64), np.arange(1, QUANTILES) / QUANTILES)
    return sorted({float(q) for q in qs})


def binned(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts per bin (-inf, e1], (e1, e2], ..., (ek, inf)."""
    index = np.searchsorted(np.asarray(edges), np.asarray(values, dtype=np.float64), side="left")
    return np.bincount(index, minlength=len(edges) + 1).tolist()


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: max over x of |F_a(x) - F_b(x)|."""
    xa, xb = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    points = np.concatenate([xa, xb])
    fa = np.searchsorted(xa, points, side="right") / len(xa)
    fb = np.searchsorted(xb, points, side="right") / len(xb)
    return float(np.max(np.abs(fa - fb)))


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    psi: float
    ks: float | None
    bins: list[str]
    reference: list[float]  # shares per bin
    current: list[float]


def numeric_drift(
    feature: str, reference: Sequence[float], current: Sequence[float]
) -> FeatureDrift:
    edges = quantile_edges(reference)
    ref, cur = binned(reference, edges), binned(current, edges)
    names = [f"<= {edges[0]:.3g}"] if edges else ["all"]
    names += [f"{lo:.3g} - {hi:.3g}" for lo, hi in itertools.pairwise(edges)]
    if edges:
        names.append(f"> {edges[-1]:.3g}")
    return FeatureDrift(
        feature,
        psi(ref, cur),
        ks_statistic(reference, current),
        names,
        [c / len(reference) for c in ref],
        [c / len(current) for c in cur],
    )


def categorical_drift(
    feature: str, reference: Mapping[str, int], current: Sequence[str]
) -> FeatureDrift:
    seen = Counter(current)
    names = sorted(set(reference) | set(seen))
    ref = [float(reference.get(n, 0)) for n in names]
    cur = [float(seen.get(n, 0)) for n in names]
    total_ref = sum(ref) or 1.0
    return FeatureDrift(
        feature,
        psi(ref, cur),
        None,
        names,
        [r / total_ref for r in ref],
        [c / len(current) for c in cur],
    )


# -- what the worker records -----------------------------------------------------------


@dataclass(frozen=True)
class ImageInputs:
    """One scored image as the drift monitor sees it."""

    intensity_mean: float
    intensity_std: float
    size: int
    manufacturer: str
    view: str
    score: float
    probabilities: Mapping[str, float]


def image_inputs(
    image: np.ndarray, header: Dataset, probabilities: Mapping[str, float], score: float
) -> ImageInputs:
    """The features of one decoded image (the pixels the model saw) and its header."""
    mean, std = intensity_stats(image)
    rows = int(getattr(header, "Rows", 0) or image.shape[0])
    columns = int(getattr(header, "Columns", 0) or image.shape[1])
    return ImageInputs(
        intensity_mean=mean,
        intensity_std=std,
        size=max(rows, columns),
        manufacturer=str(getattr(header, "Manufacturer", "") or "")[:64],
        view=str(getattr(header, "ViewPosition", "") or "").strip().upper()[:16],
        score=float(score),
        probabilities={k: float(v) for k, v in probabilities.items()},
    )


@dataclass(frozen=True)
class ModelKey:
    model_name: str
    model_version: str
    head: str


def record_inputs(
    session: Session, key: ModelKey, inputs: Sequence[ImageInputs], now: dt.datetime
) -> None:
    for i in inputs:
        session.add(
            DriftObservation(
                at=now,
                model_name=key.model_name,
                model_version=key.model_version,
                head=key.head,
                intensity_mean=i.intensity_mean,
                intensity_std=i.intensity_std,
                size=i.size,
                manufacturer=i.manufacturer,
                view=i.view,
                score=i.score,
                probabilities=dict(i.probabilities),
            )
        )


# -- the check -------------------------------------------------------------------------


def window(session: Session, key: ModelKey, size: int) -> list[DriftObservation]:
    return list(
        session.scalars(
            select(DriftObservation)
            .where(
                DriftObservation.model_name == key.model_name,
                DriftObservation.model_version == key.model_version,
                DriftObservation.head == key.head,
            )
            .order_by(DriftObservation.id.desc())
            .limit(size)
        )
    )


def compare(reference: DriftReference, rows: Sequence[DriftObservation]) -> list[FeatureDrift]:
    """Every feature the reference has, against the window's rows."""
    current: dict[str, list[float]] = {
        INTENSITY_MEAN: [r.intensity_mean for r in rows],
        INTENSITY_STD: [r.intensity_std for r in rows],
        SIZE: [float(r.size) for r in rows],
        SCORE: [r.score for r in rows],
    }
    out = []
    for feature, ref_values in reference.numeric.items():
        values = current.get(feature)
        if values is None and feature.startswith("p:"):
            label = feature[2:]
            values = [r.probabilities[label] for r in rows if label in r.probabilities]
        if values and ref_values:
            out.append(numeric_drift(feature, ref_values, values))
    # Images whose header names no view are not counted: a PACS that never sends View
    # Position is not a drift.
    views = [r.view for r in rows if r.view]
    if VIEW in reference.categorical and views:
        out.append(categorical_drift(VIEW, reference.categorical[VIEW], views))
    return out


@dataclass(frozen=True)
class CheckOutcome:
    n: int
    drifts: list[FeatureDrift]
    raised: list[str]  # features that crossed into alarm in this check
    cleared: list[str]


def check(
    session: Session,
    key: ModelKey,
    reference: DriftReference,
    settings: DriftSettings,
    now: dt.datetime,
) -> CheckOutcome:
    """Compare the window with the reference, store the figures, and audit the features
    that crossed the alarm threshold in this check (one event for all of them)."""
    rows = window(session, key, settings.window)
    drifts = compare(reference, rows)
    states = {
        s.feature: s
        for s in session.scalars(
            select(DriftState).where(
                DriftState.model_name == key.model_name,
                DriftState.model_version == key.model_version,
                DriftState.head == key.head,
            )
        )
    }
    judged = len(rows) >= settings.min_images
    raised, cleared = [], []
    for d in drifts:
        state = states.get(d.feature)
        if state is None:
            state = DriftState(
                model_name=key.model_name,
                model_version=key.model_version,
                head=key.head,
                feature=d.feature,
                alarmed=False,
            )
            session.add(state)
        was = bool(state.alarmed)
        if not was and judged and d.psi >= settings.psi_alarm:
            state.alarmed, state.alarmed_since = True, now
            raised.append(d.feature)
        elif was and d.psi < settings.psi_clear:
            state.alarmed, state.alarmed_since = False, None
            cleared.append(d.feature)
        state.n, state.psi, state.ks, state.updated_at = len(rows), d.psi, d.ks, now
        state.histogram = {"bins": d.bins, "reference": d.reference, "current": d.current}
    if raised:
        by_feature = {d.feature: d for d in drifts}
        add_audit(
            session,
            AuditEventName.DRIFT_ALARM,
            outcome="failure",  # the model works outside what it was validated on
            model=key.model_name,
            version=key.model_version,
            head=key.head,
            window=len(rows),
            features={
                f: {"psi": round(by_feature[f].psi, 4), "ks": by_feature[f].ks} for f in raised
            },
        )
        log.warning(
            "drift.alarm",
            model=key.model_name,
            version=key.model_version,
            head=key.head,
            features=raised,
            window=len(rows),
        )
    if cleared:
        log.info(
            "drift.cleared",
            model=key.model_name,
            version=key.model_version,
            head=key.head,
            features=cleared,
        )
    return CheckOutcome(len(rows), drifts, raised, cleared)


class DriftMonitor:
    """The worker's side: the references of the artifacts it runs, read once each, and the
    check after each report, in a transaction of its own (a failed check never fails the
    analysis: the report is already recorded)."""

    def __init__(
        self,
        settings: DriftSettings,
        database: Database,
        clock: Callable[[], dt.datetime] = utcnow,
    ):
        self.settings = settings
        self.database = database
        self.clock = clock
        self._references: dict[Path, DriftReference | None] = {}

    def reference(self, artifact_dir: Path) -> DriftReference | None:
        if artifact_dir not in self._references:
            try:
                self._references[artifact_dir] = load_reference(artifact_dir)
            except (OSError, ValueError, KeyError) as exc:
                log.error("drift.reference_unreadable", path=str(artifact_dir), error=str(exc))
                self._references[artifact_dir] = None
        return self._references[artifact_dir]

    def after_report(self, key: ModelKey, artifact_dir: Path) -> CheckOutcome | None:
        reference = self.reference(artifact_dir)
        if not self.settings.enabled or reference is None:
            return None
        try:
            with self.database.session() as session:
                return check(session, key, reference, self.settings, self.clock())
        except SQLAlchemyError as exc:
            # Two workers creating the same state row at once, or the database away: the
            # next report checks again.
            log.warning("drift.check_failed", model=key.model_name, error=repr(exc))
            return None
