"""A real PACS (Orthanc 1.10) pushes studies to the node through its REST API, and DCMTK
storescu sends the sample studies; both land as studies with the worklist's attributes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select
from support.net import wait_for
from support.orthanc import Orthanc, orthanc_available

from ddn_node.store.engine import make_database
from ddn_node.store.models import Instance, Study

pytestmark = pytest.mark.skipif(
    not orthanc_available(), reason="Orthanc (Debian package) not installed"
)


def test_orthanc_pushes_a_study(
    make_node, db_url: str, shared_data: Path, repo_root: Path, tmp_path: Path
) -> None:
    node = make_node(db_url)
    with node, Orthanc(tmp_path / "orthanc", node.port) as pacs:
        chest = sorted((shared_data / "dicom" / "chest_xray_real").glob("*.dcm"))
        samples = sorted((repo_root / "sample_studies").rglob("*.dcm"))
        uploaded = [pacs.upload(p) for p in [*chest, *samples]]
        study_ids = sorted({u["ParentStudy"] for u in uploaded})
        job = pacs.send_to_node(study_ids)
        assert job.get("FailedInstancesCount", 0) == 0, job
        expected = {
            pacs.get(f"/instances/{u['ID']}")["MainDicomTags"]["SOPInstanceUID"] for u in uploaded
        }

    db = make_database(db_url)
    try:
        with db.read() as s:
            got = {i.sop_instance_uid for i in s.scalars(select(Instance))}
            studies = {st.study_uid: st for st in s.scalars(select(Study))}
    finally:
        db.dispose()
    assert expected == got
    assert len(studies) == len(study_ids)
    assert all(st.calling_ae == "ORTHANC" for st in studies.values())
    two_view = [st for st in studies.values() if st.num_instances == 2]
    assert two_view and two_view[0].patient_name == "DEMO^BRAVO"


def test_storescu_sends_the_sample_studies(make_node, sqlite_url: str, repo_root: Path) -> None:
    node = make_node(sqlite_url)
    with node:
        result = subprocess.run(
            [
                "storescu",
                "-aet",
                "STORESCU",
                "-aec",
                "DDN_NODE",
                "-R",
                "-xv",
                "+sd",
                "+r",
                "-nh",
                "127.0.0.1",
                str(node.port),
                str(repo_root / "sample_studies"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        n_files = len(list((repo_root / "sample_studies").rglob("*.dcm")))
        db = make_database(sqlite_url)
        try:

            def count() -> int:
                with db.read() as s:
                    return len(list(s.scalars(select(Instance.id))))

            wait_for(lambda: count() == n_files, 10, "all sample instances")
        finally:
            db.dispose()
