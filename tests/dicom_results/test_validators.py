"""Self-test of tests/support/validators.py, the wrappers the result tests rely on: a
validator that crashes or prints no verdict must never read as "0 errors".

Two layers:
- parser tests on canned tool output: run everywhere, no tool needed;
- tool tests on small files built here: each skips cleanly when its tool is absent.
  The PixelMed ones take 10-50 s each (JVM + XSLT compile); they are marked ``slow``.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from support import validators as V

# --- canned output (exact lines the tools printed on this project's objects) -----------------

DCIODVFY_OUT = """\
Comprehensive3DSR
Error - Value invalid for this VR - (0x0008,0x0020) DA Study Date  DA [1] = <2026112> - Length invalid for this VR = 7, expected == 8 or 10
Error - Dicom dataset contains invalid data values for Value Representations
Error - Missing attribute Type 1C Conditional Element=<ConceptNameCodeSequence> Module=<DocumentContentMacro>
Warning - Unrecognized defined term <99DDN> for value 1 of attribute <Coding Scheme Designator>
"""

DCENTVFY_OUT = """\
Error - String attribute has different value - Element=<PatientName> IE=<Patient> for file <a.dcm> versus <b.dcm> Value 1 <Doe^J> versus <Other^Name>
Warning - Different information entities for attribute - Element=<AccessionNumber> IE <Study> versus <Series> for file <sr.dcm> versus <sc.dcm>
"""

PIXELMED_OUT = """\
Found Comprehensive3DSR IOD
Found Root Template TID_1500 (MeasurementReport)
Error: Template 1500 MeasurementReport/[Row 1] CONTAINER CID 7021/[Row 4] CODE (121058,DCM,"Procedure reported"): 1.7: /CONTAINER (126000,DCM,"Imaging Measurement Report")/CODE (121058,DCM,"Procedure reported"): Code (399208008,SCT,"Plain chest X-ray") not found in context group 100
Root Template Validation Complete
Warning: 1.9.4.7: /CONTAINER (126000,DCM,"Imaging Measurement Report")/CONTAINER (126010,DCM,"Imaging Measurements")/CONTAINER (125007,DCM,"Measurement Group")/CODE (260870009,SCT,"Priority"): Content Item not in template
Parent content item (1.5.3.4: NUM) has illegal relationship R-INFERRED FROM with child content item (1.1.3: )
IOD validation complete
"""

PIXELMED_JAXP_FAILURE = """\
javax.xml.transform.TransformerConfigurationException: JAXP0801003: the compiler encountered XPath expressions with an accumulated '10,001' operators that exceeds the '10,000' limit set by 'FEATURE_SECURE_PROCESSING'.
\tat java.xml/com.sun.org.apache.xalan.internal.xsltc.trax.TransformerFactoryImpl.newTemplates(TransformerFactoryImpl.java:1079)
"""


def test_parse_dciodvfy() -> None:
    errors, warnings, other = V.parse_dciodvfy(DCIODVFY_OUT)
    assert [e.tag for e in errors] == [(0x0008, 0x0020), None, None]
    assert errors[2].element == "ConceptNameCodeSequence"
    assert errors[2].module == "DocumentContentMacro"
    assert all(e.iod == "Comprehensive3DSR" for e in errors)
    assert len(warnings) == 1 and warnings[0].severity is V.Severity.WARNING
    assert other == ("Comprehensive3DSR",)


def test_parse_dciodvfy_abort_is_a_crash() -> None:
    with pytest.raises(V.ValidatorCrashed):
        V.parse_dciodvfy('Abort - File open for read failed - "x.dcm"\n')
    with pytest.raises(V.ValidatorCrashed):
        V.parse_dciodvfy("Error - Value length read failed\nError - Dicom dataset read failed\n")


def test_parse_dcentvfy() -> None:
    errors, warnings, _ = V.parse_dcentvfy(DCENTVFY_OUT)
    (error,) = errors
    assert (error.element, error.entity, error.files, error.values) == (
        "PatientName",
        "Patient",
        ("a.dcm", "b.dcm"),
        ("Doe^J", "Other^Name"),
    )
    (warning,) = warnings
    assert warning.element == "AccessionNumber" and warning.entity == "Study/Series"
    assert V.accession_number_ie_quirk(warning) and not V.accession_number_ie_quirk(error)


def test_parse_pixelmed_gives_the_content_item_of_each_message() -> None:
    errors, warnings, other = V.parse_pixelmed(PIXELMED_OUT)
    assert len(errors) == 2 and len(warnings) == 1
    procedure = errors[0]
    assert procedure.location == "1.7"
    assert procedure.item == 'CODE (121058,DCM,"Procedure reported")'
    assert procedure.template is not None and "[Row 4]" in procedure.template
    assert "not found in context group 100" in procedure.text
    assert warnings[0].location == "1.9.4.7"
    assert warnings[0].item == 'CODE (260870009,SCT,"Priority")'
    assert warnings[0].text == "Content Item not in template"
    assert errors[1].location == "1.5.3.4"  # the relationship error has no "Error:" prefix
    assert "IOD validation complete" in other


def test_parse_pixelmed_without_a_verdict_is_a_crash() -> None:
    with pytest.raises(V.ValidatorCrashed, match="exception"):
        V.parse_pixelmed(PIXELMED_JAXP_FAILURE)
    with pytest.raises(V.ValidatorCrashed, match="no verdict"):
        V.parse_pixelmed("Found Comprehensive3DSR IOD\n")


def test_report_helpers() -> None:
    errors, warnings, _ = V.parse_dciodvfy(DCIODVFY_OUT)
    report = V.Report("dciodvfy", ("x.dcm",), errors, warnings)
    assert not report.ok and not report.clean
    assert V.vr_error_tags(report) == {(0x0008, 0x0020)}
    inherited = V.vr_error_tags(report)
    own = report.without(
        lambda m: m.tag in inherited or m.text.startswith("Dicom dataset contains invalid")
    )
    assert [m.element for m in own.errors] == ["ConceptNameCodeSequence"]
    assert "3 error(s), 1 warning(s)" in report.summary()


def test_unknown_tool_name_is_refused() -> None:
    with pytest.raises(ValueError):
        V.available("dcmtk-typo")
    assert isinstance(V.available(*V.TOOLS), bool)


# --- real tool runs ----------------------------------------------------------------------


def _sr_file(tmp_path: Path, procedure: tuple[str, str, str]) -> Path:
    """A tiny TID 1500 SR built with highdicom (no image references needed)."""
    import numpy as np
    from highdicom.sr import (
        CodedConcept,
        Comprehensive3DSR,
        DeviceObserverIdentifyingAttributes,
        ImageRegion,
        Measurement,
        MeasurementReport,
        ObservationContext,
        ObserverContext,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        SourceImageForRegion,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    image = Dataset()
    image.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    image.SOPInstanceUID = generate_uid()
    image.StudyInstanceUID = generate_uid()
    image.SeriesInstanceUID = generate_uid()
    image.Modality = "DX"
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
    ):
        setattr(image, keyword, None)
    region = ImageRegion(
        graphic_type="POLYLINE",
        graphic_data=np.array([[10, 10], [30, 10], [30, 30], [10, 10]], dtype=float),
        source_image=SourceImageForRegion(image.SOPClassUID, image.SOPInstanceUID),
    )
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier="roi"),
        referenced_region=region,
        finding_type=CodedConcept("36118008", "SCT", "Pneumothorax"),
        measurements=[
            Measurement(
                name=CodedConcept("122157", "DCM", "Probability"),
                value=91.0,
                unit=CodedConcept("%", "UCUM", "Percent"),
            )
        ],
    )
    report = MeasurementReport(
        observation_context=ObservationContext(
            observer_device_context=ObserverContext(
                observer_type=codes.cid270.Device,
                observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                    uid=generate_uid()
                ),
            )
        ),
        procedure_reported=CodedConcept(*procedure),
        imaging_measurements=[group],
    )
    sr = Comprehensive3DSR(
        evidence=[image],
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=1,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def _header(tmp_path: Path, name: str, patient: str) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient
    ds.PatientID = "P1"
    ds.Modality = "OT"
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@V.skip_unless("dciodvfy")
def test_dciodvfy_on_a_highdicom_sr(tmp_path: Path) -> None:
    report = V.dciodvfy(_sr_file(tmp_path, ("363679005", "SCT", "Imaging procedure")))
    assert report.ok, report.summary()
    assert "Comprehensive3DSR" in report.other


@V.skip_unless("dciodvfy")
def test_dciodvfy_finds_a_bad_date(tmp_path: Path) -> None:
    path = _sr_file(tmp_path, ("363679005", "SCT", "Imaging procedure"))
    ds = pydicom.dcmread(path)
    ds.StudyDate = "2026112"
    ds.save_as(path)
    report = V.dciodvfy(path)
    assert (0x0008, 0x0020) in V.vr_error_tags(report), report.summary()


@V.skip_unless("dciodvfy")
def test_dciodvfy_on_a_non_dicom_file_is_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_text("not dicom")
    with pytest.raises(V.ValidatorCrashed):
        V.dciodvfy(path)


def test_missing_file_is_refused_before_running(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        V.dciodvfy(tmp_path / "absent.dcm")


@V.skip_unless("dcentvfy")
def test_dcentvfy_finds_a_patient_name_mismatch(tmp_path: Path) -> None:
    a = _header(tmp_path, "a", "Doe^Jane")
    b = _header(tmp_path, "b", "Doe^John")
    report = V.dcentvfy([a, b])
    assert [(m.element, m.entity) for m in report.errors] == [("PatientName", "Patient")]
    assert set(report.errors[0].values) == {"Doe^Jane", "Doe^John"}
    assert V.dcentvfy([a, _header(tmp_path, "c", "Doe^Jane")]).ok


@V.skip_unless("dsr2html")
def test_dsr2html_renders_and_fails_on_a_non_sr(tmp_path: Path) -> None:
    html = V.dsr2html(_sr_file(tmp_path, ("363679005", "SCT", "Imaging procedure")))
    assert "<html" in html.lower() and "Imaging Measurement Report" in html
    with pytest.raises(V.ValidatorCrashed):
        V.dsr2html(_header(tmp_path, "not-sr", "Doe^Jane"))


@V.skip_unless("dsrdump")
def test_dsrdump_renders(tmp_path: Path) -> None:
    text = V.dsrdump(_sr_file(tmp_path, ("363679005", "SCT", "Imaging procedure")))
    assert '(363679005,SCT,"Imaging procedure")' in text


@pytest.mark.slow
@V.skip_unless("pixelmed")
def test_pixelmed_accepts_a_cid_100_procedure_and_names_the_item_otherwise(tmp_path: Path) -> None:
    good = V.pixelmed_sr(_sr_file(tmp_path, ("363679005", "SCT", "Imaging procedure")))
    assert good.clean, good.summary()
    (tmp_path / "bad").mkdir()
    bad = V.pixelmed_sr(_sr_file(tmp_path / "bad", ("399208008", "SCT", "Plain chest X-ray")))
    assert [m.item for m in bad.errors] == ['CODE (121058,DCM,"Procedure reported")']
    assert "context group 100" in bad.errors[0].text


@pytest.mark.slow
@V.skip_unless("pixelmed")
def test_pixelmed_on_a_non_dicom_file_is_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_text("not dicom")
    with pytest.raises(V.ValidatorCrashed):
        V.pixelmed_sr(path)
