"""The TID 1500 SR: what a reader (a viewer, the PACS, a person) finds in it.

Each reported finding is a planar ROI group (TID 1410) per image that has a heat map for
it, outlined around the map's half-peak region; each scored image has a "Whole image"
group framing it, with the abnormality score and the reported findings that have no
outline; everything else (presence of every label, priority, score, per-label
probabilities, the algorithm, why a finding has no outline) is in the Qualitative
Evaluations container. No group is without geometry. Read back with ``tests/support/sr_reader.py``
and, as a viewer would, with highdicom's own SR parser.
"""

from __future__ import annotations

import datetime
import logging

import highdicom as hd
import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from results_factories import (
    FINDING,
    LABELS,
    SPEC,
    TRACKING_ID,
    WHOLE_IMAGE,
    blob,
    blob_centre,
    child,
    display_for,
    evaluations,
    finding_groups,
    half_peak_area,
    is_concept,
    measurement_groups,
    prediction_for,
    roundtrip,
    same_study,
    shoelace,
    synthetic_source,
    texts,
    walk,
    whole_image_groups,
)
from support.sr_reader import read_sr

from ddn_node.dicom.results import SRReference, build_results, build_sr_result
from ddn_node.dicom.results import codes as C
from ddn_node.dicom.results.region import Region, Shape, for_viewers
from ddn_node.model.types import Code, LabelSpec
from ddn_node.vocabulary import TRIAGE_PRIORITIES, Priority

PROBS = {"Pneumothorax": 0.87, "Effusion": 0.4, "Nodule": 0.05}  # Effusion == threshold
NEGATIVE = {"Pneumothorax": 0.12, "Effusion": 0.1, "Nodule": 0.05}
TRACKING_UID = Code("112040", "DCM", "Tracking Unique Identifier")
ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")
NOW = datetime.datetime(2026, 11, 27, 9, 30, tzinfo=datetime.UTC)


def _build(sources, probabilities, **kwargs):
    prediction = prediction_for(sources, probabilities, demo=kwargs.pop("demo", True))
    prediction.heatmap_notes.update(kwargs.pop("notes", {}))
    prediction.heatmap_caveats.update(kwargs.pop("caveats", {}))
    for label in kwargs.pop("drop_maps", ()):
        for image in prediction.images:
            image.heatmaps.pop(label, None)
    kwargs.setdefault("priority", "STAT")
    results = build_results(sources, prediction, display_images=display_for(sources), **kwargs)
    return prediction, results


def _sr_of(source, heatmap, label="Pneumothorax"):
    """The SR of one source whose only finding has ``heatmap``."""
    prediction = prediction_for([source], [{"Pneumothorax": 0.9, "Effusion": 0.1, "Nodule": 0.1}])
    prediction.images[0].heatmaps = {label: heatmap}
    return build_sr_result([source], prediction, "HIGH", uid_seed="sr", now=NOW).sr


def _scoord(group):
    (scoord,) = [item for item in group.ContentSequence if item.ValueType == "SCOORD"]
    data = [float(v) for v in scoord.GraphicData]
    return str(scoord.GraphicType), np.array(list(zip(data[0::2], data[1::2], strict=True)))


# --- content read back ----------------------------------------------------------------------


