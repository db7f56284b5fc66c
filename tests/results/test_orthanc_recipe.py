"""The Orthanc recipe of docs/integration.md, loaded exactly as documented: the shipped
snippet (deploy/orthanc/orthanc-ddn-node.json) merged into Orthanc's configuration with
the node's address in Host/Port, and the shipped Lua scripts installed where its
LuaScripts names them; the documented StableAge unchanged.

One study gives one analysis, however many times Orthanc finds it stable again (the node's
results arriving make it unstable, then stable again); a late image gives exactly one
superseding SR, and the superseded results are withdrawn from Orthanc (IOCM rejection
note). Even when an administrator sends the whole study, results included, to the node by
hand (the documented curl), nothing is analysed again. Orthanc commits to keeping what the
node sent (Storage Commitment).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from sqlalchemy import select
from support.artifacts import make_test_artifact
from support.dicomgen import make_cr
from support.net import free_port, wait_for
from support.orthanc import Orthanc, orthanc_available
from support.sr_reader import read_sr

from ddn_node.store.engine import make_database
from ddn_node.store.models import Delivery, Result, Study
from ddn_node.vocabulary import DeliveryState

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "deploy" / "orthanc"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"

pytestmark = pytest.mark.slow


def documented_config(node_port: int) -> dict[str, Any]:
    """The snippet as docs/integration.md says to install it: the node's address in
    Host/Port, the Lua scripts where LuaScripts names them (here: the shipped files)."""
    snippet = json.loads((RECIPE / "orthanc-ddn-node.json").read_text())
    node = snippet["DicomModalities"]["ddn-node"]
    node["Host"], node["Port"] = "127.0.0.1", node_port
    snippet["LuaScripts"] = [str(RECIPE / Path(p).name) for p in snippet["LuaScripts"]]
    return snippet


def documented_node_side(orthanc_dicom_port: int) -> dict[str, Any]:
    """The node's side of the recipe, the TOML block of docs/integration.md's Orthanc
    section, with the addresses of this machine."""
    doc = (REPO / "docs" / "integration.md").read_text()
    section = doc[doc.index("### Orthanc") : doc.index("### dcm4chee")]
    (block,) = re.findall(r"```toml\n(.*?)```", section, re.S)
    side = tomllib.loads(block)
    for peer in side["peers"]:
        peer["hosts"] = ["127.0.0.1"]
    for dest in side["destinations"]:
        dest["host"], dest["port"] = "127.0.0.1", orthanc_dicom_port
    return side


def _db(url: str) -> dict[str, Any]:
    db = make_database(url)
    try:
        with db.read() as s:
            return {
                "results": list(s.scalars(select(Result).order_by(Result.generation))),
                "studies": list(s.scalars(select(Study))),
                "pending": list(
                    s.scalars(
                        select(Delivery).where(
                            Delivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING])
                        )
                    )
                ),
            }
    finally:
        db.dispose()


KINDS = {
    "1.2.840.10008.5.1.4.1.1.88.34": "SR",
    "1.2.840.10008.5.1.4.1.1.30": "PM",
    "1.2.840.10008.5.1.4.1.1.7": "SC",
    "1.2.840.10008.5.1.4.1.1.88.59": "KO",
}


def _results_in_pacs(pacs: Orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """The node's objects in Orthanc, by kind."""
    out: dict[str, list[pydicom.Dataset]] = {}
    for ds in pacs.instance_datasets(study_uid):
        if str(ds.get("ManufacturerModelName", "")) == "ddn-node":
            out.setdefault(KINDS.get(str(ds.SOPClassUID), str(ds.SOPClassUID)), []).append(ds)
    return out


def _settled(pacs: Orthanc, db_url: str, generations: int) -> bool:
    """The node analysed ``generations`` times, delivered everything, and Orthanc has seen
    the study stable since (its forwarding script ran after the results arrived)."""
    db = _db(db_url)
    done = [r for r in db["results"] if r.completed_at is not None]
    if len(done) != generations or db["pending"]:
        return False
    study_id = pacs.find_study(db["studies"][0].study_uid) if db["studies"] else None
    return (
        bool(study_id)
        and bool(pacs.get(f"/studies/{study_id}")["IsStable"])
        and not _running_jobs(pacs)
    )


