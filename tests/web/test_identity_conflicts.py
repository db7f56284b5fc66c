"""The reported sequence, on a running node (SCP, worker and web; SQLite and PostgreSQL):
an allowed sender stores patient A's image, then patient B's image under the same SOP
Instance UID in B's study. B's is refused (0xC003, with an Error Comment), kept in
quarantine and listed for the administrator; A's study still holds A's image, the worker
analyses A's pixels, and A's page shows A's radiograph."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
from pydicom.uid import generate_uid
from sqlalchemy import select
from support.artifacts import make_test_artifact
from support.dicomgen import dataset_sha256, make_cr, raw_association, to_file_bytes
from support.net import free_port, wait_for
from web_helpers import FAST_HASHER, login

from ddn_node.store.engine import make_database
from ddn_node.store.models import AuditEvent, IdentityConflict, ImageResult, Instance, Result, Study
from ddn_node.web.images import ImageCache, dicom_thumbnail

ADMIN, RADIOLOGIST, PASSWORD = "pacs-admin", "reader", "a long enough test password"


def _write(path: Path, **kw: object) -> Path:
    path.write_bytes(to_file_bytes(make_cr(**kw)))  # type: ignore[arg-type]
    return path


def test_colliding_sop_instance_uid_cannot_show_one_patient_under_another(
    make_node, db_url: str, tmp_path: Path
) -> None:
    model = make_test_artifact(tmp_path / "model", threshold=0.0)
    web_port = free_port()
    node = make_node(
        db_url,
        roles=("scp", "worker", "web"),
        routing=[{"name": "cxr", "model": str(model), "head": "cxr", "modalities": ["CR"]}],
        web={
            "enabled": True,
            "port": web_port,
            "secret_key": secrets.token_urlsafe(32),
            "users": [
                {"name": ADMIN, "password_hash": FAST_HASHER.hash(PASSWORD), "role": "admin"},
                {"name": RADIOLOGIST, "password_hash": FAST_HASHER.hash(PASSWORD)},
            ],
        },
    )
    sop = generate_uid()
    study_a, study_b = generate_uid(), generate_uid()
    file_a = _write(tmp_path / "a.dcm", study_uid=study_a, sop_uid=sop, patient_id="PAT-A", seed=1)
    file_b = _write(tmp_path / "b.dcm", study_uid=study_b, sop_uid=sop, patient_id="PAT-B", seed=2)
    with node:
        with raw_association(node.port) as assoc:
            assert int(assoc.send_c_store(file_a).Status) == 0
            answer = assoc.send_c_store(file_b)
        assert int(answer.Status) == 0xC003
        assert answer.ErrorComment == "SOP Instance UID already stored in another study"

        db = make_database(db_url)
        try:

            def analysed() -> bool:
                with db.read() as s:
                    return s.scalar(select(Result.completed_at)) is not None

            wait_for(analysed, 120, "study A analysed")
            with db.read() as s:
                studies = s.scalars(select(Study.study_uid)).all()
                instance = s.scalars(select(Instance)).one()
                scored = s.scalars(select(ImageResult.instance_id)).all()
                conflict = s.scalars(select(IdentityConflict)).one()
                audited = s.scalars(
                    select(AuditEvent).where(AuditEvent.event == "instance.identity_conflict")
                ).one()
        finally:
            db.dispose()
        assert studies == [study_a]  # B's study was never created half-way
        # A's row still names A's bytes, and that is what the worker scored.
        assert instance.sha256 == dataset_sha256(file_a)
        assert dataset_sha256(node.spool / instance.path) == dataset_sha256(file_a)
        assert scored == [instance.id]
        # B's bytes are kept for the administrator, outside the studies.
        assert conflict.kind == "instance_in_other_study"
        assert (conflict.study_uid, conflict.existing_study_uid) == (study_b, study_a)
        assert conflict.path.startswith("quarantine/")
        assert dataset_sha256(node.spool / conflict.path) == dataset_sha256(file_b)
        assert audited.outcome == "failure" and audited.study_uid == study_a

        base = f"http://127.0.0.1:{web_port}"
        with httpx.Client(base_url=base, timeout=30) as reader:
            login(reader, RADIOLOGIST, PASSWORD)
            assert reader.get("/admin/conflicts").status_code == 403
            assert reader.get(f"/studies/{study_b}").status_code == 404
            page = reader.get(f"/studies/{study_a}")
            assert page.status_code == 200
            shown = reader.get(f"/studies/{study_a}/instances/{sop}/thumbnail.png")
            assert shown.status_code == 200
            cache = ImageCache()
            assert shown.content == dicom_thumbnail(cache, file_a)  # A's radiograph ...
            assert shown.content != dicom_thumbnail(cache, file_b)  # ... not B's
        with httpx.Client(base_url=base, timeout=30) as admin:
            login(admin, ADMIN, PASSWORD)
            listing = admin.get("/admin/conflicts")
            assert listing.status_code == 200
            assert sop in listing.text and study_a in listing.text and study_b in listing.text
            assert "already stored in another study" in listing.text

    listed = node.cli("conflicts", "list")
    assert listed.returncode == 0 and "1 open conflict(s)" in listed.stdout
    discarded = node.cli("conflicts", "discard", str(conflict.id), "--by", ADMIN)
    assert discarded.returncode == 0, discarded.stderr
    assert not (node.spool / conflict.path).exists()
    assert "0 open conflict(s)" in node.cli("conflicts", "list").stdout