def test_sr_content_reads_back_equal_to_the_inputs(tmp_path) -> None:
    sources = same_study(2)
    per_image = [PROBS, {"Pneumothorax": 0.2, "Effusion": 0.1, "Nodule": 0.01}]
    prediction, results = _build(sources, per_image, priority="HIGH")
    _, stored = roundtrip(results.sr, tmp_path, "sr")
    first = str(sources[0].SOPInstanceUID)

    content = read_sr(stored)
    assert list(content.findings) == [spec.name for spec in LABELS]
    for spec in LABELS:
        finding = content.findings[spec.name]
        assert finding.code == spec.code
        # Study level, as the text gives it: one decimal of a percent.
        assert finding.probability == pytest.approx(prediction.probabilities[spec.name], abs=5e-4)
        assert finding.threshold == pytest.approx(spec.threshold)
        assert finding.present is (prediction.probabilities[spec.name] >= spec.threshold)
    # A probability exactly at the threshold is "present" (LabelSpec: "at or above").
    assert content.findings["Effusion"].present is True
    assert content.positive == ["Pneumothorax", "Effusion"]
    # Outlined where the image has a heat map: both findings on the first image only.
    assert content.findings["Pneumothorax"].image_probabilities == pytest.approx({first: 0.87})
    assert content.findings["Effusion"].image_probabilities == pytest.approx({first: 0.4})
    assert content.findings["Nodule"].regions == ()
    # Plus the "Whole image" group of each scored image, with the study's score.
    assert content.groups == 2 + 2
    assert content.whole_image == {
        str(s.SOPInstanceUID): {"Abnormality score": pytest.approx(0.87)} for s in sources
    }
    assert content.notes == {}
    assert content.abnormality_score == pytest.approx(prediction.abnormality_score, abs=5e-4)
    assert content.priority is Priority.HIGH
    assert content.algorithm_name == prediction.algorithm.name
    assert content.algorithm_version == prediction.algorithm.version
    assert content.device_observer_uid == prediction.algorithm.device_uid
    assert content.procedure == Code("363679005", "SCT", "Imaging procedure")
    assert set(content.evidence) == {str(s.SOPInstanceUID) for s in sources}
    assert content.library == tuple(str(s.SOPInstanceUID) for s in sources)
    assert content.predecessors == ()


