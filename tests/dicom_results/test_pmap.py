"""Parametric Maps: one per source image, one float frame per finding on the source's own
grid, a value mapping per frame, the plane a viewer can fuse it on, deflated on disk."""

from __future__ import annotations

import datetime

import numpy as np
import pytest
from pydicom.dataset import Dataset
from results_factories import (
    DEFLATED,
    GRID_PLANE,
    PARAMETRIC_MAP,
    SPEC,
    algorithm,
    blob,
    display_for,
    frame_mappings,
    prediction_for,
    roundtrip,
    same_study,
    synthetic_source,
)

from ddn_node.dicom.results import add_heat_map_objects, build_results, build_sr_result
from ddn_node.dicom.results.content import reference_header
from ddn_node.dicom.results.pmap import MapFrame, build_parametric_map, geometry_header
from ddn_node.vocabulary import ResultKind

PROBS = {"Pneumothorax": 0.6, "Effusion": 0.95, "Nodule": 0.1}  # Effusion the more probable
NOW = datetime.datetime(2026, 11, 27, 9, 30, tzinfo=datetime.UTC)


def _maps(sources, probabilities=None, **kwargs):
    probabilities = probabilities or [PROBS] * len(sources)
    prediction = prediction_for(sources, probabilities, **kwargs)
    return prediction, build_results(sources, prediction, "HIGH", display_for(sources))


def _frames(ds: Dataset) -> np.ndarray:
    frames = int(ds.NumberOfFrames)
    return np.frombuffer(ds.FloatPixelData, dtype="<f4").reshape(frames, ds.Rows, ds.Columns)


def _build_one(source, frames):
    return build_parametric_map(
        source,
        reference_header(source),
        frames,
        algorithm=algorithm(),
        series_instance_uid="1.2.3.1",
        sop_instance_uid="1.2.3.2",
        series_number=9003,
        instance_number=1,
        now=NOW,
    )


def test_one_map_per_image_one_frame_per_finding_most_probable_first(tmp_path) -> None:
    source = synthetic_source(rows=90, columns=70)
    prediction, results = _maps([source])
    (pm,) = results.parametric_maps
    path, stored = roundtrip(pm, tmp_path, "pm")
    assert stored.SOPClassUID == PARAMETRIC_MAP
    assert stored.file_meta.TransferSyntaxUID == DEFLATED
    assert (stored.Rows, stored.Columns, int(stored.NumberOfFrames)) == (90, 70, 2)
    assert "FloatPixelData" in stored and stored.BitsAllocated == 32
    order = ["Effusion", "Pneumothorax"]  # by probability, not model order
    frames = _frames(stored)
    assert frames.dtype == np.float32
    assert [m.LUTLabel for m in frame_mappings(stored)] == order
    for frame, label, item in zip(
        frames, order, stored.PerFrameFunctionalGroupsSequence, strict=True
    ):
        heatmap = prediction.images[0].heatmaps[label]
        np.testing.assert_allclose(
            frame, np.where(heatmap < 0.2, 0.0, heatmap), atol=0.5 / 255 + 1e-7
        )
        assert label in item.DerivationImageSequence[0].DerivationDescription
    assert results.shows[str(pm.SOPInstanceUID)] == ("Pneumothorax", "Effusion")
    # Labels most probable first, shortened so that the warning stays whole (LO, 64).
    assert stored.SeriesDescription == (
        "DDN heat maps Effusion, Pneumotho~ (PM) - NOT FOR DIAGNOSTIC USE"
    )
    assert stored.ContentQualification == "RESEARCH"
    assert stored.ContentLabel == "GRADCAM"
    assert "NOT FOR DIAGNOSTIC USE" in stored.ImageComments
    assert path.stat().st_size < frames.nbytes / 2  # the zeroed background compresses


def test_background_under_a_fifth_is_zero_and_values_stay_in_range() -> None:
    source = synthetic_source(rows=40, columns=30)
    heatmap = np.linspace(-0.5, 1.5, 40 * 30, dtype=np.float32).reshape(40, 30)
    heatmap[0, 0] = np.nan
    pm = _build_one(source, [MapFrame("Effusion", SPEC["Effusion"].code, 0.9, heatmap)])
    (frame,) = _frames(pm)
    expected = np.clip(np.nan_to_num(heatmap, nan=0.0), 0.0, 1.0)
    expected[expected < 0.2] = 0.0
    # Kept to steps of 1/255 (what compresses): never more than half a step off.
    np.testing.assert_allclose(frame, expected, atol=0.5 / 255 + 1e-7)
    assert set(np.unique(np.round(frame * 255, 3))) <= {float(k) for k in range(256)}
    assert frame[frame > 0].min() >= 0.2 and frame.max() == 1.0


