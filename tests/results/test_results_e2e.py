"""Results back in the PACS, end to end against Orthanc.

Orthanc sends chest studies to the node; the SR, Parametric Map and Secondary Capture
objects come back into the same studies, reference the source instances, say what the
node's database says, and pass dciodvfy. Orthanc down: deliveries wait and succeed later,
nothing twice. A late instance yields a superseding SR.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from results.conftest import worker_config
from sqlalchemy import select
from support.deliveries import all_delivered
from support.dicomgen import make_cr, raw_association, store_file, to_file_bytes
from support.net import wait_for
from support.orthanc import Orthanc
from support.sr_reader import read_sr

from ddn_node.store.engine import make_database
from ddn_node.store.models import Delivery, Result, Study

pytestmark = pytest.mark.slow

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _results_in(pacs: Orthanc, study_uid: str, sr_count: int = 1) -> list[pydicom.Dataset] | None:
    objs = pacs.instance_datasets(study_uid)
    srs = [d for d in objs if d.SOPClassUID == SR_CLASS]
    return objs if len(srs) >= sr_count else None


def _db_results(db_url: str) -> dict[str, tuple[Result, list[Delivery]]]:
    db = make_database(db_url)
    try:
        with db.read() as s:
            out = {}
            for study in s.scalars(select(Study)):
                result = s.scalars(
                    select(Result)
                    .where(Result.study_id == study.id)
                    .order_by(Result.generation.desc())
                ).first()
                deliveries = list(s.scalars(select(Delivery).where(Delivery.study_id == study.id)))
                out[study.study_uid] = (result, deliveries)
            return out
    finally:
        db.dispose()


def _dciodvfy_errors(ds: pydicom.Dataset, tmp: Path) -> list[str]:
    path = tmp / f"{ds.SOPInstanceUID}.dcm"
    # dciodvfy reads no deflated file (the Parametric Maps travel deflated).
    if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        ds = copy.deepcopy(ds)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def test_orthanc_round_trip(
    make_node,
    sqlite_url: str,
    pacs: Orthanc,
    model_dir: Path,
    shared_data: Path,
    repo_root: Path,
    tmp_path: Path,
) -> None:
    node = make_node(sqlite_url, roles=("scp", "worker"), **worker_config(model_dir, pacs))
    chest = (
        shared_data
        / "dicom"
        / "chest_xray_real"
        / "txv__1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    )
    sample = repo_root / "sample_studies" / "demo02"
    with node:
        uploaded = [pacs.upload(chest)] + [pacs.upload(p) for p in sorted(sample.glob("*.dcm"))]
        sources = {
            pacs.get(f"/instances/{u['ID']}")["MainDicomTags"]["SOPInstanceUID"] for u in uploaded
        }
        study_uids = {pydicom.dcmread(chest, stop_before_pixels=True).StudyInstanceUID}
        study_uids |= {
            pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID
            for p in sample.glob("*.dcm")
        }
        pacs.send_to_node(sorted({u["ParentStudy"] for u in uploaded}))

        wait_for(lambda: all_delivered(sqlite_url, len(study_uids)), 180, "every result delivered")
        db_rows = _db_results(sqlite_url)
        returned = {uid: pacs.instance_datasets(uid) for uid in study_uids}

    for study_uid, objects in returned.items():
        result, deliveries = db_rows[study_uid]
        assert result is not None
        ours = [
            d
            for d in objects
            if d.SOPClassUID in (SR_CLASS, PM_CLASS, SC_CLASS) and d.SOPInstanceUID not in sources
        ]
        assert {d.SOPInstanceUID for d in ours} == {d.sop_instance_uid for d in deliveries}, (
            "delivered exactly what the DB lists"
        )
        assert all(d.StudyInstanceUID == study_uid for d in ours)
        sr = next(d for d in ours if d.SOPClassUID == SR_CLASS)
        content = read_sr(sr)
        assert content.priority == result.priority
        # The SR gives percentages to one decimal.
        assert content.abnormality_score == pytest.approx(result.abnormality_score, abs=5e-4)
        assert set(content.findings) == set(result.probabilities)
        for label, finding in content.findings.items():
            assert finding.probability == pytest.approx(result.probabilities[label], abs=5e-4)
            assert finding.present == (label in result.positive)
        assert content.not_for_diagnostic_use
        # References resolve to the source instances in the PACS.
        evidence = {
            ref.ReferencedSOPInstanceUID
            for item in sr.CurrentRequestedProcedureEvidenceSequence
            for s in item.ReferencedSeriesSequence
            for ref in s.ReferencedSOPSequence
        }
        assert evidence and evidence <= sources
        for obj in ours:
            if obj.SOPClassUID in (PM_CLASS, SC_CLASS):
                refs = {r.ReferencedSOPInstanceUID for r in obj.get("SourceImageSequence", [])} | {
                    r.ReferencedSOPInstanceUID
                    for fg in obj.get("SharedFunctionalGroupsSequence", [])
                    for d in fg.get("DerivationImageSequence", [])
                    for r in d.SourceImageSequence
                }
                assert refs and refs <= sources
            assert _dciodvfy_errors(obj, tmp_path) == [], obj.SOPClassUID
    # The lateral view of the PA + lateral study is stored but not scored.
    two_view = pydicom.dcmread(sample / "demo02_PA.dcm", stop_before_pixels=True).StudyInstanceUID
    sr = next(d for d in returned[two_view] if d.SOPClassUID == SR_CLASS)
    scored = set(read_sr(sr).library)
    pa_uid = pydicom.dcmread(sample / "demo02_PA.dcm", stop_before_pixels=True).SOPInstanceUID
    assert scored == {pa_uid}


def _send_sample(port: int, path: Path) -> int | None:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    with raw_association(
        port, contexts=[(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))]
    ) as assoc:
        return store_file(assoc, path)


def test_pacs_down_then_back(
    make_node, sqlite_url: str, pacs: Orthanc, model_dir: Path, repo_root: Path
) -> None:
    node = make_node(
        sqlite_url,
        roles=("scp", "worker"),
        **worker_config(
            model_dir,
            pacs,
            delivery={
                "sweep_interval_s": 0.3,
                "backoff_initial_s": 0.5,
                "backoff_max_s": 1.5,
                "max_attempts": 50,
                "timeout_s": 5,
            },
        ),
    )
    sample = repo_root / "sample_studies" / "demo01" / "demo01_PA.dcm"
    study_uid = str(pydicom.dcmread(sample, stop_before_pixels=True).StudyInstanceUID)
    pacs.stop()
    with node:
        assert _send_sample(node.port, sample) == 0

        # Deliveries fail and back off while the PACS is away, visible as pending with the error.
        def retried() -> bool:
            _result, deliveries = _db_results(sqlite_url).get(study_uid, (None, []))
            return bool(deliveries) and all(
                d.state == "pending" and d.attempts >= 2 and d.last_error for d in deliveries
            )

        wait_for(retried, 180, "deliveries retrying while the PACS is down")
        pacs.start()
        wait_for(lambda: all_delivered(sqlite_url), 120, "all sent")
        _result, deliveries = _db_results(sqlite_url)[study_uid]
        objects = pacs.instance_datasets(study_uid)
    ours = [
        d
        for d in objects
        if d.SOPInstanceUID != pydicom.dcmread(sample, stop_before_pixels=True).SOPInstanceUID
    ]
    assert len(ours) == len(deliveries)  # each object once in the PACS
    assert len({d.SOPInstanceUID for d in ours}) == len(ours)
    assert any(e.get("event") == "delivery.retry_scheduled" for e in node.events())


def test_late_instance_supersedes_the_sr(
    make_node, sqlite_url: str, pacs: Orthanc, model_dir: Path, repo_root: Path, tmp_path: Path
) -> None:
    node = make_node(sqlite_url, roles=("scp", "worker"), **worker_config(model_dir, pacs))
    first = repo_root / "sample_studies" / "demo04" / "demo04_PA.dcm"
    study = pydicom.dcmread(first)
    study_uid = str(study.StudyInstanceUID)
    # The same patient (another Patient ID would be refused: 0xC003, an identity conflict).
    late = make_cr(
        study_uid,
        size=256,
        seed=3,
        view="AP",
        patient_id=str(study.PatientID),
        patient_name=str(study.PatientName),
    )
    late_path = tmp_path / "late.dcm"
    late_path.write_bytes(to_file_bytes(late))
    with node:
        assert _send_sample(node.port, first) == 0
        objs = wait_for(lambda: _results_in(pacs, study_uid), 180, "first SR")
        first_sr = next(d for d in objs if d.SOPClassUID == SR_CLASS)
        _mark_read(sqlite_url, study_uid)  # the radiologist read it
        assert _send_sample(node.port, late_path) == 0
        objs = wait_for(lambda: _results_in(pacs, study_uid, sr_count=2), 180, "superseding SR")
    srs = [d for d in objs if d.SOPClassUID == SR_CLASS]
    second = next(d for d in srs if d.SOPInstanceUID != first_sr.SOPInstanceUID)
    predecessors = {
        ref.ReferencedSOPInstanceUID
        for item in second.PredecessorDocumentsSequence
        for series in item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert predecessors == {first_sr.SOPInstanceUID}
    # New images and new results: back on the radiologist's unread list.
    db = make_database(sqlite_url)
    try:
        with db.read() as s:
            study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one()
    finally:
        db.dispose()
    assert study.read_status == "unread" and study.generation == 2


def _mark_read(db_url: str, study_uid: str) -> None:
    from ddn_node.pipeline.worklist import set_read_status
    from ddn_node.vocabulary import ReadStatus

    db = make_database(db_url)
    try:
        set_read_status(db, study_uid, ReadStatus.READ, user="dr.test")
    finally:
        db.dispose()