def test_highdicom_reads_one_planar_roi_per_finding_and_image() -> None:
    """What a TID 1500 viewer gets: the whole image framed with the score, and outlines
    labelled with their finding in percent."""
    sources = same_study(2)
    per_image = [PROBS, {"Pneumothorax": 0.7, "Effusion": 0.1, "Nodule": 0.01}]
    _, results = _build(sources, per_image)
    document = hd.sr.Comprehensive3DSR.from_dataset(results.sr)
    groups = document.content.get_planar_roi_measurement_groups()
    got = []
    for group in groups:
        got.append(
            (
                str(group.tracking_identifier),
                group.roi.graphic_type.value,
                str(group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
                [(m.name.value, m.value, m.unit.value) for m in group.get_measurements()],
            )
        )
    uid = [str(s.SOPInstanceUID) for s in sources]
    score = [("ABN-SCORE", 87.0, "%")]
    assert got == [
        (WHOLE_IMAGE, "POLYLINE", uid[0], score),
        (WHOLE_IMAGE, "POLYLINE", uid[1], score),
        ("Pneumothorax", "POLYLINE", uid[0], [("36118008", 87.0, "%")]),
        ("Pneumothorax", "POLYLINE", uid[1], [("36118008", 70.0, "%")]),
        ("Effusion", "POLYLINE", uid[0], [("60046008", 40.0, "%")]),
    ]


# --- measurement groups ------------------------------------------------------------------------


def test_every_group_has_geometry_on_a_source_image() -> None:
    """No measurement group without geometry: each has exactly one SCOORD, SELECTED FROM
    a source image, and nothing else anywhere in the document is a measurement group."""
    sources = same_study(2)
    per_image = [PROBS, {"Pneumothorax": 0.6, "Effusion": 0.5, "Nodule": 0.4}]
    _, results = _build(sources, per_image)
    groups = measurement_groups(results.sr)
    assert len(groups) == 2 + 5  # the whole of each image, each finding on each image
    assert len(finding_groups(results.sr)) == 5
    uids = {str(s.SOPInstanceUID): str(s.SOPClassUID) for s in sources}
    for group in groups:
        assert group.ValueType == "CONTAINER"
        assert [t.TemplateIdentifier for t in group.ContentTemplateSequence] == ["1410"]
        scoords = [item for item in walk(group) if item.ValueType == "SCOORD"]
        assert len(scoords) == 1
        (scoord,) = scoords
        assert scoord.RelationshipType == "CONTAINS" and is_concept(
            scoord, Code("111030", "DCM", "Image Region")
        )
        (selected,) = scoord.ContentSequence
        assert (selected.RelationshipType, selected.ValueType) == ("SELECTED FROM", "IMAGE")
        ref = selected.ReferencedSOPSequence[0]
        assert uids[str(ref.ReferencedSOPInstanceUID)] == ref.ReferencedSOPClassUID
    # Measurement Group containers appear under Imaging Measurements only (no TID 1501).
    everywhere = [
        item
        for item in walk(results.sr)
        if item.ValueType == "CONTAINER" and is_concept(item, Code("125007", "DCM", "x"))
    ]
    assert len(everywhere) == len(groups)


def test_group_per_positive_label_and_image_with_a_map() -> None:
    sources = same_study(2)
    # Pneumothorax mapped on both images, Effusion on the first; Nodule is positive but
    # has no map anywhere (its evidence did not beat the baselines).
    per_image = [PROBS, {"Pneumothorax": 0.6, "Effusion": 0.1, "Nodule": 0.45}]
    why = "localisation evidence does not beat the baselines"
    _, results = _build(sources, per_image, notes={"Nodule": why}, drop_maps=["Nodule"])
    content = read_sr(results.sr)
    uid = [str(s.SOPInstanceUID) for s in sources]
    assert [
        (label, region.sop_instance_uid)
        for label, finding in content.findings.items()
        for region in finding.regions
    ] == [("Pneumothorax", uid[0]), ("Pneumothorax", uid[1]), ("Effusion", uid[0])]
    assert content.findings["Nodule"].present and content.findings["Nodule"].regions == ()
    assert content.notes == {"Nodule": f"no heat map: {why}"}
    assert f"Nodule: no heat map: {why}" in content.comments
    # ... and given on each image, in the frame around it, with its probability there.
    assert content.whole_image == {
        uid[0]: {"Abnormality score": pytest.approx(0.87), "Nodule": pytest.approx(0.05)},
        uid[1]: {"Abnormality score": pytest.approx(0.87), "Nodule": pytest.approx(0.45)},
    }
    # Tracking: the label is the identifier, one UID per (label, image).
    tracking = [
        (str(child(g, TRACKING_ID).TextValue), str(child(g, TRACKING_UID).UID))
        for g in measurement_groups(results.sr)
    ]
    assert [t[0] for t in tracking] == [
        WHOLE_IMAGE,
        WHOLE_IMAGE,
        "Pneumothorax",
        "Pneumothorax",
        "Effusion",
    ]
    assert len({t[1] for t in tracking}) == 5


def test_the_whole_image_group_frames_the_image() -> None:
    """Each scored image has a group whose region is its border: the score, and the
    findings that have no outline, are shown where the image is read."""
    sources = same_study(2, rows=120, columns=90)
    _, results = _build(sources, [PROBS, NEGATIVE], drop_maps=["Effusion"])
    groups = whole_image_groups(results.sr)
    assert len(groups) == 2
    for group, source in zip(groups, sources, strict=True):
        shape, points = _scoord(group)
        assert shape == "POLYLINE" and len(points) > 6
        np.testing.assert_array_equal(points[0], points[-1])
        np.testing.assert_allclose(points.min(axis=0), (0.5, 0.5))  # corner pixel centres
        np.testing.assert_allclose(points.max(axis=0), (89.5, 119.5))
        assert shoelace(points) == pytest.approx(89 * 119)
        (scoord,) = [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
        ref = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert not [i for i in group.ContentSequence if is_concept(i, FINDING)]
        nums = [
            (
                i.ConceptNameCodeSequence[0].CodeValue,
                float(i.MeasuredValueSequence[0].NumericValue),
                i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue,
            )
            for i in group.ContentSequence
            if i.ValueType == "NUM"
        ]
        # The score, then Effusion (reported, without a map), in percent.
        effusion = 40.0 if source is sources[0] else 10.0
        assert nums == [("ABN-SCORE", 87.0, "%"), ("60046008", effusion, "%")]


def test_a_reported_finding_whose_map_is_empty_is_listed_not_outlined() -> None:
    source = synthetic_source()
    sr = _sr_of(source, np.zeros((96, 80), np.float32))
    content = read_sr(sr)
    assert finding_groups(sr) == [] and content.groups == 1  # the whole image only
    assert content.whole_image[str(source.SOPInstanceUID)]["Pneumothorax"] == pytest.approx(0.9)
    assert content.notes == {"Pneumothorax": "no heat map: the heat map is empty"}


def test_num_is_the_finding_in_percent_with_its_operating_point() -> None:
    source = synthetic_source()
    _, results = _build([source], [{"Pneumothorax": 0.8762, "Effusion": 0.1, "Nodule": 0.1}])
    (group,) = finding_groups(results.sr)
    assert C.same_code(child(group, FINDING).ConceptCodeSequence[0], SPEC["Pneumothorax"].code)
    (num,) = [item for item in group.ContentSequence if item.ValueType == "NUM"]
    assert (num.RelationshipType, num.ConceptNameCodeSequence[0].CodeValue) == (
        "CONTAINS",
        "36118008",
    )
    assert num.ConceptNameCodeSequence[0].CodingSchemeDesignator == "SCT"
    measured = num.MeasuredValueSequence[0]
    assert float(measured.NumericValue) == pytest.approx(87.6)
    unit = measured.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("%", "UCUM")
    assert str(child(group, ALGORITHM_PARAMETERS).TextValue) == "threshold=0.5"


# --- the outline ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "columns"), [(96, 80), (600, 500), (1024, 1024)])
def test_outline_is_the_half_peak_region_around_the_peak(rows, columns) -> None:
    heatmap = blob(rows, columns, cx=0.3)  # Pneumothorax's place in prediction_for
    sr = _sr_of(synthetic_source(rows=rows, columns=columns), heatmap)
    (group,) = finding_groups(sr)
    shape, points = _scoord(group)
    assert shape == "POLYLINE"
    assert 6 < len(points) <= 129
    np.testing.assert_array_equal(points[0], points[-1])  # closed
    assert points[:, 0].min() >= 0 and points[:, 0].max() <= columns
    assert points[:, 1].min() >= 0 and points[:, 1].max() <= rows
    assert MplPath(points).contains_point(blob_centre(rows, columns, "Pneumothorax"))
    assert shoelace(points) == pytest.approx(half_peak_area(heatmap), rel=0.12)


def test_outline_of_a_coarse_grad_cam_grid_covers_the_whole_image() -> None:
    """A 7 x 7 map (Grad-CAM's own grid) is taken to cover the image: its hot cell is
    outlined where that cell lies on the source."""
    grid = np.zeros((7, 7), np.float32)
    grid[5, 1] = 1.0  # lower left
    sr = _sr_of(synthetic_source(rows=700, columns=560), grid)
    (group,) = finding_groups(sr)
    _, points = _scoord(group)
    cell_centre = (1.5 * 560 / 7, 5.5 * 700 / 7)
    assert MplPath(points).contains_point(cell_centre)
    assert points[:, 1].min() > 400 and points[:, 0].max() < 300


def test_a_point_region_becomes_a_small_circle_on_the_peak() -> None:
    heatmap = np.zeros((96, 80), np.float32)
    heatmap[30, 50] = 1.0
    sr = _sr_of(synthetic_source(), heatmap)
    (group,) = finding_groups(sr)
    shape, points = _scoord(group)
    assert shape == "CIRCLE" and len(points) == 2  # centre, then a point on the circle
    np.testing.assert_allclose(points[0], (50.5, 30.5))  # the centre of pixel (30, 50)
    radius = float(np.hypot(*(points[1] - points[0])))
    assert radius >= 4.0
    assert 0 <= points[1][0] <= 80 and 0 <= points[1][1] <= 96


def test_a_short_outline_is_densified_for_viewers() -> None:
    heatmap = np.zeros((96, 80), np.float32)
    heatmap[20:40, 30:50] = 1.0  # a 20 x 20 square: its outline simplifies to 4 corners
    sr = _sr_of(synthetic_source(), heatmap)
    (group,) = finding_groups(sr)
    shape, points = _scoord(group)
    assert shape == "POLYLINE" and len(points) > 6
    np.testing.assert_array_equal(points[0], points[-1])
    assert shoelace(points) == pytest.approx(400, rel=0.05)


def test_for_viewers_halves_edges_until_more_than_six_points() -> None:
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]], np.float32)
    shape, points = for_viewers(Region(Shape.POLYLINE, square, 100.0, (5, 5), 0.5), 100, 100)
    assert shape is Shape.POLYLINE and len(points) > 6
    np.testing.assert_array_equal(points[::2], square)  # the corners stay, in order
    assert shoelace(points) == pytest.approx(100.0)
    long_line = np.vstack([square[:-1]] * 2 + [square[:1]])  # 9 points: left alone
    _, same = for_viewers(Region(Shape.POLYLINE, long_line, 100.0, (5, 5), 0.5), 100, 100)
    np.testing.assert_array_equal(same, long_line)


