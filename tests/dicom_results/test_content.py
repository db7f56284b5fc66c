"""Patient/study copying, character sets and text fitting shared by all result objects."""

from __future__ import annotations

import io
import logging

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from results_factories import display_for, frame_mappings, prediction_for, synthetic_source
from support.sr_reader import read_sr

from ddn_node.dicom.results import build_results
from ddn_node.dicom.results.content import (
    TYPE2_PATIENT_STUDY,
    check_sources,
    copy_patient_and_study,
    fit_text,
    reference_header,
)
from ddn_node.model.types import Code, LabelSpec

PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
)


@pytest.mark.parametrize(
    ("name", "charset"),
    [
        ("Müller^Jürgen", "ISO_IR 192"),
        ("Иванов^Пётр", "ISO_IR 144"),
        ("やまだ^たろう", ["", "ISO 2022 IR 87"]),
    ],
)
def test_every_object_carries_the_source_patient_and_character_set(name, charset) -> None:
    source = synthetic_source(name=name, charset=charset)
    prediction = prediction_for([source], [{"Pneumothorax": 0.9, "Effusion": 0.1, "Nodule": 0.1}])
    results = build_results([source], prediction, "ROUTINE", display_for([source]))
    for _, ds in results.all():
        assert ds.SpecificCharacterSet == source.SpecificCharacterSet
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        for keyword in PATIENT_STUDY:
            assert ds.get(keyword) == source.get(keyword), keyword


def _raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Put an element in as pydicom leaves it after reading a file (not yet converted)."""
    tag = Tag(keyword)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")  # names no value
def test_invalid_values_that_identify_nothing_are_emptied_identifiers_kept(caplog) -> None:
    source = synthetic_source()
    _raw(source, "PatientBirthDate", "DA", b"d14a028c2a3a2bc9")  # a hash where a date belongs
    _raw(source, "StudyTime", "TM", b"25:00 ")
    _raw(source, "PatientSex", "CS", b"male")
    _raw(source, "PatientAge", "AS", b"81")
    _raw(source, "PatientWeight", "DS", b"0 ")
    _raw(source, "AccessionNumber", "SH", b"x" * 40)  # too long for SH; the RIS matches on it
    target = Dataset()
    with caplog.at_level(logging.DEBUG):
        copy_patient_and_study(target, source)
    # pydicom's own validation would have logged the birth date; ours reads raw bytes.
    assert "d14a028c2a3a2bc9" not in caplog.text
    assert not target.PatientBirthDate and not target.StudyTime and not target.PatientSex
    assert "PatientAge" not in target and "PatientWeight" not in target
    assert target.AccessionNumber == "x" * 40
    assert target.PatientName == source.PatientName


def test_type2_attributes_are_present_even_when_the_source_lacks_them() -> None:
    source = synthetic_source()
    for keyword in ("StudyDate", "StudyTime", "AccessionNumber", "StudyID"):
        delattr(source, keyword)
    del source.SpecificCharacterSet
    target = Dataset()
    target.SpecificCharacterSet = "ISO_IR 100"
    copy_patient_and_study(target, source)
    for keyword in TYPE2_PATIENT_STUDY:
        assert keyword in target, keyword
    assert "SpecificCharacterSet" not in target  # default repertoire, like the source


def test_reference_header_has_uids_but_no_patient_data() -> None:
    source = synthetic_source()
    header = reference_header(source)
    assert header.SOPInstanceUID == source.SOPInstanceUID
    assert header.StudyInstanceUID == source.StudyInstanceUID
    for keyword in TYPE2_PATIENT_STUDY:
        assert not header.get(keyword), keyword
    assert "IssuerOfPatientID" not in header and "PatientAge" not in header


def test_lossy_source_passes_its_history_on() -> None:
    source = synthetic_source()
    source.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # JPEG baseline
    header = reference_header(source)
    assert header.LossyImageCompression == "01"
    assert header.LossyImageCompressionMethod == "ISO_10918_1"
    prediction = prediction_for([source], [{"Pneumothorax": 0.9, "Effusion": 0.1, "Nodule": 0.1}])
    results = build_results([source], prediction, "ROUTINE", display_for([source]))
    assert results.parametric_maps[0].LossyImageCompression == "01"
    assert results.overlays[0].LossyImageCompression == "01"


def test_fit_text() -> None:
    assert fit_text("Pneumothorax", 64, []) == "Pneumothorax"
    assert fit_text("Épanchement", None, ["ISO_IR 100"]) == "Épanchement"  # Latin-1 has it
    assert fit_text("Épanchement", None, []) == "Epanchement"  # default repertoire does not
    assert fit_text("Épanchement", None, ["", "ISO 2022 IR 87"]) == "Epanchement"
    assert fit_text("x" * 70, 64, []) == "x" * 63 + "~"


def test_check_sources() -> None:
    with pytest.raises(ValueError, match="at least one"):
        check_sources([])
    source = synthetic_source()
    del source.SeriesInstanceUID
    with pytest.raises(ValueError, match="SeriesInstanceUID"):
        check_sources([source])


def test_label_names_outside_the_character_set_are_transliterated() -> None:
    source = synthetic_source()
    del source.SpecificCharacterSet  # default repertoire: ASCII only
    source.PatientName = "Doe^Jane"
    labels = [
        LabelSpec("Épanchement", Code("60046008", "SCT", "Pleural effusion"), 0.5),
        LabelSpec("Nodule", Code("RID3875", "RADLEX", "Nodule"), 0.3),
    ]
    prediction = prediction_for([source], [{"Épanchement": 0.9, "Nodule": 0.6}], labels=labels)
    del prediction.images[0].heatmaps["Nodule"]
    prediction.heatmap_notes["Nodule"] = "évidence trop faible"
    results = build_results([source], prediction, "ROUTINE", display_for([source]))
    (pm,) = results.parametric_maps
    assert pm.SeriesDescription == "DDN heat maps Epanchement (PM) - NOT FOR DIAGNOSTIC USE"
    assert [m.LUTLabel for m in frame_mappings(pm)] == ["Epanchement"]
    content = read_sr(results.sr)
    assert list(content.findings) == ["Epanchement", "Nodule"]
    assert content.findings["Epanchement"].regions  # tracked as "Epanchement"
    assert content.notes == {"Nodule": "no heat map: evidence trop faible"}
    (sc,) = results.overlays
    assert sc.DerivationDescription == "AI findings (Epanchement, Nodule) drawn on the source image"
    for _, ds in results.all():
        assert "SpecificCharacterSet" not in ds
        ds.save_as(io.BytesIO(), enforce_file_format=True)  # encodes without loss warnings
