"""All result objects of one analysis: the SR, and per source image at most one Parametric
Map and one Secondary Capture.

Series layout in the source study (new series, numbered high so they sort after the
acquisition series in a viewer):

- ``series_numbers.sr`` (9001): the SR, "DDN AI findings (SR)";
- ``series_numbers.overlay`` (9002): the Secondary Captures, one per source image with a
  reported finding, every finding of that image drawn in one picture;
- ``series_numbers.parametric_map`` + i (9003, 9004 ...): the Parametric Maps, one per
  source image with a heat map (a series of its own each), one frame per finding.

So each analysed image gets two objects at most, whatever the number of findings, plus
one SR per study. Demonstration models add
" - NOT FOR DIAGNOSTIC USE" to every Series Description.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from ddn_node.dicom.results.content import check_sources, make_uid, reference_header
from ddn_node.dicom.results.overlay import MAX_SIDE, DrawnFinding, build_overlay
from ddn_node.dicom.results.pmap import MapFrame, build_parametric_map
from ddn_node.dicom.results.region import heatmap_region
from ddn_node.dicom.results.sr import NO_HEAT_MAP, NO_MAP_MADE, SRReference, build_sr
from ddn_node.model.types import ImagePrediction, StudyPrediction
from ddn_node.vocabulary import TRIAGE_PRIORITIES, Priority, ResultKind


@dataclass(frozen=True)
class SeriesNumbers:
    """Series Numbers (0020,0011) of the result series."""

    sr: int = 9001
    overlay: int = 9002
    parametric_map: int = 9003
    rejection: int = 9099


@dataclass
class ResultObjects:
    """What :func:`build_results` returns; every dataset has its ``file_meta`` set."""

    sr: Dataset
    parametric_maps: list[Dataset] = field(default_factory=list)
    overlays: list[Dataset] = field(default_factory=list)
    rejection: Dataset | None = None  # withdraws the results this analysis supersedes
    # SOP Instance UID of a map or an overlay -> the labels it shows, in model order (its
    # source image is in its Source Image Sequence).
    shows: dict[str, tuple[str, ...]] = field(default_factory=dict)

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
            *([(ResultKind.KO, self.rejection)] if self.rejection is not None else []),
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
    worker calls the two separately so the SR can leave before the other objects are made.

    Args:
        sources: the scored source images; headers are enough (pixel data may be absent).
            All must belong to one study; patient and study attributes come from the first.
        prediction: the model output. The heat maps in ``prediction.images[*].heatmaps``
            (the findings at or above their threshold whose maps carry evidence) are
            outlined in the SR, drawn in the overlays and stored in the Parametric Maps.
        priority: ``"STAT"``, ``"HIGH"`` or ``"ROUTINE"``.
        display_images: SOP Instance UID -> float HxW grayscale in [0, 1] (MONOCHROME2
            sense) of each source that gets an overlay; the overlays are drawn on it.
        predecessor: the earlier SR of the same study that the new SR supersedes.
        series_numbers: Series Numbers of the result series.
        uid_seed: when given (for example ``"result:<id>"``), all UIDs are derived from it,
            so rebuilding the same analysis gives the same UIDs; otherwise they are random.
        max_overlay_side: cap on the longest side of the overlays, in pixels.
        now: the Contribution DateTime of the algorithm (default: the current time).

    Raises:
        ValueError: sources from several studies or without UIDs, an unknown priority,
            a prediction for an image that is not a source, an overlay without a display
            image, or a predecessor from another study.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    # Without a seed, a random one: UIDs differ between builds but stay consistent within
    # this one (all maps share one series UID).
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

    The SR refers to no other result object, so it is complete without them; its UIDs
    come from ``uid_seed`` like theirs. Raises ``ValueError`` as :func:`build_results` does.
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
    sr = build_sr(
        sources,
        [reference_header(ds) for ds in sources],
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
    kinds: Sequence[ResultKind] = (ResultKind.PM, ResultKind.SC),
    source_bytes: Mapping[str, int] | None = None,
) -> None:
    """The second phase of :func:`build_results`: per source image a Parametric Map (when
    it has a heat map) and an overlay (when the study has a reported finding), appended to
    ``results``. Pass the ``uid_seed`` the SR was built with; ``kinds`` leaves out what no
    destination takes; ``source_bytes`` (SOP Instance UID -> the size the source was
    received in) bounds each overlay to about its source's size."""
    check_sources(sources)
    source_by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    names = [spec.name for spec in prediction.labels]
    unknown = {name for image in prediction.images for name in image.heatmaps if name not in names}
    if unknown:
        raise ValueError(f"heat maps for labels the model does not have: {sorted(unknown)}")
    reported = prediction.positive
    for image in prediction.images:
        source = source_by_uid[image.sop_instance_uid]
        header = reference_header(source)
        uid = image.sop_instance_uid
        mapped = [name for name in names if name in image.heatmaps]
        # A map of one frame of a multi-frame source would need that frame's plane
        # geometry (highdicom reads the source's functional groups, which real Enhanced
        # MR headers may lack): none is built; the SR outlines the frame, the overlay
        # draws it.
        if ResultKind.PM in kinds and mapped and image.frame is None:
            pm = build_parametric_map(
                source,
                header,
                [_frame(image, prediction, name) for name in mapped],
                algorithm=prediction.algorithm,
                # A series of its own per image: OHIF fuses a map with the first image of
                # the sources of the map's series.
                series_instance_uid=make_uid(uid_seed, "pm-series", uid),
                sop_instance_uid=make_uid(uid_seed, "pm", uid),
                series_number=series_numbers.parametric_map + len(results.parametric_maps),
                instance_number=len(results.parametric_maps) + 1,
                now=now,
            )
            results.parametric_maps.append(pm)
            results.shows[str(pm.SOPInstanceUID)] = tuple(mapped)
        if ResultKind.SC in kinds and reported:
            display = display_images.get(uid)
            if display is None:
                raise ValueError(f"no display image for source {uid}, which gets an overlay")
            sc = build_overlay(
                source,
                header,
                display,
                _drawn(image, prediction, header, names),
                algorithm=prediction.algorithm,
                series_instance_uid=make_uid(uid_seed, "sc-series"),
                sop_instance_uid=make_uid(uid_seed, "sc", uid),
                series_number=series_numbers.overlay,
                instance_number=len(results.overlays) + 1,
                max_side=max_overlay_side,
                max_bytes=(source_bytes or {}).get(uid),
                now=now,
            )
            results.overlays.append(sc)
            results.shows[str(sc.SOPInstanceUID)] = tuple(mapped)