# --- qualitative evaluations -------------------------------------------------------------------


def test_qualitative_evaluations_hold_everything_without_geometry() -> None:
    _, results = _build([synthetic_source()], [PROBS], priority="HIGH", demo=False)
    items = evaluations(results.sr)
    assert {item.ValueType for item in items} == {"CODE", "TEXT"}  # row 12: no NUM
    presence = {
        item.ConceptNameCodeSequence[0].CodeValue: item.ConceptCodeSequence[0].CodeValue
        for item in items
        if item.ValueType == "CODE" and not is_concept(item, C.PRIORITY)
    }
    assert presence == {"36118008": "52101004", "60046008": "52101004", "RID3875": "272519000"}
    assert texts(items, C.ABNORMALITY_SCORE) == ["87.0 %"]
    assert texts(items, SPEC["Pneumothorax"].code) == [
        "Pneumothorax: probability 87.0 %, threshold 50.0 %"
    ]
    assert texts(items, SPEC["Effusion"].code) == ["Effusion: probability 40.0 %, threshold 40.0 %"]
    assert texts(items, SPEC["Nodule"].code) == ["Nodule: probability 5.0 %, threshold 30.0 %"]
    assert texts(items, C.ALGORITHM_NAME) == ["DDN chest X-ray"]
    assert texts(items, C.ALGORITHM_VERSION) == ["2026.11.27-ddn-cxr-r1"]
    assert texts(items, C.COMMENT) == []
    assert all(item.RelationshipType == "CONTAINS" for item in items)


