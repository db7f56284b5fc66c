"""Every object type, built from real source headers, passes dciodvfy; dsrdump renders the SR.

Sources: the real chest radiographs of ``../shared/data/dicom/chest_xray_real`` (varied and
partly invalid headers), the character-set edge cases (Cyrillic, ISO 2022 Japanese, UTF-8)
and a synthetic DX header. dciodvfy must report no error of ours; the only errors allowed
are VR errors of identifiers that the source itself carries and that we copy verbatim on
purpose (see ``ddn_node/dicom/results/content.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from results_factories import (
    inherited_vr_errors,
    own_errors,
    prediction_for,
    roundtrip,
    synthetic_source,
)
from support.sr_reader import read_sr

from ddn_node.dicom.results import SRReference, build_results

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
PROBS = {"Pneumothorax": 0.91, "Effusion": 0.12, "Nodule": 0.05}


def _display(ds) -> dict[str, np.ndarray]:
    rows, columns = int(ds.Rows), int(ds.Columns)
    ramp = np.linspace(0.1, 0.9, columns, dtype=np.float32)[None, :].repeat(rows, axis=0)
    return {str(ds.SOPInstanceUID): ramp}


def _check(source, source_path: Path | None, tmp_path: Path, dicom3tools, dsrdump) -> None:
    inherited = inherited_vr_errors(source_path) if source_path is not None else set()
    prediction = prediction_for([source], [PROBS])
    results = build_results([source], prediction, "STAT", _display(source), uid_seed="v1")
    assert len(results.parametric_maps) == 1 and len(results.overlays) == 1

    for kind, ds in results.all():
        path, stored = roundtrip(ds, tmp_path, f"{kind}")
        errors, _ = dicom3tools(path)
        assert own_errors(errors, inherited) == [], f"{kind}: {errors}"
        # Same study, same patient, the source's character set.
        assert stored.StudyInstanceUID == source.StudyInstanceUID
        assert stored.get("SpecificCharacterSet") == source.get("SpecificCharacterSet")
        for keyword in IDENTIFIERS:
            if keyword in source:
                assert stored[keyword].value == source[keyword].value, (kind, keyword)
        if kind == "sr":
            text = dsrdump(path)
            assert "Imaging Measurement Report" in text
            assert '(36118008,SCT,"Pneumothorax")' in text
            assert '(52101004,SCT,"Present")' in text
            assert '(PRIO-STAT,99DDN,"STAT priority")' in text
            content = read_sr(stored)
            assert source.SOPInstanceUID in content.evidence
            assert content.findings["Pneumothorax"].source_images == (source.SOPInstanceUID,)
        elif kind == "pm":
            assert stored.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            # The source's grid, or a coarser one of at most 512 pixels with the same extent.
            scale = max(1.0, max(source.Rows, source.Columns) / 512)
            assert (stored.Rows, stored.Columns) == (
                round(source.Rows / scale),
                round(source.Columns / scale),
            )
        else:
            assert stored.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert stored.BurnedInAnnotation == "YES"


@pytest.mark.parametrize("relative", REAL, ids=lambda p: Path(p).stem[:40])
def test_objects_from_real_headers_validate(
    relative, shared_data, tmp_path, dicom3tools, dsrdump
) -> None:
    path = shared_data / "dicom" / relative
    source = pydicom.dcmread(path, stop_before_pixels=True)
    _check(source, path, tmp_path, dicom3tools, dsrdump)


def test_objects_from_a_synthetic_header_validate(tmp_path, dicom3tools, dsrdump) -> None:
    _check(synthetic_source(rows=256, columns=200), None, tmp_path, dicom3tools, dsrdump)


def test_superseding_sr_validates_and_renders(tmp_path, dicom3tools, dsrdump) -> None:
    source = synthetic_source()
    prediction = prediction_for([source], [PROBS])
    first = build_results([source], prediction, "HIGH", _display(source), uid_seed="a")
    second = build_results(
        [source], prediction, "STAT", _display(source), predecessor=first.sr_reference, uid_seed="b"
    )
    path, stored = roundtrip(second.sr, tmp_path, "superseding")
    errors, _ = dicom3tools(path)
    assert errors == []
    dsrdump(path)
    assert read_sr(stored).predecessors == (SRReference.from_dataset(first.sr),)
