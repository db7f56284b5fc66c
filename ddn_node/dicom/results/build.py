"""All result objects of one analysis: the SR, and per heat map a Parametric Map and an SC.

Series layout in the source study (new series, numbered high so they sort after the
acquisition series in a viewer):

- ``series_numbers.sr`` (9001): the SR, "DDN AI findings (SR)";
- ``series_numbers.overlay`` (9002): every Secondary Capture overlay, one instance per
  (source image, positive label), "DDN heat map overlay (SC)";
- ``series_numbers.parametric_map_first`` + i (9003, 9004, ...): one Parametric Map series
  per positive label i (in the model's label order), one instance per source image,
  "DDN heat map <label> (PM)". One series per label because a Parametric Map series
  holds one kind of quantity, and a viewer then shows one label's maps together.

Demonstration models add " - NOT FOR DIAGNOSTIC USE" to every Series Description.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from ddn_node.dicom.results.content import check_sources, make_uid, reference_header
from ddn_node.dicom.results.overlay import MAX_SIDE, build_overlay, fit_display
from ddn_node.dicom.results.pmap import build_parametric_map
from ddn_node.dicom.results.sr import SRReference, build_sr
from ddn_node.model.types import StudyPrediction
from ddn_node.vocabulary import TRIAGE_PRIORITIES, Priority, ResultKind


@dataclass(frozen=True)
class SeriesNumbers:
    """Series Numbers (0020,0011) of the result series."""

    sr: int = 9001
    overlay: int = 9002
    parametric_map_first: int = 9003


@dataclass
class ResultObjects:
    """What :func:`build_results` returns; every dataset has its ``file_meta`` set."""

    sr: Dataset
    parametric_maps: list[Dataset] = field(default_factory=list)
    overlays: list[Dataset] = field(default_factory=list)
    # SOP Instance UID -> label name, for the maps and overlays (the source image of each
    # is in its Source Image Sequence).
    parametric_map_labels: dict[str, str] = field(default_factory=dict)
    overlay_labels: dict[str, str] = field(default_factory=dict)

    @property
    def sr_reference(self) -> SRReference:
        """How a later, superseding SR refers to this one."""
        return SRReference.from_dataset(self.sr)

    def all(self) -> list[tuple[ResultKind, Dataset]]:
        """Every object with its kind, SR first (the order to deliver them in)."""
        return [
            (ResultKind.SR, self.sr),
            *((ResultKind.PM, ds) for ds in self.parametric_maps),
            *((ResultKind.SC, ds) for ds in self.overlays),
        ]


def build_results(
    sources: Sequence[Dataset],
    prediction: StudyPrediction,
    priority: Priority | str,
    display_images: Mapping[str, np.ndarray],
    predecessor: SRReference | None = None,
    series_numbers: SeriesNumbers = SeriesNumbers(),
    *,
    uid_seed: str | None = None,
    max_overlay_side: int = MAX_SIDE,
    now: datetime.datetime | None = None,
) -> ResultObjects:
    """Build the SR, Parametric Maps and Secondary Captures of one analysis.

    The same as :func:`build_sr_result` followed by :func:`add_heat_map_objects`; the
    worker calls the two separately so the SR can leave before the heat maps are drawn.

    Args:
        sources: the scored source images; headers are enough (pixel data may be absent).
            All must belong to one study; patient and study attributes come from the first.
        prediction: the model output. A Parametric Map and an overlay are made for every
            heat map in ``prediction.images[*].heatmaps`` (the labels at or above their
            threshold on that image).
        priority: ``"STAT"``, ``"HIGH"`` or ``"ROUTINE"``.
        display_images: SOP Instance UID -> float HxW grayscale in [0, 1] (MONOCHROME2
            sense) of each source that has a heat map; the overlays are drawn on it.
        predecessor: the earlier SR of the same study that the new SR supersedes.
        series_numbers: Series Numbers of the result series.
        uid_seed: when given (for example ``"result:<id>"``), all UIDs are derived from it,
            so rebuilding the same analysis gives the same UIDs; otherwise they are random.
        max_overlay_side: cap on the longest side of the overlays, in pixels.
        now: the Contribution DateTime of the algorithm (default: the current time).

    Raises:
        ValueError: sources from several studies or without UIDs, an unknown priority,
            a prediction for an image that is not a source, a heat map without a display
            image, or a predecessor from another study.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    # Without a seed, a random one: UIDs differ between builds but stay consistent within
    # this one (all maps of a label share one series UID).
    uid_seed = uid_seed if uid_seed is not None else make_uid(None)
    results = build_sr_result(
        sources, prediction, priority, predecessor, series_numbers, uid_seed=uid_seed, now=now
    )
    add_heat_map_objects(
        results,
        sources,
        prediction,
        display_images,
        series_numbers,
        uid_seed=uid_seed,
        max_overlay_side=max_overlay_side,
        now=now,
    )
    return results


