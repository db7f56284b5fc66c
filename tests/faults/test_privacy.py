"""No patient name, patient ID, birth date or accession number in any log line, after a
full run: ingest, analysis, delivery to the PACS, HL7/webhook notifications, and the web
API (worklist, study page, status change, a failed login)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from support.artifacts import make_test_artifact
from support.dicomgen import make_cr, raw_association, store_file, to_file_bytes
from support.net import free_port, wait_for
from support.notify import HTTPReceiver, MLLPListener, ack_for
from support.orthanc import Orthanc, orthanc_available

from ddn_node.store.engine import make_database
from ddn_node.store.models import Delivery

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed"),
]

SECRETS = {
    "name": "Zyxwvut^Quintessa",
    "family": "Zyxwvut",
    "patient_id": "PID-9988776655",
    "birth_date": "19410203",
    "accession": "ACCX-55443322",
}
# Not a guessable token: outside a demo the node refuses to start with one.
TOKEN = "privacy-test-token-5f1c0a9e"
TOKEN_SHA = hashlib.sha256(TOKEN.encode()).hexdigest()


def test_full_run_logs_carry_no_patient_data(make_node, sqlite_url: str, tmp_path: Path) -> None:
    model = make_test_artifact(tmp_path / "model", threshold=0.0)
    web_port = free_port()
    ris = MLLPListener(lambda m: ack_for(m, "AA"))
    hook = HTTPReceiver(status=200)
    node = make_node(
        sqlite_url,
        roles=("scp", "worker", "web"),
        routing=[{"name": "cxr", "model": str(model), "head": "cxr", "modalities": ["CR"]}],
        adapters={
            "hl7": {"enabled": True, "port": ris.port},
            "webhook": {"enabled": True, "url": hook.url},
        },
        web={
            "enabled": True,
            "port": web_port,
            "tokens": [{"name": "t", "sha256": TOKEN_SHA, "scopes": ["read", "worklist:write"]}],
        },
        logging={"level": "DEBUG", "json": True},
    )
    pacs = Orthanc(tmp_path / "orthanc", node.port)
    node.config["destinations"] = [
        {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}
    ]
    node.__post_init__()
    ds = make_cr(
        "1.2.826.0.1.3680043.8.498.3141",
        patient_name=SECRETS["name"],
        patient_id=SECRETS["patient_id"],
        accession=SECRETS["accession"],
    )
    ds.PatientBirthDate = SECRETS["birth_date"]
    path = tmp_path / "phi.dcm"
    path.write_bytes(to_file_bytes(ds))
    try:
        with pacs, node:
            with raw_association(node.port) as assoc:
                assert store_file(assoc, path) == 0
            db = make_database(sqlite_url)
            try:

                def delivered() -> bool:
                    with db.read() as s:
                        rows = list(s.scalars(select(Delivery)))
                    return bool(rows) and all(d.state == "sent" for d in rows)

                wait_for(delivered, 180, "results and notifications delivered")
            finally:
                db.dispose()
            base = f"http://127.0.0.1:{web_port}"
            auth = {"Authorization": f"Bearer {TOKEN}"}
            page = httpx.get(f"{base}/api/worklist", headers=auth, timeout=30).json()
            assert page["rows"][0]["patient_name"] == SECRETS["name"]  # shown to the radiologist...
            uid = page["rows"][0]["study_uid"]
            assert (
                httpx.get(f"{base}/api/studies/{uid}", headers=auth, timeout=30).status_code == 200
            )
            assert (
                httpx.post(
                    f"{base}/api/studies/{uid}/status",
                    headers=auth,
                    json={"status": "read"},
                    timeout=30,
                ).status_code
                == 200
            )
            httpx.post(
                f"{base}/login",
                data={"username": SECRETS["patient_id"], "password": "x"},
                timeout=30,
            )
    finally:
        ris.stop()
        hook.stop()
    logs = "\n".join(p.read_text(errors="replace") for p in node.tmp.glob("*.log"))
    assert (
        "scp.instance_stored" in logs
        and "worker.study_analysed" in logs
        and "delivery.sent" in logs
    )
    for what, value in SECRETS.items():  # ... but never written to a log
        assert value not in logs, f"{what} found in the logs"
