"""Every object type, built from real source headers, passes the DICOM validators.

- dciodvfy (dicom3tools): no error of ours in the SR, the Parametric Map (checked on a
  copy re-encoded as Explicit VR Little Endian: dicom3tools cannot read deflated files)
  and the Secondary Capture. The only errors allowed are VR errors of identifiers that the
  source itself carries and that we copy verbatim on purpose (see
  ``ddn_node/dicom/results/content.py``).
- dcentvfy (dicom3tools): source + SR + PM + SC agree on patient, study and series. Its
  warnings are known and allowed: Accession Number filed under the Study IE by the SR and
  PM IODs and under the Series IE by the SC's ("IE Study versus Series"), and attributes
  present (or empty) in one instance and not in another, which is the copy policy of
  content.py (invalid dates emptied, Type 3 attributes we do not carry).
- dsrdump and dsr2html (DCMTK) render the SR.
- PixelMed's DicomSRValidator: no error and no warning on a first, a superseding and a
  demo SR, and on an SR without findings (slow: 20-80 s a run). It checks a report with
  one planar ROI group in all against TID 1410, one with more against TID 1501.

Sources: the real chest radiographs of ``../shared/data/dicom/chest_xray_real`` (varied and
partly invalid headers), the character-set edge cases (Cyrillic, ISO 2022 Japanese, UTF-8)
and synthetic DX headers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from results_factories import (
    DEFLATED,
    GRID_PLANE,
    JPEG_BASELINE,
    explicit_copy,
    inherited_vr_errors,
    own_errors,
    prediction_for,
    roundtrip,
    same_study,
    synthetic_source,
)
from support import validators as V
from support.sr_reader import read_sr

from ddn_node.dicom.results import SRReference, build_results
from ddn_node.vocabulary import ResultKind

REAL = [
    "chest_xray_real/nhsx__1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm",
    "chest_xray_real/pylibjpegdata__966_fixed.dcm",
    "chest_xray_real/txv__1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "chest_xray_real/wg04__RG1_J2KI.dcm",
    "edge_cases/orthanc__Lena-cyrillic.dcm",
    "edge_cases/fodicom__chrJapMulti.dcm",
    "edge_cases/orthanc__Lena-utf8.dcm",
]
IDENTIFIERS = (
    "PatientName",
    "PatientID",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
)
# Pneumothorax and Effusion outlined; Nodule reported without a map.
PROBS = {"Pneumothorax": 0.91, "Effusion": 0.62, "Nodule": 0.35}
NEGATIVE = {"Pneumothorax": 0.12, "Effusion": 0.1, "Nodule": 0.05}
NO_MAP = "its localisation evidence does not beat the baselines"


def _display(ds) -> dict[str, np.ndarray]:
    rows, columns = int(ds.Rows), int(ds.Columns)
    ramp = np.linspace(0.1, 0.9, columns, dtype=np.float32)[None, :].repeat(rows, axis=0)
    return {str(ds.SOPInstanceUID): ramp}


def _prediction(sources, probabilities, *, demo=True):
    prediction = prediction_for(sources, probabilities, demo=demo)
    for image in prediction.images:
        image.heatmaps.pop("Nodule", None)
    prediction.heatmap_notes["Nodule"] = NO_MAP
    return prediction


def _known_entity_warning(message: V.EntityMessage) -> bool:
    return V.accession_number_ie_quirk(message) or message.text.startswith(
        (
            "Attribute present in one instance but not the other",
            "Attribute is empty (zero length) in one instance",
        )
    )


def _write_all(results, tmp_path: Path) -> dict[str, tuple[Path, pydicom.Dataset]]:
    """Each object as written (PMs deflated) and read back, by kind and index."""
    out = {}
    counts: dict[str, int] = {}
    for kind, ds in results.all():
        index = counts[kind] = counts.get(kind, -1) + 1
        out[f"{kind}{index}"] = roundtrip(ds, tmp_path, f"{kind}{index}")
    return out


def _check(source, source_path: Path, tmp_path: Path) -> None:
    inherited = inherited_vr_errors(source_path)
    results = build_results(
        [source], _prediction([source], [PROBS]), "STAT", _display(source), uid_seed="v1"
    )
    assert len(results.parametric_maps) == 1 and len(results.overlays) == 1
    written = _write_all(results, tmp_path)
    validated = []  # what dciodvfy and dcentvfy read

    for name, (path, stored) in written.items():
        kind = name.rstrip("0123456789")
        checked = path
        if kind == ResultKind.PM:
            assert stored.file_meta.TransferSyntaxUID == DEFLATED
            checked = explicit_copy(stored, tmp_path, f"{name}-explicit")
            assert stored.file_meta.TransferSyntaxUID == DEFLATED  # the copy's alone
        report = V.dciodvfy(checked)
        assert own_errors(report, inherited).ok, f"{name}: {report.summary()}"
        validated.append(checked)
        # Same study, same patient, the source's character set, identifiers verbatim.
        assert stored.StudyInstanceUID == source.StudyInstanceUID
        assert stored.get("SpecificCharacterSet") == source.get("SpecificCharacterSet")
        for keyword in IDENTIFIERS:
            if keyword in source:
                assert stored[keyword].value == source[keyword].value, (name, keyword)
        if kind == ResultKind.SR:
            _check_sr(source, path, stored)
        elif kind == ResultKind.PM:
            assert stored.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert (stored.Rows, stored.Columns) == (source.Rows, source.Columns)
            assert int(stored.NumberOfFrames) == 2
            plane = stored.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
            assert [float(v) for v in plane.ImageOrientationPatient] == GRID_PLANE
        else:
            assert stored.file_meta.TransferSyntaxUID == JPEG_BASELINE
            assert stored.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert stored.BurnedInAnnotation == "YES"
            assert max(stored.Rows, stored.Columns) == min(1024, max(source.Rows, source.Columns))
            assert stored.pixel_array.shape == (stored.Rows, stored.Columns, 3)

    entities = V.dcentvfy([source_path, *validated])
    assert entities.ok, entities.summary()
    assert entities.without(_known_entity_warning).clean, entities.summary()


def _check_sr(source, path: Path, stored) -> None:
    text = V.dsrdump(path)
    assert "Imaging Measurement Report" in text
    assert '(36118008,SCT,"Pneumothorax")' in text
    assert '(52101004,SCT,"Present")' in text
    assert '(PRIO-STAT,99DDN,"STAT priority")' in text
    html = V.dsr2html(path)
    assert "<html" in html.lower() and "Imaging Measurement Report" in html
    content = read_sr(stored)
    assert source.SOPInstanceUID in content.evidence
    assert content.library == (source.SOPInstanceUID,)
    for label in ("Pneumothorax", "Effusion"):
        assert content.findings[label].source_images == (source.SOPInstanceUID,)
    assert content.notes == {"Nodule": f"no heat map: {NO_MAP}"}


@V.skip_unless("dciodvfy", "dcentvfy", "dsrdump", "dsr2html")
@pytest.mark.parametrize("relative", REAL, ids=lambda p: Path(p).stem[:40])
def test_objects_from_real_headers_validate(relative, shared_data, tmp_path) -> None:
    path = shared_data / "dicom" / relative
    source = pydicom.dcmread(path, stop_before_pixels=True)
    _check(source, path, tmp_path)


@V.skip_unless("dciodvfy", "dcentvfy", "dsrdump", "dsr2html")
def test_objects_from_a_synthetic_header_validate(tmp_path) -> None:
    source = synthetic_source(rows=256, columns=200)
    source_path, _ = roundtrip(source, tmp_path, "source")
    _check(source, source_path, tmp_path)


@V.skip_unless("dciodvfy", "dcentvfy")
def test_a_map_on_the_source_plane_validates(tmp_path) -> None:
    source = synthetic_source(rows=128, columns=100)
    source.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.777"
    source.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    source.ImagePositionPatient = [-20.0, 0.0, 40.0]
    source.PixelSpacing = [0.2, 0.2]
    source_path, _ = roundtrip(source, tmp_path, "source")
    results = build_results([source], _prediction([source], [PROBS]), "HIGH", _display(source))
    (pm,) = results.parametric_maps
    assert pm.FrameOfReferenceUID == source.FrameOfReferenceUID
    pm_path = explicit_copy(pm, tmp_path, "pm")
    assert V.dciodvfy(pm_path).ok, V.dciodvfy(pm_path).summary()
    entities = V.dcentvfy([source_path, pm_path])
    assert entities.ok, entities.summary()


@V.skip_unless("dciodvfy", "dcentvfy", "dsrdump", "dsr2html")
def test_an_sr_without_findings_validates(tmp_path) -> None:
    source = synthetic_source()
    source_path, _ = roundtrip(source, tmp_path, "source")
    results = build_results(
        [source], _prediction([source], [NEGATIVE], demo=False), "ROUTINE", _display(source)
    )
    assert [kind for kind, _ in results.all()] == [ResultKind.SR]
    path, stored = roundtrip(results.sr, tmp_path, "sr")
    report = V.dciodvfy(path)
    assert report.ok, report.summary()
    assert "Imaging Measurements" in V.dsrdump(path)
    assert "Imaging Measurements" in V.dsr2html(path)
    assert read_sr(stored).groups == 1  # the whole image's, with the score
    entities = V.dcentvfy([source_path, path])
    assert entities.ok, entities.summary()


@V.skip_unless("dciodvfy", "dsr2html")
def test_an_sr_with_an_empty_imaging_measurements_validates(tmp_path) -> None:
    source = synthetic_source()
    prediction = _prediction([source], [NEGATIVE], demo=False)
    prediction.images = []  # no image scored: no group at all
    results = build_results([source], prediction, "ROUTINE", {})
    path, stored = roundtrip(results.sr, tmp_path, "sr")
    assert read_sr(stored).groups == 0
    report = V.dciodvfy(path)
    assert report.ok, report.summary()
    assert "Imaging Measurements" in V.dsr2html(path)


@V.skip_unless("dciodvfy", "dcentvfy")
def test_a_two_image_study_validates_as_a_whole(tmp_path) -> None:
    sources = same_study(2, rows=160, columns=128)
    paths = [roundtrip(s, tmp_path, f"source{i}")[0] for i, s in enumerate(sources)]
    results = build_results(
        sources,
        _prediction(sources, [PROBS, {"Pneumothorax": 0.7, "Effusion": 0.1, "Nodule": 0.1}]),
        "STAT",
        {**_display(sources[0]), **_display(sources[1])},
    )
    assert (len(results.parametric_maps), len(results.overlays)) == (2, 2)
    validated = []
    for name, (path, stored) in _write_all(results, tmp_path).items():
        checked = explicit_copy(stored, tmp_path, f"{name}-x") if name.startswith("pm") else path
        report = V.dciodvfy(checked)
        assert report.ok, f"{name}: {report.summary()}"
        validated.append(checked)
    entities = V.dcentvfy([*paths, *validated])
    assert entities.ok, entities.summary()
    assert entities.without(_known_entity_warning).clean, entities.summary()


@V.skip_unless("dciodvfy", "dsrdump")
def test_superseding_sr_validates_and_renders(tmp_path) -> None:
    source = synthetic_source()
    prediction = _prediction([source], [PROBS])
    first = build_results([source], prediction, "HIGH", _display(source), uid_seed="a")
    second = build_results(
        [source], prediction, "STAT", _display(source), predecessor=first.sr_reference, uid_seed="b"
    )
    path, stored = roundtrip(second.sr, tmp_path, "superseding")
    report = V.dciodvfy(path)
    assert report.ok, report.summary()
    V.dsrdump(path)
    assert read_sr(stored).predecessors == (SRReference.from_dataset(first.sr),)


# --- PixelMed (slow) ---------------------------------------------------------------------


def _first_sr():
    """Clinical, two images: several groups (PixelMed then checks TID 1501 rows), a
    point region (a CIRCLE), a finding without a map (a NUM of the whole image) and a
    caveat."""
    sources = same_study(2, rows=200, columns=160)
    prediction = _prediction(
        sources, [PROBS, {"Pneumothorax": 0.7, "Effusion": 0.1, "Nodule": 0.1}], demo=False
    )
    point = np.zeros((200, 160), np.float32)
    point[60, 90] = 1.0
    prediction.images[1].heatmaps["Pneumothorax"] = point
    prediction.heatmap_caveats["Effusion"] = "drawn on operator request without evidence"
    return sources, prediction


@pytest.mark.slow
@V.skip_unless("pixelmed")
def test_pixelmed_finds_nothing_in_first_superseding_and_demo_srs(tmp_path) -> None:
    sources, prediction = _first_sr()
    display = {**_display(sources[0]), **_display(sources[1])}
    first = build_results(sources, prediction, "STAT", display, uid_seed="px:1")
    content = read_sr(first.sr)
    shapes = [r.graphic_type for f in content.findings.values() for r in f.regions]
    assert sorted(shapes) == ["CIRCLE", "POLYLINE", "POLYLINE"]
    assert all("Nodule" in values for values in content.whole_image.values())
    # Re-opened by a late instance: one image, its frame and one finding.
    late = synthetic_source(study_uid=str(sources[0].StudyInstanceUID), rows=200, columns=160)
    again = prediction_for(
        [late], [{"Pneumothorax": 0.8, "Effusion": 0.1, "Nodule": 0.1}], demo=False
    )
    superseding = build_results(
        [late], again, "HIGH", _display(late), predecessor=first.sr_reference, uid_seed="px:2"
    )
    assert read_sr(superseding.sr).groups == 2
    demo_source = synthetic_source()
    demo = build_results(
        [demo_source], _prediction([demo_source], [PROBS]), "STAT", _display(demo_source)
    )
    assert read_sr(demo.sr).not_for_diagnostic_use

    for name, results in (("first", first), ("superseding", superseding), ("demo", demo)):
        path, _ = roundtrip(results.sr, tmp_path, name)
        report = V.pixelmed_sr(path)
        assert report.clean, f"{name}: {report.summary()}"


@pytest.mark.slow
@V.skip_unless("pixelmed")
def test_pixelmed_finds_nothing_in_an_sr_without_findings(tmp_path) -> None:
    """One group in all, the whole image's: PixelMed checks it against TID 1410."""
    source = synthetic_source()
    results = build_results(
        [source], _prediction([source], [NEGATIVE]), "ROUTINE", _display(source)
    )
    path, _ = roundtrip(results.sr, tmp_path, "negative")
    report = V.pixelmed_sr(path)
    assert report.clean, report.summary()
