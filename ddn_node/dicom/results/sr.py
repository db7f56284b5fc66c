"""The findings as a Comprehensive 3D SR with TID 1500 Measurement Report as its root.

Every measurement group has image geometry, so viewers that draw TID 1500 (OHIF draws
only groups with an SCOORD, and one group without breaks the whole document) show each
reported finding as a labelled outline on its radiograph; everything without geometry goes
where TID 1500 allows non-geometric content, the Qualitative Evaluations container.

Content tree (PS3.16 TID 1500, rows as numbered there)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")                 row 1
      HAS CONCEPT MOD  Language of Content Item and Descendants           row 2, TID 1204
      HAS OBS CONTEXT  Observer Type = Device, Device Observer UID (the   row 3, TID 1002/1004
                       model's Device UID), name, manufacturer
      HAS CONCEPT MOD  Procedure reported = (363679005, SCT,              row 4, CID 100
                       "Imaging procedure")
      CONTAINS         Image Library: every scored image                  row 5, TID 1600
      CONTAINS CONTAINER Imaging Measurements                             row 6
        CONTAINS CONTAINER Measurement Group "Whole image", one per       row 7, TID 1410
                       scored image: region = the image's border; NUM
                       Abnormality score, and a NUM per reported finding
                       without an outline (<label code> = probability %)
        CONTAINS CONTAINER Measurement Group, one per reported finding    row 7, TID 1410
                       x image with a heat map
          HAS OBS CONTEXT  Tracking Identifier = label, Tracking UID
          CONTAINS CODE    Finding = the label's code (model manifest)
          CONTAINS SCOORD  Image Region: closed POLYLINE around the half-
                           peak region of the heat map, or a small CIRCLE
                           around its peak when the region is a point
            SELECTED FROM  the source image
          HAS CONCEPT MOD  Algorithm Name / Version / Parameters          TID 4019
                           ("threshold=<t>": the operating point)
          CONTAINS NUM     <label code> = the probability on that image,  TID 1419
                           in % (viewers label the outline with it)
      CONTAINS CONTAINER Qualitative Evaluations                          row 12
        CONTAINS CODE  <label code> = Present | Absent   (every label but  row 13, CID 241
                       a normal class, e.g. notumor: it is no finding)
        CONTAINS CODE  Priority = STAT | HIGH | ROUTINE (99DDN)           row 13
        CONTAINS TEXT  Abnormality score = "91.0 %"                       row 14
        CONTAINS TEXT  <label code> = "<label>: probability 12.0 %,       row 14
                       threshold 40.0 %"                  (every label)
        CONTAINS TEXT  Algorithm Name, Algorithm Version                  row 14
        CONTAINS TEXT  Comment = "<label>: no heat map: <why>"            row 14
                       (a reported finding drawn on no image), or what to know
                       of a map drawn without localisation evidence
        CONTAINS TEXT  Comment = "NOT FOR DIAGNOSTIC USE ..."   (demo models)

Why this shape (checked with PixelMed's DicomSRValidator, dciodvfy and OHIF):

- Row 12 takes CODE (row 13) and TEXT (row 14) children only, no NUM, so the study-level
  numbers there are text; the per-image probability of a drawn finding is a NUM.
- "Procedure reported" is the CID 100 code that fits any projection radiograph; no CID
  100 release has a chest X-ray code. The study's own Procedure Code Sequence is still
  copied into the header.
- Probabilities are in percent (UCUM "%", CID 7181), which viewers print as "91.00 %"
  where the dimensionless unit "1" read "0.91 1".
- The Image Library and the Imaging Measurements container are always present, and the
  latter holds a group for each scored image (the whole image's): OHIF reads both without checking that
  they exist, and its SR viewport cannot open an SR without a measurement. highdicom's MeasurementReport refuses an
  empty Imaging Measurements container and has no way to list an image it cannot
  describe, so the root container is assembled here from highdicom's building blocks.

A study re-opened by a late instance gets a new SR whose Predecessor Documents Sequence
(PS3.3 C.17.2.1) points at the SR it supersedes. (The tests read SRs back with
``tests/support/sr_reader.py``.)
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    GraphicTypeValues,
    ImageContentItem,
    ImageRegion,
    LanguageOfContentItemAndDescendants,
    Measurement,
    ObservationContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    RelationshipTypeValues,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.templates import DEFAULT_LANGUAGE, ImageLibraryEntryDescriptors
from pydicom.dataset import Dataset

from ddn_node.dicom.results import codes as C
from ddn_node.dicom.results.content import (
    NOT_FOR_DIAGNOSTIC_USE,
    charsets_of,
    copy_patient_and_study,
    fit_text,
    make_uid,
)
from ddn_node.dicom.results.equipment import algorithm_equipment, device_observer, general_equipment
from ddn_node.dicom.results.region import Region, densified, for_viewers, heatmap_region
from ddn_node.model.types import Code, ImagePrediction, LabelSpec, StudyPrediction
from ddn_node.vocabulary import Priority

THRESHOLD_PARAMETER = "threshold="
NO_HEAT_MAP = "no heat map"
NO_MAP_MADE = "none was made"
IMAGE_LEVEL = "Whole image"


@dataclass(frozen=True)
class SRReference:
    """An earlier SR of the same study that a new SR supersedes (PS3.3 C.17.2.1)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SRReference:
        return cls(
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
        )

    def as_dataset(self) -> Dataset:
        ds = Dataset()
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.StudyInstanceUID = self.study_instance_uid
        return ds


