"""Refusals are understood: what a destination refuses is never retried, what it can take
still goes, and the worklist, the study page and ``ddn-node deliveries list`` say which
object reached which destination.

- CTN (``simple_storage``), a legacy archive whose compiled-in SOP classes lack the
  Comprehensive 3D SR and the Parametric Map: it refuses their presentation contexts. The
  SR and the map are refused once and never sent again; the overlay arrives.
- dcmjs-dimse answering failure statuses: 0xA900 (data set does not match SOP class)
  is refused at once; 0xA700 (out of resources) is deferred and tried again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.artifacts import make_test_artifact
from support.deliveries import delivery_rows, delivery_summary
from support.net import wait_for
from support.peers import CtnStoreSCP, DcmjsStoreSCP, missing
from support.peers.dcmjs import dcmjs_send

from ddn_node.store.models import Delivery

REPO = Path(__file__).resolve().parents[2]
SAMPLE = sorted((REPO / "sample_studies" / "demo01").glob("*.dcm"))
SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
PM = "1.2.840.10008.5.1.4.1.1.30"

pytestmark = pytest.mark.slow


def _needs(peer: str) -> None:
    reason = missing(peer)
    if reason:
        pytest.skip(reason)


def _config(model: Path, name: str, aet: str, port: int) -> dict[str, Any]:
    return {
        "peers": [{"ae_title": "DCMJS_SCU", "hosts": ["127.0.0.1"]}],
        "routing": [
            {"name": "cxr", "model": str(model), "head": "cxr", "modalities": ["CR", "DX"]}
        ],
        "destinations": [{"name": name, "ae_title": aet, "host": "127.0.0.1", "port": port}],
        # A map for every finding: every kind of result object goes to the destination.
        "worker": {"poll_interval_s": 0.2, "torch_threads": 2, "heat_maps": "all"},
        "delivery": {
            "sweep_interval_s": 0.3,
            "backoff_initial_s": 0.3,
            "backoff_max_s": 1,
            "max_attempts": 50,
        },
        "demo": True,
    }


def _send_study(port: int, tmp: Path) -> None:
    run = dcmjs_send(
        port, SAMPLE, called="DDN_NODE", calling="DCMJS_SCU", log_path=tmp / "send.log"
    )
    assert all(r.ok for r in run.results), run.results


def test_a_legacy_archive_refuses_3d_sr_and_pm_and_gets_the_overlay(
    make_node, sqlite_url: str, tmp_path: Path
) -> None:
    _needs("ctn")
    _needs("dcmjs")
    model = make_test_artifact(tmp_path / "model", threshold=0.0)
    with CtnStoreSCP(tmp_path / "ctn") as archive:
        node = make_node(
            sqlite_url,
            roles=("scp", "worker"),
            **_config(model, "archive", archive.aet, archive.port),
        )
        with node:
            _send_study(node.port, tmp_path)

            def decided() -> list[Delivery] | None:
                rows = delivery_rows(sqlite_url)
                kinds = {r.kind for r in rows}
                done = all(r.state in ("sent", "refused", "failed") for r in rows)
                return rows if {"sr", "pm", "sc"} <= kinds and done else None

            rows = wait_for(decided, 180, "every result sent or refused")
            by_kind = {r.kind: r for r in rows}
            assert by_kind["sr"].state == "refused" and by_kind["pm"].state == "refused"
            assert "no presentation context" in by_kind["sr"].last_error
            assert by_kind["sc"].state == "sent"
            # Refused once: not retried while the node keeps sweeping.
            wait_for(lambda: node.cli("deliveries", "list").returncode == 0, 60, "the CLI")
            assert {r.kind: r.attempts for r in delivery_rows(sqlite_url)}["sr"] == 1
            listing = node.cli("deliveries", "list").stdout
            assert "refused" in listing and "sent" in listing
        assert {str(p.name) for p in archive.received_files()}  # the overlay is there
        assert SR_3D in archive.refused_sop_classes() and PM in archive.refused_sop_classes()
    summary = delivery_summary(sqlite_url)
    assert "SC sent" in summary and "refused" in summary and "SR" in summary, summary


@pytest.mark.parametrize(("status", "refused"), [(0xA900, True), (0xA700, False)])
def test_failure_statuses_refused_or_deferred(
    make_node, sqlite_url: str, tmp_path: Path, status: int, refused: bool
) -> None:
    _needs("dcmjs")
    model = make_test_artifact(tmp_path / "model", threshold=0.0)
    # Every SR gets the status; the other objects are stored.
    with DcmjsStoreSCP(tmp_path / "pacs", aet="PACS", fail={SR_3D: status}) as pacs:
        node = make_node(
            sqlite_url, roles=("scp", "worker"), **_config(model, "pacs", pacs.aet, pacs.port)
        )
        with node:
            _send_study(node.port, tmp_path)

            def sr_row() -> Delivery | None:
                rows = [r for r in delivery_rows(sqlite_url) if r.kind == "sr"]
                if not rows:
                    return None
                row = rows[0]
                if refused:
                    return row if row.state == "refused" else None
                return row if row.attempts >= 3 else None  # deferred: tried again and again

            row = wait_for(sr_row, 180, "the SR's fate")
            assert row.last_status == status
            if refused:
                assert row.attempts == 1
            else:
                assert row.state in ("pending", "sending") and row.sent_at is None
            others = wait_for(
                lambda: (
                    [r for r in delivery_rows(sqlite_url) if r.kind != "sr" and r.state == "sent"]
                    or None
                ),
                180,
                "the other objects stored",
            )
            assert {r.kind for r in others} == {"pm", "sc"}
        assert len(pacs.refused()) >= (1 if refused else 3)
