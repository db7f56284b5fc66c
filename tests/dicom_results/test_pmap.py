"""Parametric Maps: float values on the source grid, value mapping, references."""

from __future__ import annotations

import numpy as np
import pytest
from results_factories import blob, display_for, prediction_for, roundtrip, synthetic_source

from ddn_node.dicom.results import build_results
from ddn_node.dicom.results.content import reference_header
from ddn_node.dicom.results.pmap import build_parametric_map, geometry_header

PROBS = {"Pneumothorax": 0.9, "Effusion": 0.45, "Nodule": 0.1}


def _maps(source, **kwargs):
    prediction = prediction_for([source], [PROBS], **kwargs)
    return prediction, build_results([source], prediction, "HIGH", display_for([source]))


def test_one_map_per_positive_label_with_float_values_on_the_source_grid(tmp_path) -> None:
    source = synthetic_source(rows=90, columns=70)
    prediction, results = _maps(source)
    assert len(results.parametric_maps) == 2  # Pneumothorax, Effusion
    for pm, label in zip(results.parametric_maps, ["Pneumothorax", "Effusion"], strict=True):
        _, stored = roundtrip(pm, tmp_path, label)
        assert stored.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
        assert (stored.Rows, stored.Columns, int(stored.NumberOfFrames)) == (90, 70, 1)
        assert "FloatPixelData" in stored and stored.BitsAllocated == 32
        values = np.frombuffer(stored.FloatPixelData, dtype="<f4").reshape(90, 70)
        np.testing.assert_array_equal(values, prediction.images[0].heatmaps[label])
        assert label in stored.SeriesDescription and "(PM)" in stored.SeriesDescription
        assert stored.SeriesDescription.endswith("NOT FOR DIAGNOSTIC USE")
        assert stored.ContentQualification == "RESEARCH"


def test_each_label_has_its_own_series() -> None:
    _, results = _maps(synthetic_source())
    series = {pm.SeriesInstanceUID for pm in results.parametric_maps}
    numbers = [pm.SeriesNumber for pm in results.parametric_maps]
    assert len(series) == 2
    assert numbers == [9003, 9004]


def test_real_world_value_mapping_says_what_the_values_are() -> None:
    _, results = _maps(synthetic_source())
    shared = results.parametric_maps[0].SharedFunctionalGroupsSequence[0]
    mapping = shared.RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == "GRADCAM"
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
    _, results = _maps(source)
    pm = results.parametric_maps[0]
    assert pm.StudyInstanceUID == source.StudyInstanceUID
    series = pm.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert pm.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    derivation = pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    ref = derivation.SourceImageSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        source.SOPClassUID,
        source.SOPInstanceUID,
    )
    assert ref.SpatialLocationsPreserved == "YES"
    assert "Grad-CAM" in derivation.DerivationDescription


def test_contributing_equipment_is_ihe_air_style() -> None:
    prediction, results = _maps(synthetic_source())
    algorithm = prediction.algorithm
    for ds in [results.sr, *results.parametric_maps, *results.overlays]:
        (item,) = [
            e
            for e in ds.ContributingEquipmentSequence
            if e.get("DeviceUID") == algorithm.device_uid
        ]
        assert item.Manufacturer == algorithm.manufacturer
        assert item.ManufacturerModelName == algorithm.name
        assert item.SoftwareVersions == algorithm.version
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")


def test_heat_map_of_another_size_is_resampled_to_the_source_grid() -> None:
    source = synthetic_source(rows=64, columns=48)
    prediction = prediction_for([source], [PROBS])
    prediction.images[0].heatmaps["Pneumothorax"] = blob(7, 7)  # raw Grad-CAM resolution
    pm = build_parametric_map(
        source,
        reference_header(source),
        prediction.images[0].heatmaps["Pneumothorax"],
        label="Pneumothorax",
        probability=0.9,
        algorithm=prediction.algorithm,
        series_instance_uid="1.2.3.1",
        sop_instance_uid="1.2.3.2",
        series_number=9003,
        instance_number=1,
    )
    values = np.frombuffer(pm.FloatPixelData, dtype="<f4").reshape(64, 48)
    assert values.min() >= 0.0 and values.max() <= 1.0
    assert np.unravel_index(values.argmax(), values.shape)[0] < 40  # the hot spot stays up