def sr_series_description(is_demo: bool) -> str:
    text = "DDN AI findings (SR)"
    return f"{text} - {NOT_FOR_DIAGNOSTIC_USE}" if is_demo else text


def percent(value: float) -> str:
    """A probability or score as people read it: ``0.912`` -> ``"91.2 %"``."""
    return f"{100.0 * value:.1f} %"


def build_sr(
    sources: Sequence[Dataset],
    headers: Sequence[Dataset],
    prediction: StudyPrediction,
    priority: Priority,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    predecessor: SRReference | None = None,
    uid_seed: str | None = None,
    now: datetime.datetime | None = None,
) -> Comprehensive3DSR:
    """Build the TID 1500 SR of one analysis.

    Args:
        sources: the scored source images (headers suffice); patient and study attributes
            are copied from the first.
        headers: :func:`~.content.reference_header` of each source, in the same order.
        prediction: the model output; every label in ``prediction.labels`` must have a
            study-level probability. A reported finding is drawn on each image that has a
            heat map for it (``prediction.images[*].heatmaps``); one drawn nowhere is listed
            with ``prediction.heatmap_notes[label]`` saying why.
        priority: the study's triage class.
        predecessor: the SR this one supersedes, if the study was analysed before.
        uid_seed: makes Tracking Unique Identifiers reproducible (see ``make_uid``).
    """
    algorithm = prediction.algorithm
    charsets = charsets_of(sources[0])
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    unknown = [i.sop_instance_uid for i in prediction.images if i.sop_instance_uid not in by_uid]
    if unknown:
        raise ValueError(f"predictions for images that are not among the sources: {unknown}")
    scored = [img for img in prediction.images if img.sop_instance_uid in by_uid]
    scored_headers = [by_uid[img.sop_instance_uid] for img in scored] or list(headers)

    groups: list[PlanarROIMeasurementsAndQualitativeEvaluations] = []
    notes: list[TextContentItem] = []
    unmapped: list[LabelSpec] = []
    for spec in prediction.labels:
        if spec.name not in prediction.probabilities:
            raise ValueError(f"no study-level probability for label {spec.name!r}")
        if spec.name not in prediction.positive:
            # Below its threshold, or the head's normal class: no finding to outline.
            continue
        drawn = _finding_groups(spec, scored, by_uid, prediction, charsets, uid_seed)
        groups.extend(drawn)
        if not drawn:
            unmapped.append(spec)
            had_map = any(spec.name in img.heatmaps for img in scored)
            why = prediction.heatmap_notes.get(spec.name) or (
                "the heat map is empty" if had_map else NO_MAP_MADE
            )
            notes.append(_text(C.COMMENT, f"{spec.name}: {NO_HEAT_MAP}: {why}", charsets))
        elif spec.name in prediction.heatmap_caveats:
            notes.append(
                _text(
                    C.COMMENT,
                    f"{spec.name}: heat map {prediction.heatmap_caveats[spec.name]}",
                    charsets,
                )
            )

    image_groups = [
        _image_group(img, by_uid[img.sop_instance_uid], unmapped, prediction, charsets, uid_seed)
        for img in scored
    ]
    root = _measurement_report(
        observation_context=ObservationContext(observer_device_context=device_observer(algorithm)),
        groups=[*image_groups, *groups],
        evaluations=[*_evaluations(prediction, priority, charsets), *notes],
        library=scored_headers,
    )
    equipment = general_equipment(algorithm)
    sr = Comprehensive3DSR(
        evidence=list(headers),
        content=root,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=equipment.manufacturer,
        manufacturer_model_name=equipment.manufacturer_model_name,
        software_versions=equipment.software_versions,
        device_serial_number=equipment.device_serial_number,
        # All labels of the model are reported: the content is complete. The report is
        # not verified by a person, so it stays PRELIMINARY and UNVERIFIED (C.17.2).
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor.as_dataset()] if predecessor is not None else None,
        contributing_equipment=[algorithm_equipment(algorithm, now)],
        series_description=fit_text(sr_series_description(algorithm.is_demo), 64, charsets),
        coding_schemes=[C.ddn_coding_scheme()],
        specific_character_set=None,  # set with the patient attributes, see content.py
    )
    copy_patient_and_study(sr, sources[0])
    return sr