@pytest.mark.parametrize("priority", TRIAGE_PRIORITIES)
def test_every_priority_is_coded(priority: Priority) -> None:
    source = synthetic_source()
    _, results = _build([source], [PROBS], priority=priority.value.lower())
    assert read_sr(results.sr).priority is priority
    codes = [
        item.ConceptCodeSequence[0].CodeValue
        for item in evaluations(results.sr)
        if item.ValueType == "CODE" and is_concept(item, C.PRIORITY)
    ]
    assert codes == [C.PRIORITY_CODES[priority].value]
    # ... and nowhere in the measurement groups.
    assert not [
        item
        for g in measurement_groups(results.sr)
        for item in walk(g)
        if is_concept(item, C.PRIORITY)
    ]


def test_present_absent_codes_are_snomed() -> None:
    _, results = _build([synthetic_source()], [PROBS])
    values = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.ConceptCodeSequence[0]
        for item in evaluations(results.sr)
        if item.ValueType == "CODE"
        and item.ConceptNameCodeSequence[0].CodeValue in {s.code.value for s in LABELS}
    }
    assert values["Pneumothorax"].CodeValue == C.PRESENT.value
    assert values["Pneumothorax"].CodingSchemeDesignator == "SCT"
    assert values["Nodule"].CodeValue == "272519000"
    assert values["Nodule"].CodingSchemeDesignator == "SCT"