def _all_committed(db_url: str) -> bool:
    db = make_database(db_url)
    try:
        with db.read() as s:
            rows = list(s.scalars(select(Delivery).where(Delivery.state == DeliveryState.SENT)))
    finally:
        db.dispose()
    return bool(rows) and all(
        r.commitment == "committed" and r.committed_at is not None for r in rows
    )


def _running_jobs(pacs: Orthanc) -> bool:
    return any(
        pacs.get(f"/jobs/{job}")["State"] in ("Pending", "Running") for job in pacs.get("/jobs")
    )


def test_one_study_one_analysis_and_a_late_image_one_superseding_sr(
    make_node, sqlite_url: str, tmp_path: Path
) -> None:
    if not orthanc_available():
        pytest.skip("Orthanc (Debian package) not installed")
    node_port = free_port()
    model = make_test_artifact(tmp_path / "model", threshold=0.0)
    with Orthanc(
        tmp_path / "orthanc", node_port, extra_config=documented_config(node_port)
    ) as pacs:
        node = make_node(
            sqlite_url,
            roles=("scp", "worker"),
            node={"port": node_port},
            routing=[
                {"name": "cxr", "model": str(model), "head": "cxr", "modalities": ["CR", "DX"]}
            ],
            **documented_node_side(pacs.dicom_port),
            worker={"poll_interval_s": 0.2, "torch_threads": 2, "heat_maps": "all"},
            demo=True,
        )
        study_uid = "1.2.826.0.1.3680043.10.1.555"
        series_uid = study_uid + ".1"
        first = tmp_path / "first.dcm"
        make_cr(study_uid, series_uid=series_uid, size=64, seed=1).save_as(
            first, enforce_file_format=True
        )
        with node:
            pacs.upload(first)  # as a modality sends it
            wait_for(
                lambda: _settled(pacs, sqlite_url, 1),
                240,
                "one analysis, delivered, and Orthanc stable again",
            )
            ours = _results_in_pacs(pacs, study_uid)
            assert {k: len(v) for k, v in ours.items()} == {"SR": 1, "PM": 1, "SC": 1}
            # Orthanc offers Storage Commitment: every object it stored, it commits to keep.
            wait_for(
                lambda: _all_committed(sqlite_url), 120, "Orthanc's storage commitment reports"
            )

            # The documented manual push of the whole study, results included.
            orthanc_study = pacs.find_study(study_uid)
            httpx.post(
                f"{pacs.url}/modalities/ddn-node/store",
                json={"Resources": [orthanc_study]},
                timeout=120,
            ).raise_for_status()
            wait_for(lambda: _settled(pacs, sqlite_url, 1), 120, "the pushed study settled")
            assert not any(
                e.get("reopened") for e in node.events() if e.get("event") == "scp.instance_stored"
            )
            dropped = [e for e in node.events() if e.get("event") == "scp.result_dropped"]
            assert len(dropped) == sum(len(v) for v in ours.values())  # the node's own, recognised

            # A late image of the same study: analysed again, once; the old results withdrawn.
            late = tmp_path / "late.dcm"
            make_cr(study_uid, series_uid=series_uid, size=64, seed=2).save_as(
                late, enforce_file_format=True
            )
            pacs.upload(late)
            wait_for(lambda: _settled(pacs, sqlite_url, 2), 240, "the superseding analysis")
            wait_for(
                lambda: len(_results_in_pacs(pacs, study_uid).get("SR", [])) == 1,
                60,
                "the old SR withdrawn",
            )

        db = _db(sqlite_url)
        assert [r.generation for r in db["results"]] == [1, 2]
        (sr,) = _results_in_pacs(pacs, study_uid)["SR"]
        content = read_sr(sr)
        assert content.sop_instance_uid == db["results"][1].sr_sop_instance_uid
        assert [p.sop_instance_uid for p in content.predecessors] == [
            db["results"][0].sr_sop_instance_uid
        ]
        assert len(content.library) == 2  # both images analysed
        # The new SR, a map and an overlay per image, and the note that withdrew the old ones.
        kinds = {k: len(v) for k, v in _results_in_pacs(pacs, study_uid).items()}
        assert kinds == {"SR": 1, "PM": 2, "SC": 2, "KO": 1}