def _image_group(
    image: ImagePrediction,
    header: Dataset,
    unmapped: Sequence[LabelSpec],
    prediction: StudyPrediction,
    charsets: list[str],
    uid_seed: str | None,
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """What the model said of the whole image: a group whose region is the image's border,
    with the abnormality score and each reported finding that has no outline.

    A viewer shows it as a labelled frame around the radiograph, so that the score and the
    findings without a heat map are seen where the image is read; and an SR always has a
    measurement group with geometry (OHIF's SR viewport cannot open one without).
    """
    rows, columns = int(header.Rows), int(header.Columns)
    border = np.array(
        [
            [0.5, 0.5],
            [columns - 0.5, 0.5],
            [columns - 0.5, rows - 0.5],
            [0.5, rows - 0.5],
            [0.5, 0.5],
        ],
        dtype=np.float32,
    )
    points = densified(border)
    uid = str(header.SOPInstanceUID)
    measurements = [
        Measurement(
            name=C.coded(C.ABNORMALITY_SCORE),
            value=round(100.0 * float(prediction.abnormality_score), 1),
            unit=C.coded(C.UNIT_PERCENT),
        )
    ]
    measurements += [
        Measurement(
            name=C.coded(spec.code),
            value=round(
                100.0
                * float(image.probabilities.get(spec.name, prediction.probabilities[spec.name])),
                1,
            ),
            unit=C.coded(C.UNIT_PERCENT),
        )
        for spec in sorted(unmapped, key=lambda s: -float(prediction.probabilities[s.name]))
    ]
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=make_uid(uid_seed, "tracking", IMAGE_LEVEL, uid),
            identifier=fit_text(IMAGE_LEVEL, 64, charsets),
        ),
        referenced_region=ImageRegion(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=points,
            source_image=_source_image(header, image.frame),
        ),
        algorithm_id=AlgorithmIdentification(
            name=prediction.algorithm.name, version=prediction.algorithm.version
        ),
        measurements=measurements,
    )