def test_a_map_drawn_without_evidence_carries_its_caveat() -> None:
    caveat = "drawn on operator request: its localisation evidence is weak"
    _, results = _build(
        [synthetic_source()],
        [PROBS],
        demo=False,
        caveats={"Pneumothorax": caveat, "Nodule": "never shown: Nodule is negative"},
    )
    content = read_sr(results.sr)
    assert content.comments == (f"Pneumothorax: heat map {caveat}",)
    assert content.findings["Pneumothorax"].regions  # still outlined
    assert content.notes == {}


def test_a_study_without_positive_findings_has_only_the_whole_image() -> None:
    source = synthetic_source()
    _, results = _build([source], [NEGATIVE], priority="ROUTINE", demo=False)
    assert finding_groups(results.sr) == []
    assert len(whole_image_groups(results.sr)) == 1
    content = read_sr(results.sr)
    assert content.positive == [] and content.groups == 1
    assert content.whole_image == {
        str(source.SOPInstanceUID): {"Abnormality score": pytest.approx(0.12)}
    }
    assert content.library == (str(source.SOPInstanceUID),)
    assert content.comments == () and content.notes == {}
    assert content.priority is Priority.ROUTINE
    assert results.parametric_maps == [] and results.overlays == []


def test_without_a_scored_image_imaging_measurements_is_empty_but_present() -> None:
    source = synthetic_source()
    prediction = prediction_for([source], [NEGATIVE], demo=False)
    prediction.images = []
    results = build_results([source], prediction, "ROUTINE", {})
    assert measurement_groups(results.sr) == []
    child(results.sr, C.IMAGING_MEASUREMENTS)  # present all the same
    content = read_sr(results.sr)
    assert content.groups == 0
    assert content.library == (str(source.SOPInstanceUID),)  # every source, then
    assert [kind for kind, _ in results.all()] == ["sr"]


# --- document ------------------------------------------------------------------------------------


def test_sr_document_attributes_and_study_membership() -> None:
    source = synthetic_source()
    _, results = _build([source], [PROBS])
    sr = results.sr
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.Modality == "SR"
    assert sr.SeriesNumber == 9001
    assert sr.SeriesDescription == "DDN AI findings (SR) - NOT FOR DIAGNOSTIC USE"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    # The private scheme is identified (PS3.3 C.12.1.1.4).
    assert [i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence] == ["99DDN"]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        source.SOPClassUID,
        source.SOPInstanceUID,
    )
    content = read_sr(sr)
    assert content.not_for_diagnostic_use
    (demo,) = texts(evaluations(sr), C.COMMENT)
    assert demo.startswith("NOT FOR DIAGNOSTIC USE: produced by the demonstration model")


def test_clinical_model_has_no_demo_wording() -> None:
    _, results = _build([synthetic_source()], [PROBS], demo=False)
    content = read_sr(results.sr)
    assert content.comments == ()
    assert not content.not_for_diagnostic_use
    assert results.sr.SeriesDescription == "DDN AI findings (SR)"


def test_superseding_sr_points_at_its_predecessor(tmp_path) -> None:
    source = synthetic_source()
    _, first = _build([source], [PROBS], uid_seed="result:1")
    _, second = _build([source], [PROBS], predecessor=first.sr_reference, uid_seed="result:2")
    _, stored = roundtrip(second.sr, tmp_path, "second")

    content = read_sr(stored)
    assert content.predecessors == (SRReference.from_dataset(first.sr),)
    assert second.sr.SOPInstanceUID != first.sr.SOPInstanceUID
    assert second.sr.SeriesInstanceUID != first.sr.SeriesInstanceUID
    item = stored.PredecessorDocumentsSequence[0]
    assert item.StudyInstanceUID == source.StudyInstanceUID
    assert item.ReferencedSeriesSequence[0].SeriesInstanceUID == first.sr.SeriesInstanceUID


