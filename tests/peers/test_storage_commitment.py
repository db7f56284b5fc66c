"""Storage Commitment (PS3.4 J) against dcmjs-dimse as the destination's commitment SCP.

The peer answers each N-ACTION by first sending its N-EVENT-REPORT to the node, on a new
association, and only then its N-ACTION response: the report always arrives before the
node has finished recording the send. It commits the SR and declines the Parametric Map
(Failure Reason 0x0110). The node must still match the report to its objects; the
declined map stays visible (deliveries list, worklist summary) and
``ddn-node deliveries retry --uncommitted`` sends it again. (Orthanc, which commits what
it has, is covered by ``tests/results/test_orthanc_recipe.py``.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.artifacts import make_test_artifact
from support.deliveries import delivery_rows, delivery_summary
from support.net import free_port, wait_for
from support.peers import DcmjsStoreSCP, missing
from support.peers.dcmjs import dcmjs_send

from ddn_node.store.models import Delivery

REPO = Path(__file__).resolve().parents[2]
SAMPLE = sorted((REPO / "sample_studies" / "demo01").glob("*.dcm"))
PM = "1.2.840.10008.5.1.4.1.1.30"

pytestmark = pytest.mark.slow


def _answered(db_url: str) -> dict[str, Delivery] | None:
    rows = {r.kind: r for r in delivery_rows(db_url)}
    if {"sr", "pm", "sc"} <= set(rows) and all(
        r.state == "sent" and r.commitment in ("committed", "failed") for r in rows.values()
    ):
        return rows
    return None


def test_commitment_report_before_the_n_action_response_committed_and_declined(
    make_node, sqlite_url: str, tmp_path: Path
) -> None:
    reason = missing("dcmjs")
    if reason:
        pytest.skip(reason)
    model = make_test_artifact(tmp_path / "model", threshold=0.0)
    node_port = free_port()
    with DcmjsStoreSCP(
        tmp_path / "pacs",
        aet="PACS",
        commit_to=f"DDN_NODE@127.0.0.1:{node_port}",
        commit_fail=(PM,),
    ) as pacs:
        node = make_node(
            sqlite_url,
            roles=("scp", "worker"),
            node={"port": node_port},
            # The PACS reports back to the node: it must be an allowed peer.
            peers=[
                {"ae_title": "DCMJS_SCU", "hosts": ["127.0.0.1"]},
                {"ae_title": "PACS", "hosts": ["127.0.0.1"]},
            ],
            routing=[
                {"name": "cxr", "model": str(model), "head": "cxr", "modalities": ["CR", "DX"]}
            ],
            destinations=[
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
            ],
            worker={"poll_interval_s": 0.2, "torch_threads": 2, "heat_maps": "all"},
            delivery={"sweep_interval_s": 0.3},
            demo=True,
        )
        with node:
            run = dcmjs_send(
                node.port,
                SAMPLE,
                called="DDN_NODE",
                calling="DCMJS_SCU",
                log_path=tmp_path / "s.log",
            )
            assert all(r.ok for r in run.results), run.results
            rows = wait_for(lambda: _answered(sqlite_url), 180, "every commitment answered")
            assert rows["sr"].commitment == "committed" and rows["sr"].committed_at is not None
            assert rows["sc"].commitment == "committed"
            pm = rows["pm"]
            assert pm.commitment == "failed" and pm.committed_at is None
            assert "storage commitment failed: reason 0x0110" in pm.last_error
            # Every report was sent, and accepted by the node, before the N-ACTION answer.
            reports = pacs.events("commitment_reported")
            assert reports and all(e["status"] == 0 for e in reports), reports
            assert {e["transaction_uid"] for e in reports} == {
                r.commitment_uid for r in rows.values()
            }
            assert "commitment failed" in delivery_summary(sqlite_url)
            header, *lines = node.cli("deliveries", "list").stdout.splitlines()
            listed = [
                dict(zip(header.split("\t"), line.split("\t"), strict=True)) for line in lines
            ]
            assert {r["kind"]: r["commitment"] for r in listed} == {
                "sr": "committed",
                "pm": "failed",
                "sc": "committed",
            }

            stored_before = len(pacs.events("stored"))
            out = node.cli("deliveries", "retry", "--uncommitted")
            assert out.returncode == 0 and "1 delivery queued again" in out.stderr, out.stderr
            wait_for(
                lambda: len(pacs.events("commitment_reported")) > len(reports),
                120,
                "the declined map sent again and a new commitment asked",
            )
            assert len(pacs.events("stored")) == stored_before + 1
            again = wait_for(lambda: _answered(sqlite_url), 60, "the second answer recorded")
            assert again["pm"].commitment_uid != pm.commitment_uid
            assert again["sr"].commitment_uid == rows["sr"].commitment_uid  # untouched