def test_each_image_has_its_own_map_series_and_an_image_without_a_map_none() -> None:
    sources = same_study(3)
    negative = {"Pneumothorax": 0.1, "Effusion": 0.1, "Nodule": 0.1}
    _, results = _maps(sources, [PROBS, negative, {**PROBS, "Nodule": 0.5}])
    assert len(results.parametric_maps) == 2
    referenced = [
        str(pm.SourceImageSequence[0].ReferencedSOPInstanceUID) for pm in results.parametric_maps
    ]
    assert referenced == [str(sources[0].SOPInstanceUID), str(sources[2].SOPInstanceUID)]
    assert len({pm.SeriesInstanceUID for pm in results.parametric_maps}) == 2
    assert [pm.SeriesNumber for pm in results.parametric_maps] == [9003, 9004]
    assert [int(pm.NumberOfFrames) for pm in results.parametric_maps] == [2, 3]
    assert results.shows[str(results.parametric_maps[1].SOPInstanceUID)] == (
        "Pneumothorax",
        "Effusion",
        "Nodule",
    )
    source_series = {s.SeriesInstanceUID for s in sources}
    assert not {pm.SeriesInstanceUID for pm in results.parametric_maps} & source_series


@pytest.mark.parametrize(
    ("probabilities", "labels"),
    [
        (PROBS, ["Effusion", "Pneumothorax"]),
        ({"Pneumothorax": 0.9, "Effusion": 0.1, "Nodule": 0.1}, ["Pneumothorax"]),
    ],
    ids=["two-frames", "one-frame"],
)
def test_real_world_value_mapping_of_each_frame_says_what_the_values_are(
    probabilities, labels
) -> None:
    _, results = _maps([synthetic_source()], [probabilities])
    (pm,) = results.parametric_maps
    mappings = frame_mappings(pm)
    assert [m.LUTLabel for m in mappings] == labels
    for mapping in mappings:
        assert mapping.LUTExplanation == f"Grad-CAM {mapping.LUTLabel}"
        unit = mapping.MeasurementUnitsCodeSequence[0]
        assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
        quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
        assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == ("130403", "DCM")
        assert mapping.DoubleFloatRealWorldValueFirstValueMapped == 0.0
        assert mapping.DoubleFloatRealWorldValueLastValueMapped == 1.0
        assert float(mapping.RealWorldValueSlope) == 1.0
        assert float(mapping.RealWorldValueIntercept) == 0.0


def test_references_resolve_to_the_source_image() -> None:
    source = synthetic_source()
    _, results = _maps([source])
    (pm,) = results.parametric_maps
    assert pm.StudyInstanceUID == source.StudyInstanceUID
    series = pm.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert pm.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    for item in pm.PerFrameFunctionalGroupsSequence:
        derivation = item.DerivationImageSequence[0]
        ref = derivation.SourceImageSequence[0]
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
            source.SOPClassUID,
            source.SOPInstanceUID,
        )
        assert ref.SpatialLocationsPreserved == "YES"
        assert "Grad-CAM" in derivation.DerivationDescription


def test_contributing_equipment_is_ihe_air_style() -> None:
    prediction, results = _maps([synthetic_source()])
    info = prediction.algorithm
    for _, ds in results.all():
        (item,) = [
            e for e in ds.ContributingEquipmentSequence if e.get("DeviceUID") == info.device_uid
        ]
        assert item.Manufacturer == info.manufacturer
        assert item.ManufacturerModelName == info.name
        assert item.SoftwareVersions == info.version
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
    (pm,) = results.parametric_maps
    assert list(pm.SoftwareVersions) == ["0.1.0", info.version]
    assert pm.DeviceSerialNumber == info.device_uid


def test_heat_map_of_another_size_is_resampled_to_the_source_grid() -> None:
    source = synthetic_source(rows=64, columns=48)
    code = SPEC["Pneumothorax"].code
    pm = _build_one(source, [MapFrame("Pneumothorax", code, 0.9, blob(7, 7, cy=0.2))])
    (values,) = _frames(pm)
    assert values.shape == (64, 48)
    assert values.min() >= 0.0 and values.max() <= 1.0
    assert np.unravel_index(values.argmax(), values.shape)[0] < 32  # the hot spot stays up


def test_a_large_source_gets_a_map_on_its_exact_grid() -> None:
    """OHIF refuses a map of other dimensions than its source."""
    source = synthetic_source(rows=1500, columns=1200)
    _, results = _maps([source], [{"Pneumothorax": 0.9, "Effusion": 0.1, "Nodule": 0.1}])
    (pm,) = results.parametric_maps
    assert (pm.Rows, pm.Columns, int(pm.NumberOfFrames)) == (1500, 1200, 1)
    spacing = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == pytest.approx([0.143, 0.143])