def test_predecessor_from_another_study_is_refused() -> None:
    other = SRReference("1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.4", "1.2.3", "1.2.9")
    with pytest.raises(ValueError, match="another study"):
        _build([synthetic_source()], [PROBS], predecessor=other)


def test_uids_are_reproducible_with_a_seed_and_random_without() -> None:
    source = synthetic_source()
    _, a = _build([source], [PROBS], uid_seed="result:7")
    _, b = _build([source], [PROBS], uid_seed="result:7")
    _, c = _build([source], [PROBS])
    uids = lambda r: [ds.SOPInstanceUID for _, ds in r.all()]  # noqa: E731
    assert uids(a) == uids(b)
    assert not set(uids(a)) & set(uids(c))
    assert len(set(uids(a))) == len(uids(a))
    tracking = lambda r: [str(child(g, TRACKING_UID).UID) for g in finding_groups(r.sr)]  # noqa: E731
    assert tracking(a) == tracking(b) and len(set(tracking(a))) == 2
    assert not set(tracking(a)) & set(tracking(c))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"priority": "URGENT"}, "priority must be one of"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        _build([synthetic_source()], [PROBS], **kwargs)


def test_sources_from_two_studies_are_refused() -> None:
    sources = [synthetic_source(), synthetic_source()]
    with pytest.raises(ValueError, match="2 studies"):
        _build(sources, [PROBS, PROBS])


def test_a_label_without_probability_is_refused() -> None:
    source = synthetic_source()
    prediction = prediction_for([source], [PROBS])
    del prediction.probabilities["Nodule"]
    with pytest.raises(ValueError, match="Nodule"):
        build_results([source], prediction, "ROUTINE", display_for([source]))


def test_a_prediction_for_an_image_that_is_not_a_source_is_refused() -> None:
    source, stranger = synthetic_source(), synthetic_source()
    prediction = prediction_for([source, stranger], [PROBS, PROBS])
    with pytest.raises(ValueError, match="not among the sources"):
        build_results([source], prediction, "ROUTINE", display_for([source]))


def test_a_heat_map_for_an_unknown_label_is_refused() -> None:
    source = synthetic_source()
    prediction = prediction_for([source], [PROBS])
    prediction.images[0].heatmaps["Cardiomegaly"] = blob(96, 80)
    with pytest.raises(ValueError, match="Cardiomegaly"):
        build_results([source], prediction, "ROUTINE", display_for([source]))


def test_no_heat_map_without_display_image() -> None:
    source = synthetic_source()
    prediction = prediction_for([source], [PROBS])
    with pytest.raises(ValueError, match="no display image"):
        build_results([source], prediction, "ROUTINE", {})


def test_building_logs_no_patient_name_or_id(caplog) -> None:
    # highdicom warns about names without a caret and quotes them: we must not let it.
    source = synthetic_source(name="Covid0000")
    source.PatientID = "PID-SECRET-77"
    with caplog.at_level(logging.DEBUG):
        _build([source], [PROBS])
    assert "Covid0000" not in caplog.text
    assert "PID-SECRET-77" not in caplog.text


def test_long_snomed_codes_and_meanings_survive() -> None:
    # SNOMED CT identifiers reach 18 digits (Long Code Value, PS3.3 8.8); meanings may
    # exceed LO's 64 characters in a manifest.
    long_code = Code("900000000000207008", "SCT", "A finding with a rather long name " * 3)
    labels = [LabelSpec("Long", long_code, 0.5)]
    source = synthetic_source()
    prediction = prediction_for([source], [{"Long": 0.7}], labels=labels)
    results = build_results([source], prediction, "HIGH", display_for([source]))
    finding = read_sr(results.sr).findings["Long"]
    assert (finding.code.value, finding.code.scheme) == (long_code.value, "SCT")
    assert finding.present and len(finding.code.meaning) == 64
    (group,) = finding_groups(results.sr)
    (num,) = [item for item in group.ContentSequence if item.ValueType == "NUM"]
    assert num.ConceptNameCodeSequence[0].LongCodeValue == long_code.value