def build_sr_result(
    sources: Sequence[Dataset],
    prediction: StudyPrediction,
    priority: Priority | str,
    predecessor: SRReference | None = None,
    series_numbers: SeriesNumbers = SeriesNumbers(),
    *,
    uid_seed: str,
    now: datetime.datetime,
) -> ResultObjects:
    """The first phase of :func:`build_results`: the SR alone, in a new ResultObjects.

    The SR refers to no heat-map object, so it is complete without them; its UIDs come
    from ``uid_seed`` like theirs. Raises ``ValueError`` as :func:`build_results` does.
    """
    check_sources(sources)
    triage = next((p for p in TRIAGE_PRIORITIES if p.value == str(priority).upper()), None)
    if triage is None:
        # A study without a decision has no SR: "not analysed" is never reported.
        raise ValueError(
            f"priority must be one of {[p.value for p in TRIAGE_PRIORITIES]}, got {priority!r}"
        )
    study_uid = str(sources[0].StudyInstanceUID)
    if predecessor is not None and predecessor.study_instance_uid != study_uid:
        raise ValueError("the predecessor SR belongs to another study")
    headers = [reference_header(ds) for ds in sources]
    sr = build_sr(
        sources,
        headers,
        prediction,
        triage,
        series_instance_uid=make_uid(uid_seed, "sr-series"),
        sop_instance_uid=make_uid(uid_seed, "sr"),
        series_number=series_numbers.sr,
        predecessor=predecessor,
        uid_seed=uid_seed,
        now=now,
    )
    return ResultObjects(sr=sr)


def add_heat_map_objects(
    results: ResultObjects,
    sources: Sequence[Dataset],
    prediction: StudyPrediction,
    display_images: Mapping[str, np.ndarray],
    series_numbers: SeriesNumbers = SeriesNumbers(),
    *,
    uid_seed: str,
    max_overlay_side: int = MAX_SIDE,
    now: datetime.datetime,
) -> None:
    """The second phase of :func:`build_results`: a Parametric Map and an overlay per
    heat map, appended to ``results``. Pass the ``uid_seed`` the SR was built with."""
    check_sources(sources)
    headers = [reference_header(ds) for ds in sources]
    source_by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    header_by_uid = {str(h.SOPInstanceUID): h for h in headers}

    specs = {spec.name: spec for spec in prediction.labels}
    mapped_labels = [
        spec.name
        for spec in prediction.labels
        if any(spec.name in image.heatmaps for image in prediction.images)
    ]
    unknown = {name for image in prediction.images for name in image.heatmaps if name not in specs}
    if unknown:
        raise ValueError(f"heat maps for labels the model does not have: {sorted(unknown)}")

    overlay_series = make_uid(uid_seed, "sc-series")
    pm_instance_numbers = dict.fromkeys(mapped_labels, 0)
    for image in prediction.images:
        uid = image.sop_instance_uid
        fitted: np.ndarray | None = None
        for name in (n for n in mapped_labels if n in image.heatmaps):
            heatmap = image.heatmaps[name]
            probability = float(image.probabilities.get(name, prediction.probabilities[name]))
            index = mapped_labels.index(name)
            pm_instance_numbers[name] += 1
            pm = build_parametric_map(
                source_by_uid[uid],
                header_by_uid[uid],
                heatmap,
                label=name,
                probability=probability,
                algorithm=prediction.algorithm,
                series_instance_uid=make_uid(uid_seed, "pm-series", name),
                sop_instance_uid=make_uid(uid_seed, "pm", uid, name),
                series_number=series_numbers.parametric_map_first + index,
                instance_number=pm_instance_numbers[name],
                now=now,
            )
            results.parametric_maps.append(pm)
            results.parametric_map_labels[str(pm.SOPInstanceUID)] = name
            if fitted is None:
                display = display_images.get(uid)
                if display is None:
                    raise ValueError(f"no display image for source {uid}, which has a heat map")
                fitted = fit_display(display, max_overlay_side)
            sc = build_overlay(
                source_by_uid[uid],
                header_by_uid[uid],
                fitted,
                heatmap,
                label=name,
                probability=probability,
                threshold=specs[name].threshold,
                algorithm=prediction.algorithm,
                series_instance_uid=overlay_series,
                sop_instance_uid=make_uid(uid_seed, "sc", uid, name),
                series_number=series_numbers.overlay,
                instance_number=len(results.overlays) + 1,
                max_side=max_overlay_side,
                now=now,
            )
            results.overlays.append(sc)
            results.overlay_labels[str(sc.SOPInstanceUID)] = name