def _frame(image: ImagePrediction, prediction: StudyPrediction, name: str) -> MapFrame:
    spec = next(s for s in prediction.labels if s.name == name)
    probability = float(image.probabilities.get(name, prediction.probabilities[name]))
    return MapFrame(
        label=name, code=spec.code, probability=probability, heatmap=image.heatmaps[name]
    )


def _drawn(
    image: ImagePrediction, prediction: StudyPrediction, header: Dataset, names: Sequence[str]
) -> list[DrawnFinding]:
    """The study's reported findings as this image's overlay shows them: outlined where
    the image has a heat map, listed with the reason where it has none."""
    out = []
    for spec in prediction.labels:
        if spec.name not in prediction.positive:
            continue
        heatmap = image.heatmaps.get(spec.name)
        region = (
            heatmap_region(heatmap, int(header.Rows), int(header.Columns))
            if heatmap is not None
            else None
        )
        if heatmap is not None:
            note = "" if region is not None else f"{NO_HEAT_MAP}: the heat map is empty"
        elif any(spec.name in other.heatmaps for other in prediction.images):
            note = "outlined on another image"
        else:
            note = f"{NO_HEAT_MAP}: {prediction.heatmap_notes.get(spec.name, NO_MAP_MADE)}"
        probability = float(image.probabilities.get(spec.name, prediction.probabilities[spec.name]))
        out.append(
            DrawnFinding(
                spec.name, probability, spec.threshold, names.index(spec.name), region, note
            )
        )
    return out
