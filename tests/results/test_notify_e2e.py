"""The RIS and other systems hear about an analysed study through the node's delivery queue:
HL7 ORU over MLLP to a listener, FHIR Task and webhook to an HTTP endpoint; a refusing
receiver is retried until it accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from support.artifacts import make_test_artifact
from support.dicomgen import raw_association, store_file
from support.net import wait_for
from support.notify import HTTPReceiver, MLLPListener, ack_for, one_segment, parse_message

from ddn_node.store.engine import make_database
from ddn_node.store.models import Delivery, Study

pytestmark = pytest.mark.slow


def test_adapters_through_the_node(
    make_node, sqlite_url: str, repo_root: Path, tmp_path: Path
) -> None:
    model = make_test_artifact(tmp_path / "model", threshold=0.0)
    ris = MLLPListener(lambda message: ack_for(message, "AA"))
    fhir = HTTPReceiver(status=201)
    hook = HTTPReceiver(status=500)  # refuses at first
    try:
        node = make_node(
            sqlite_url,
            roles=("scp", "worker"),
            routing=[
                {"name": "cxr", "model": str(model), "head": "cxr", "modalities": ["CR", "DX"]}
            ],
            adapters={
                "hl7": {"enabled": True, "host": "127.0.0.1", "port": ris.port},
                "fhir": {"enabled": True, "url": fhir.url, "bearer_token": "s3cret"},
                "webhook": {"enabled": True, "url": hook.url},
            },
            delivery={
                "sweep_interval_s": 0.3,
                "backoff_initial_s": 0.3,
                "backoff_max_s": 0.6,
                "max_attempts": 50,
            },
            demo=True,
        )
        sample = repo_root / "sample_studies" / "demo01" / "demo01_PA.dcm"
        ds = pydicom.dcmread(sample, stop_before_pixels=True)
        with node:
            with raw_association(
                node.port, contexts=[(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))]
            ) as assoc:
                assert store_file(assoc, sample) == 0
            wait_for(
                lambda: ris.received and fhir.requests and len(hook.requests) >= 2,
                120,
                "all three receivers called",
            )
            hook.status = 200
            db = make_database(sqlite_url)
            try:

                def states() -> dict[str, str]:
                    with db.read() as s:
                        return {
                            d.destination: d.state
                            for d in s.scalars(
                                select(Delivery).where(
                                    Delivery.kind.in_(["hl7", "fhir", "webhook"])
                                )
                            )
                        }

                wait_for(lambda: set(states().values()) == {"sent"}, 60, "adapter deliveries sent")
                with db.read() as s:
                    study = s.scalars(select(Study)).one()
            finally:
                db.dispose()
    finally:
        ris.stop()
        fhir.stop()
        hook.stop()

    oru = parse_message(ris.received[0])
    assert one_segment(oru, "MSH").raw(9).startswith("ORU^R01")
    code = {"STAT": "S", "HIGH": "A", "ROUTINE": "R"}[study.priority]
    assert one_segment(oru, "TQ1").components(9)[0] == code
    task = json.loads(fhir.requests[0].body)
    assert (
        task["resourceType"] == "Task"
        and task["priority"]
        == {"STAT": "stat", "HIGH": "asap", "ROUTINE": "routine"}[study.priority]
    )
    assert fhir.requests[0].headers["authorization"] == "Bearer s3cret"
    bodies = [json.loads(r.body) for r in hook.requests]
    assert len({b["id"] for b in bodies}) == 1  # the retry is the same message
    assert (
        bodies[-1]["study_instance_uid"] == study.study_uid
        and bodies[-1]["priority"] == study.priority
    )
    log = node.log_path.read_text()
    assert "DEMO^ALPHA" not in log and "DEMO0001" not in log


def test_order_change_through_the_node_is_its_own_delivery_retried_after_ae(
    make_node, sqlite_url: str, repo_root: Path, tmp_path: Path
) -> None:
    model = make_test_artifact(tmp_path / "model", threshold=0.0)  # every study urgent
    refused_once: list[bytes] = []

    def respond(message: bytes) -> bytes:
        is_orm = one_segment(parse_message(message), "MSH").raw(9).startswith("ORM")
        if is_orm and not refused_once:
            refused_once.append(message)
            return ack_for(message, "AE", text="order locked")
        return ack_for(message, "AA")

    ris = MLLPListener(respond)
    try:
        node = make_node(
            sqlite_url,
            roles=("scp", "worker"),
            routing=[
                {"name": "cxr", "model": str(model), "head": "cxr", "modalities": ["CR", "DX"]}
            ],
            adapters={
                "hl7": {
                    "enabled": True,
                    "host": "127.0.0.1",
                    "port": ris.port,
                    "messages": ["oru", "orm"],
                }
            },
            delivery={"sweep_interval_s": 0.3, "backoff_initial_s": 0.3, "backoff_max_s": 0.6},
            demo=True,
        )
        sample = repo_root / "sample_studies" / "demo01" / "demo01_PA.dcm"
        ds = pydicom.dcmread(sample, stop_before_pixels=True)
        with node:
            with raw_association(
                node.port, contexts=[(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))]
            ) as assoc:
                assert store_file(assoc, sample) == 0
            db = make_database(sqlite_url)
            try:

                def states() -> dict[str, tuple[str, int]]:
                    with db.read() as s:
                        return {
                            d.destination: (d.state, d.attempts)
                            for d in s.scalars(
                                select(Delivery).where(Delivery.kind.in_(["hl7", "hl7_order"]))
                            )
                        }

                wait_for(
                    lambda: (
                        {state for state, _ in states().values()} == {"sent"} and len(states()) == 2
                    ),
                    120,
                    "ORU and ORM sent",
                )
                final = states()
            finally:
                db.dispose()
    finally:
        ris.stop()

    assert final["adapter:hl7"][1] == 1 and final["adapter:hl7_order"][1] == 2
    orms = [m for m in ris.received if m.startswith(b"MSH|^~\\&|DDN_NODE") and b"ORM^O01" in m]
    assert len(orms) == 2 and orms[0] == orms[1] == refused_once[0]  # the retry is the same
    orc = one_segment(parse_message(orms[0]), "ORC")
    assert orc.raw(1) == "XO" and orc.components(7)[5] in {"S", "A"}
    assert orc.raw(2) == str(ds.AccessionNumber)