def _finding_groups(
    spec: LabelSpec,
    scored: Sequence[ImagePrediction],
    by_uid: Mapping[str, Dataset],
    prediction: StudyPrediction,
    charsets: list[str],
    uid_seed: str | None,
) -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One planar ROI group per image that has a heat map for the finding."""
    out = []
    for img in scored:
        heatmap = img.heatmaps.get(spec.name)
        if heatmap is None:
            continue
        header = by_uid[img.sop_instance_uid]
        region = heatmap_region(heatmap, int(header.Rows), int(header.Columns))
        if region is None:
            continue
        probability = float(img.probabilities.get(spec.name, prediction.probabilities[spec.name]))
        out.append(
            _finding_group(
                spec, probability, region, header, prediction, charsets, uid_seed, img.frame
            )
        )
    return out


def _finding_group(
    spec: LabelSpec,
    probability: float,
    region: Region,
    header: Dataset,
    prediction: StudyPrediction,
    charsets: list[str],
    uid_seed: str | None,
    frame: int | None = None,
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    uid = str(header.SOPInstanceUID)
    # TID 4019 without Algorithm Manufacturer: PixelMed's TID 4019 has no such row, and
    # the manufacturer is in the observer context and the Contributing Equipment already.
    algorithm = AlgorithmIdentification(
        name=prediction.algorithm.name,
        version=prediction.algorithm.version,
        parameters=[f"{THRESHOLD_PARAMETER}{spec.threshold:g}"],
    )
    shape, points = for_viewers(region, int(header.Rows), int(header.Columns))
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=make_uid(uid_seed, "tracking", spec.name, uid),
            identifier=fit_text(spec.name, 64, charsets),
        ),
        referenced_region=ImageRegion(
            graphic_type=GraphicTypeValues(shape.value),
            graphic_data=points,
            source_image=_source_image(header, frame),
        ),
        finding_type=C.coded(spec.code),
        algorithm_id=algorithm,
        # The finding as the NUM's concept: viewers label an outline with its NUMs
        # ("Pneumothorax: 91.00 %"), so two findings on one image read apart.
        measurements=[
            Measurement(
                name=C.coded(spec.code),
                value=round(100.0 * probability, 1),
                unit=C.coded(C.UNIT_PERCENT),
            )
        ],
    )


def _evaluations(
    prediction: StudyPrediction, priority: Priority, charsets: list[str]
) -> list[CodeContentItem | TextContentItem]:
    """TID 1500 rows 13 and 14: every label present or absent, the priority, the score,
    each label's probability and operating point, the algorithm, the demo warning."""
    presence: list[CodeContentItem | TextContentItem] = []
    texts: list[CodeContentItem | TextContentItem] = []
    positive = set(prediction.positive)
    for spec in prediction.labels:
        probability = float(prediction.probabilities[spec.name])
        if spec.name in prediction.normal:
            # The head's normal class is no finding: "No tumour = Present" would read as a
            # diagnosis and "Absent" as a tumour. Its study probability is that of the
            # most abnormal image (model/inference.py study_probabilities).
            texts.append(
                _text(
                    spec.code,
                    f"{spec.name}: probability {percent(probability)} on the least normal "
                    "image (the normal class, not a finding)",
                    charsets,
                )
            )
            continue
        presence.append(_code(spec.code, C.PRESENT if spec.name in positive else C.ABSENT))
        texts.append(
            _text(
                spec.code,
                f"{spec.name}: probability {percent(probability)}, threshold {percent(spec.threshold)}",
                charsets,
            )
        )
    algorithm = prediction.algorithm
    out = [
        *presence,
        _code(C.PRIORITY, C.PRIORITY_CODES[priority]),
        _text(C.ABNORMALITY_SCORE, percent(float(prediction.abnormality_score)), charsets),
        *texts,
        _text(C.ALGORITHM_NAME, algorithm.name, charsets),
        _text(C.ALGORITHM_VERSION, algorithm.version, charsets),
    ]
    if algorithm.is_demo:
        out.append(
            _text(
                C.COMMENT,
                f"{NOT_FOR_DIAGNOSTIC_USE}: produced by the demonstration model {algorithm.name} "
                f"{algorithm.version}, which is not validated for clinical use.",
                charsets,
            )
        )
    return out