def test_projection_radiograph_is_placed_on_its_own_pixel_grid() -> None:
    """A DX has no Image Orientation / Frame of Reference: the map lies on the source's
    grid, 1\\0\\0\\0\\1\\0 at 0\\0\\0, with a Frame of Reference derived from the source."""
    source = synthetic_source()
    _, results = _maps([source])
    (pm,) = results.parametric_maps
    shared = pm.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in orientation] == GRID_PLANE
    for item in pm.PerFrameFunctionalGroupsSequence:
        position = item.PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in position] == [0.0, 0.0, 0.0]
    spacing = shared.PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == pytest.approx([0.143, 0.143])  # Imager Pixel Spacing
    frame_of_reference = str(pm.FrameOfReferenceUID)
    assert frame_of_reference not in {
        str(source.StudyInstanceUID),
        str(source.SeriesInstanceUID),
        str(source.SOPInstanceUID),
    }
    # Derived from the source: the same for a rebuild, another for another source.
    _, again = _maps([source])
    assert str(again.parametric_maps[0].FrameOfReferenceUID) == frame_of_reference
    _, other = _maps([synthetic_source()])
    assert str(other.parametric_maps[0].FrameOfReferenceUID) != frame_of_reference
    assert "FrameOfReferenceUID" not in source  # the source itself is untouched


def test_a_lateral_view_is_on_its_grid_too() -> None:
    """OHIF compares orientations exactly: a patient-based plane was "oblique" to it."""
    source = synthetic_source()
    source.PatientOrientation = ["P", "F"]  # left lateral: rows run posterior
    geo = geometry_header(reference_header(source))
    assert [float(v) for v in geo.ImageOrientationPatient] == GRID_PLANE
    assert [float(v) for v in geo.ImagePositionPatient] == [0.0, 0.0, 0.0]
    header = reference_header(source)
    assert not header.PatientName and not header.PatientID  # no patient data


def test_source_geometry_is_used_when_present() -> None:
    source = synthetic_source()
    source.FrameOfReferenceUID = "1.2.3.4.5"
    source.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    source.ImagePositionPatient = [10, 20, 30]
    source.PixelSpacing = [0.2, 0.3]
    _, results = _maps([source])
    (pm,) = results.parametric_maps
    assert pm.FrameOfReferenceUID == "1.2.3.4.5"
    shared = pm.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in orientation] == [0, 1, 0, 0, 0, -1]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.2, 0.3]
    for item in pm.PerFrameFunctionalGroupsSequence:
        position = item.PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in position] == [10.0, 20.0, 30.0]


def test_an_orientation_without_frame_of_reference_is_not_used() -> None:
    source = synthetic_source()
    source.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    geo = geometry_header(reference_header(source))
    assert [float(v) for v in geo.ImageOrientationPatient] == GRID_PLANE
    assert geo.FrameOfReferenceUID


def test_chest_is_described_as_unpaired_anatomy() -> None:
    _, results = _maps([synthetic_source()])
    (pm,) = results.parametric_maps
    anatomy = pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0]
    assert anatomy.FrameLaterality == "U"
    assert anatomy.AnatomicRegionSequence[0].CodeValue == "816094009"  # Chest
    assert "Laterality" not in pm
    assert pm.BodyPartExamined == "CHEST"


def test_clinical_model_is_product_content() -> None:
    _, results = _maps([synthetic_source()], demo=False)
    (pm,) = results.parametric_maps
    assert pm.ContentQualification == "PRODUCT"
    assert "NOT FOR DIAGNOSTIC USE" not in pm.SeriesDescription
    assert "ImageComments" not in pm


def test_a_map_needs_frames_and_a_grid() -> None:
    source = synthetic_source()
    with pytest.raises(ValueError, match="at least one"):
        _build_one(source, [])
    del source.Rows
    code = SPEC["Pneumothorax"].code
    with pytest.raises(ValueError, match="Rows"):
        _build_one(source, [MapFrame("Pneumothorax", code, 0.9, blob(7, 7))])


def test_kinds_leave_out_what_no_destination_takes() -> None:
    source = synthetic_source()
    prediction = prediction_for([source], [PROBS])
    for kinds, maps, overlays in (
        ([ResultKind.PM], 1, 0),
        ([ResultKind.SC], 0, 1),
        ([], 0, 0),
    ):
        results = build_sr_result([source], prediction, "HIGH", uid_seed="k", now=NOW)
        add_heat_map_objects(
            results, [source], prediction, display_for([source]), uid_seed="k", now=NOW, kinds=kinds
        )
        assert (len(results.parametric_maps), len(results.overlays)) == (maps, overlays)
        assert len(results.shows) == maps + overlays