def test_projection_radiograph_gets_a_stable_frame_of_reference_and_plane() -> None:
    source = synthetic_source()
    header = reference_header(source)
    geo = geometry_header(header)
    assert geometry_header(reference_header(source)).FrameOfReferenceUID == geo.FrameOfReferenceUID
    other = geometry_header(reference_header(synthetic_source()))
    assert geo.FrameOfReferenceUID != other.FrameOfReferenceUID
    # Patient Orientation L\F: rows run to the patient's left, columns to the feet.
    assert [float(v) for v in geo.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    assert [float(v) for v in geo.PixelSpacing] == pytest.approx([0.143, 0.143])
    # The source itself is untouched, and the reference header carries no patient data.
    assert "FrameOfReferenceUID" not in source
    assert not header.PatientName and not header.PatientID


def test_source_geometry_is_used_when_present() -> None:
    source = synthetic_source()
    source.FrameOfReferenceUID = "1.2.3.4.5"
    source.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    source.ImagePositionPatient = [10, 20, 30]
    source.PixelSpacing = [0.2, 0.3]
    geo = geometry_header(reference_header(source))
    assert geo.FrameOfReferenceUID == "1.2.3.4.5"
    assert [float(v) for v in geo.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]
    assert [float(v) for v in geo.PixelSpacing] == [0.2, 0.3]


def test_chest_is_described_as_unpaired_anatomy() -> None:
    _, results = _maps(synthetic_source())
    pm = results.parametric_maps[0]
    anatomy = pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0]
    assert anatomy.FrameLaterality == "U"
    assert anatomy.AnatomicRegionSequence[0].CodeValue == "816094009"  # Chest
    assert "Laterality" not in pm
    assert pm.BodyPartExamined == "CHEST"


def test_clinical_model_is_product_content() -> None:
    _, results = _maps(synthetic_source(), demo=False)
    pm = results.parametric_maps[0]
    assert pm.ContentQualification == "PRODUCT"
    assert "NOT FOR DIAGNOSTIC USE" not in pm.SeriesDescription
    assert "ImageComments" not in pm


def test_plane_follows_the_patient_orientation_of_a_lateral_view() -> None:
    source = synthetic_source()
    source.PatientOrientation = ["P", "F"]  # left lateral: rows run posterior
    geo = geometry_header(reference_header(source))
    assert [float(v) for v in geo.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]


def test_large_sources_get_a_coarser_map_covering_the_same_area() -> None:
    """A 2048^2 source gets a 512^2 map (1 MiB, not 16) whose pixels cover the image."""
    import numpy as np
    from pydicom.dataset import Dataset

    from ddn_node.dicom.results.pmap import map_grid

    geo = Dataset()
    geo.Rows, geo.Columns = 2048, 1536
    geo.PixelSpacing = [0.2, 0.1]
    geo.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    geo.ImagePositionPatient = [10.0, 20.0, 0.0]
    grid = map_grid(geo, 512)
    assert (grid.rows, grid.columns) == (512, 384)
    spacing = [float(v) for v in grid.pixel_measures[0].PixelSpacing]
    assert spacing == pytest.approx([0.8, 0.4])
    first = np.array([float(v) for v in grid.plane_positions[0][0].ImagePositionPatient])
    # Edges: the source's first pixel's outer corner equals the map's first pixel's.
    assert first - [0.4 / 2, 0.8 / 2, 0] == pytest.approx(
        np.array([10.0, 20.0, 0.0]) - [0.1 / 2, 0.2 / 2, 0]
    )
    small = Dataset()
    small.Rows, small.Columns = 300, 200
    assert map_grid(small, 512).pixel_measures is None