def _measurement_report(
    *,
    observation_context: ObservationContext,
    groups: Sequence[PlanarROIMeasurementsAndQualitativeEvaluations],
    evaluations: Sequence[CodeContentItem | TextContentItem],
    library: Sequence[Dataset],
) -> ContainerContentItem:
    """The TID 1500 root container, rows 1-6 and 12 (see the module docstring)."""
    root = ContainerContentItem(name=C.coded(C.TITLE_MEASUREMENT_REPORT), template_id="1500")
    content = ContentSequence()
    content.extend(LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    content.extend(observation_context)
    content.append(
        CodeContentItem(
            name=C.coded(C.PROCEDURE_REPORTED),
            value=C.coded(C.PROCEDURE_IMAGING),
            relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    content.append(_image_library(library))
    measurements = ContainerContentItem(
        name=C.coded(C.IMAGING_MEASUREMENTS), relationship_type=RelationshipTypeValues.CONTAINS
    )
    if groups:
        measurements.ContentSequence = ContentSequence()
        for group in groups:
            measurements.ContentSequence.extend(group)
    content.append(measurements)
    container = ContainerContentItem(
        name=C.coded(C.QUALITATIVE_EVALUATIONS), relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = ContentSequence(list(evaluations))
    content.append(container)
    root.ContentSequence = content
    return root


def _image_library(headers: Sequence[Dataset]) -> ContainerContentItem:
    """TID 1600 with one Image Library Group holding every scored image (TID 1601).

    highdicom's ImageLibrary raises for a header that lacks what its descriptors read
    (Patient Orientation and Imager Pixel Spacing of a projection image, Modality ...),
    which real CR and SC headers often do; TID 1601 makes the descriptors (TID 1602)
    optional, so such an image is listed without them.
    """
    library = ContainerContentItem(
        name=C.coded(C.IMAGE_LIBRARY), relationship_type=RelationshipTypeValues.CONTAINS
    )
    group = ContainerContentItem(
        name=C.coded(C.IMAGE_LIBRARY_GROUP), relationship_type=RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = ContentSequence()
    for header in headers:
        item = ImageContentItem(
            name=C.coded(C.SOURCE),
            referenced_sop_class_uid=str(header.SOPClassUID),
            referenced_sop_instance_uid=str(header.SOPInstanceUID),
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
        descriptors = _descriptors(header)
        if descriptors is not None:
            item.ContentSequence = ContentSequence()
            item.ContentSequence.extend(descriptors)
        group.ContentSequence.append(item)
    library.ContentSequence = ContentSequence([group])
    return library


def _descriptors(header: Dataset) -> ImageLibraryEntryDescriptors | None:
    if "Rows" not in header or "Columns" not in header:
        return None
    try:
        return ImageLibraryEntryDescriptors(header)
    except (ValueError, KeyError, AttributeError, TypeError):
        return None


def _source_image(header: Dataset, frame: int | None) -> SourceImageForRegion:
    """The image a region lies on; of a multi-frame object, its frame (PS3.3 C.18.3.1.1:
    a region on a multi-frame image names the frame it is drawn on)."""
    return SourceImageForRegion(
        str(header.SOPClassUID),
        str(header.SOPInstanceUID),
        referenced_frame_numbers=[frame] if frame is not None else None,
    )


def _code(name: Code, value: Code) -> CodeContentItem:
    return CodeContentItem(
        name=C.coded(name), value=C.coded(value), relationship_type=RelationshipTypeValues.CONTAINS
    )


def _text(name: Code, value: str, charsets: list[str]) -> TextContentItem:
    # TEXT is UT; 1024 characters is far more than any of ours needs.
    return TextContentItem(
        name=C.coded(name),
        value=fit_text(value, 1024, charsets),
        relationship_type=RelationshipTypeValues.CONTAINS,
    )


__all__ = [
    "NO_HEAT_MAP",
    "THRESHOLD_PARAMETER",
    "SRReference",
    "build_sr",
    "percent",
    "sr_series_description",
]
