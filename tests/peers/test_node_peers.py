"""The real node against independent DICOM implementations (no pynetdicom on the far side):

- PixelMed StorageSOPClassSCU sends a sample study: every file is stored (rows, log), the
  node analyses it, and the SR and the Secondary Capture reach a PixelMed
  StorageSOPClassSCPDispatcher destination as parseable DICOM in the source study,
  referencing the source image (PixelMed takes uncompressed data only: the JPEG overlay
  arrives decompressed, with its own SOP Instance UID);
- dcmjs-dimse: C-ECHO and C-STORE into the node (0x0000 each), and the node's results
  arrive at a dcmjs-dimse receiver;
- DICOM TLS inbound (mutual): DCMTK echoscu / storescu with a client certificate from the
  node's CA get in; one from another CA is refused at the handshake
  (``scp.tls_handshake_failed``) and nothing is stored;
- DICOM TLS outbound: a destination over TLS (right CA, client certificate) gets the
  results from DCMTK storescp +tls; a storescp whose server certificate another CA signed
  gets nothing, and its delivery rows stay unsent with the error recorded.

The node runs the tiny test model (every finding positive) under the default heat-map
policy: the model records no localisation evidence, so it makes an SR and one overlay (SC)
per routed image, and no Parametric Map. The peer harnesses are in ``tests/support/peers``
(proved against each other in ``test_peer_harness.py``). Every wait is on a condition with
a generous timeout.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from support.net import free_port, wait_for
from support.peers import (
    DcmjsStoreSCP,
    DcmtkStoreSCP,
    PixelMedStoreSCP,
    Pki,
    dcmjs_send,
    echoscu_echo,
    make_pki,
    missing,
    pixelmed_send,
    port_listening,
    storescu_send,
)

from ddn_node.store.engine import make_database
from ddn_node.store.models import Delivery, Instance, Study

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sample_studies"
NODE_AET = "DDN_NODE"
SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: analysis + delivery of one tiny study on a busy 2-core machine (a JVM peer included)
RESULT_TIMEOUT_S = 180.0


def needs(*peers: str) -> pytest.MarkDecorator:
    reasons = [r for p in peers if (r := missing(p))]
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "available")


# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if reason := missing("tls"):
        pytest.skip(reason)
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """The tiny test artifact; threshold 0.0: every finding positive."""
    from support.artifacts import make_test_artifact

    return make_test_artifact(tmp_path / "model", threshold=0.0)


def study(name: str) -> list[Path]:
    files = sorted((SAMPLES / name).glob("*.dcm"))
    if not files:
        pytest.skip(f"sample study {SAMPLES / name} not there")
    return files


def header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def sop_uids(paths: Iterable[Path]) -> set[str]:
    return {str(header(p).SOPInstanceUID) for p in paths}


def analysing(
    model_dir: Path,
    destinations: list[dict[str, Any]],
    callers: Iterable[str],
) -> dict[str, Any]:
    """make_node overrides: the worker, routing to the test model, the given destinations,
    and the calling AE titles allowed in."""
    return {
        "peers": [{"ae_title": ae, "hosts": ["127.0.0.1"]} for ae in callers],
        "routing": [
            {
                "name": "chest-xray",
                "model": str(model_dir),
                "head": "cxr",
                "modalities": ["CR", "DX"],
                "body_parts": ["CHEST", ""],
                "views": ["PA", "AP", ""],
            }
        ],
        "destinations": destinations,
        # The default heat-map policy: the test model records no localisation evidence, so
        # no Parametric Map; the SR and one overlay (SC) per image are still made.
        "worker": {"poll_interval_s": 0.2, "torch_threads": 2},
        "demo": True,
    }


def destination(name: str, aet: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "ae_title": aet, "host": "127.0.0.1", "port": port, **extra}


def stored_instances(db_url: str) -> dict[str, str]:
    """SOP Instance UID -> calling AE, of every instance row in the node's database."""
    db = make_database(db_url)
    try:
        with db.read() as s:
            return {i.sop_instance_uid: i.calling_ae for i in s.scalars(select(Instance))}
    finally:
        db.dispose()


def deliveries(db_url: str, destination: str | None = None) -> list[Delivery]:
    db = make_database(db_url)
    try:
        with db.read() as s:
            stmt = select(Delivery)
            if destination is not None:
                stmt = stmt.where(Delivery.destination == destination)
            return list(s.scalars(stmt))
    finally:
        db.dispose()


def analysed(db_url: str) -> bool:
    """Every study analysed: its delivery rows are all recorded (phase 2 commits the heat-map
    objects' rows with the state)."""
    db = make_database(db_url)
    try:
        with db.read() as s:
            states = list(s.scalars(select(Study.state)))
            return bool(states) and all(state == "analysed" for state in states)
    finally:
        db.dispose()


def settled(db_url: str, destination: str) -> list[Delivery] | None:
    """The destination's delivery rows once the study is analysed and each row is sent or
    has failed at least twice (so a test fails in seconds, not after every retry)."""
    if not analysed(db_url):
        return None
    rows = deliveries(db_url, destination)
    done = all(r.state in ("sent", "failed") or r.attempts > 1 for r in rows)
    return rows if rows and done else None


def unsent(rows: Iterable[Delivery]) -> list[tuple[str, str, int, str]]:
    return [(r.kind, r.state, r.attempts, r.last_error) for r in rows if r.state != "sent"]


def logged(node: Any, event: str) -> list[dict[str, Any]]:
    return [e for e in node.events() if e.get("event") == event]


def evidence_uids(sr: pydicom.Dataset) -> set[str]:
    return {
        ref.ReferencedSOPInstanceUID
        for item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


# -- PixelMed -------------------------------------------------------------------------------


@needs("pixelmed")
def test_pixelmed_sends_study_and_receives_sr_and_sc(
    make_node, sqlite_url: str, model_dir: Path, tmp_path: Path
) -> None:
    files = study("demo01")
    source = header(files[0])
    with PixelMedStoreSCP(tmp_path / "pixelmed-scp", aet="PIXELMED") as pacs:
        node = make_node(
            sqlite_url,
            roles=("scp", "worker"),
            **analysing(
                model_dir,
                [destination("pixelmed", "PIXELMED", pacs.port, kinds=["sr", "sc"])],
                callers=["PIXELMED_SCU"],
            ),
        )
        with node:
            run = pixelmed_send(
                node.port,
                files,
                called=NODE_AET,
                calling="PIXELMED_SCU",
                log_path=tmp_path / "pixelmed-scu.log",
            )
            assert [r.ok for r in run.results] == [True] * len(files), run.results
            sent = sop_uids(files)
            # Stored: a row per file, from PixelMed, and the node says so in its log.
            assert stored_instances(sqlite_url) == dict.fromkeys(sent, "PIXELMED_SCU")
            assert {e["sop_instance_uid"] for e in logged(node, "scp.instance_stored")} == sent

            rows = wait_for(
                lambda: settled(sqlite_url, "pixelmed"),
                RESULT_TIMEOUT_S,
                "the deliveries to PixelMed to settle",
            )
            kinds = {r.kind: r for r in rows}  # one source image: one SR, one SC
            assert sorted(r.kind for r in rows) == ["sc", "sr"]
            assert kinds["sr"].state == "sent", unsent(rows)
            delivered = [r for r in rows if r.state == "sent"]
            received = pacs.wait_for_files(len(delivered))
        assert set(pacs.received_calling_aets()) == {NODE_AET}

    objects = [pydicom.dcmread(p) for p in received]  # parseable DICOM, pixel data and all
    assert {str(o.SOPInstanceUID) for o in objects} == {r.sop_instance_uid for r in delivered}
    assert all(o.StudyInstanceUID == source.StudyInstanceUID for o in objects)
    assert all(o.SOPInstanceUID not in sent for o in objects)
    sr = next(o for o in objects if o.SOPClassUID == SR_3D)
    assert evidence_uids(sr) == sent
    assert kinds["sc"].state == "sent", unsent(rows)
    sc = next(o for o in objects if o.SOPClassUID == SECONDARY_CAPTURE)
    assert {r.ReferencedSOPInstanceUID for r in sc.SourceImageSequence} == sent
    assert sc.pixel_array.shape[:2] == (sc.Rows, sc.Columns)


# -- dcmjs-dimse ----------------------------------------------------------------------------


@needs("dcmjs")
def test_dcmjs_echo_store_and_receive(
    make_node, sqlite_url: str, model_dir: Path, tmp_path: Path
) -> None:
    files = study("demo02")  # two images (PA and LL) on one association
    study_uid = header(files[0]).StudyInstanceUID
    with DcmjsStoreSCP(tmp_path / "dcmjs-scp", aet="DCMJS_SCP") as pacs:
        node = make_node(
            sqlite_url,
            roles=("scp", "worker"),
            **analysing(
                model_dir,
                [destination("dcmjs", "DCMJS_SCP", pacs.port)],
                callers=["DCMJS_SCU"],
            ),
        )
        with node:
            run = dcmjs_send(
                node.port,
                files,
                called=NODE_AET,
                calling="DCMJS_SCU",
                echo=True,
                log_path=tmp_path / "dcmjs-send.log",
            )
            assert run.association_accepted and run.network_error is None, run.events
            assert run.echo_status == 0x0000
            assert [(r.ok, r.status) for r in run.results] == [(True, 0x0000)] * len(files)
            sent = sop_uids(files)
            assert stored_instances(sqlite_url) == dict.fromkeys(sent, "DCMJS_SCU")

            rows = wait_for(
                lambda: settled(sqlite_url, "dcmjs"),
                RESULT_TIMEOUT_S,
                "the deliveries to dcmjs-dimse to settle",
            )
            assert not unsent(rows), unsent(rows)
            received = pacs.wait_for_files(len(rows))
        assert {e["calling"] for e in pacs.events("stored")} == {NODE_AET}

    objects = [pydicom.dcmread(p) for p in received]
    assert {str(o.SOPInstanceUID) for o in objects} == {r.sop_instance_uid for r in rows}
    assert {o.SOPClassUID for o in objects} == {SR_3D, SECONDARY_CAPTURE}
    assert all(o.StudyInstanceUID == study_uid for o in objects)
    sr = next(o for o in objects if o.SOPClassUID == SR_3D)
    assert evidence_uids(sr) and evidence_uids(sr) <= sent  # the routed (PA, not LL) image


# -- TLS --------------------------------------------------------------------------------------


@needs("tls")
def test_tls_inbound_right_ca_in_other_ca_refused(
    make_node, sqlite_url: str, pki: Pki, tmp_path: Path
) -> None:
    good, stranger = study("demo01"), study("demo04")
    tls_port = free_port()
    node = make_node(
        sqlite_url,
        node={
            "tls": {
                "enabled": True,
                "port": tls_port,
                "cert": str(pki.server.cert),
                "key": str(pki.server.key),
                "ca": str(pki.ca_cert),  # mutual TLS: clients need a certificate it signed
            }
        },
    )
    with node:
        wait_for(lambda: port_listening(tls_port), 30, "the node's TLS port")
        echo = echoscu_echo(
            tls_port, called=NODE_AET, tls=pki.client, log_path=tmp_path / "echo-ok.log"
        )
        assert echo.ok, echo.output
        run = storescu_send(
            tls_port, good, called=NODE_AET, tls=pki.client, log_path=tmp_path / "store-ok.log"
        )
        assert [(r.ok, r.status) for r in run.results] == [(True, 0x0000)] * len(good), run.output
        assert set(stored_instances(sqlite_url)) == sop_uids(good)
        assert not logged(node, "scp.tls_handshake_failed")

        # The other CA's client certificate (it trusts the node's CA, so only its own
        # certificate is wrong): refused at the handshake, before any association.
        bad_echo = echoscu_echo(
            tls_port, called=NODE_AET, tls=pki.other_client, log_path=tmp_path / "echo-bad.log"
        )
        assert not bad_echo.ok
        bad_store = storescu_send(
            tls_port,
            stranger,
            called=NODE_AET,
            tls=pki.other_client,
            log_path=tmp_path / "store-bad.log",
        )
        assert [(r.ok, r.status) for r in bad_store.results] == [(False, None)] * len(stranger)
        failures = wait_for(
            lambda: (f := logged(node, "scp.tls_handshake_failed")) and len(f) >= 2 and f,
            60,
            "the node to log both refused handshakes",
        )
        assert all(f["host"] == "127.0.0.1" for f in failures)
        assert any("certificate" in f.get("error", "").lower() for f in failures), failures
        # Still serving the right client afterwards.
        assert echoscu_echo(
            tls_port, called=NODE_AET, tls=pki.client, log_path=tmp_path / "echo-again.log"
        ).ok
    assert set(stored_instances(sqlite_url)) == sop_uids(good)  # nothing from the stranger
    # Only the right client's three associations (echo, store, echo again) got that far.
    accepted = [e["calling_ae"] for e in logged(node, "scp.association_accepted")]
    assert accepted == ["ECHOSCU", "STORESCU", "ECHOSCU"]


@needs("tls")
def test_tls_outbound_right_ca_delivered_other_ca_refused(
    make_node, sqlite_url: str, model_dir: Path, pki: Pki, tmp_path: Path
) -> None:
    files = study("demo01")
    client = {
        "tls": True,
        "tls_ca": str(pki.ca_cert),
        "tls_cert": str(pki.client.cert),
        "tls_key": str(pki.client.key),
    }
    with (
        # Requires a client certificate from the right CA: the node must present one.
        DcmtkStoreSCP(tmp_path / "tls-pacs", aet="TLS_PACS", tls=pki.server) as pacs,
        # Presents a server certificate the other CA signed (and would accept our client).
        DcmtkStoreSCP(tmp_path / "rogue", aet="ROGUE", tls=pki.other_server) as rogue,
    ):
        node = make_node(
            sqlite_url,
            roles=("scp", "worker"),
            **analysing(
                model_dir,
                [
                    destination("pacs", "TLS_PACS", pacs.port, **client),
                    destination("rogue", "ROGUE", rogue.port, **client),
                ],
                callers=["STORESCU"],
            ),
        )
        with node:
            run = storescu_send(node.port, files, called=NODE_AET, log_path=tmp_path / "in.log")
            assert [r.ok for r in run.results] == [True] * len(files), run.output

            rows = wait_for(
                lambda: settled(sqlite_url, "pacs"),
                RESULT_TIMEOUT_S,
                "the deliveries over TLS to settle",
            )
            assert not unsent(rows), unsent(rows)
            received = pacs.wait_for_files(len(rows))
            # The rogue's rows: tried (more than once: retries back off 0.5 s .. 2 s), never sent.
            refused = wait_for(
                lambda: (
                    (r := deliveries(sqlite_url, "rogue")) and min(a.attempts for a in r) > 1 and r
                ),
                RESULT_TIMEOUT_S,
                "two delivery attempts to the rogue storescp",
            )
            assert rogue.process is not None
            rogue.process.wait_until(
                lambda lines: any("alert unknown ca" in line for line in lines),
                60,
                "the rogue storescp to see the node refuse its certificate",
            )
        assert rogue.received_files() == []

    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in received} == {
        r.sop_instance_uid for r in rows
    }
    assert {r.kind for r in rows} >= {"sr"}
    # The rogue had the same objects queued, and none went: no status (no association) and
    # the error recorded on every row.
    assert {d.sop_instance_uid for d in refused} == {r.sop_instance_uid for r in rows}
    for d in refused:
        assert d.state != "sent" and d.sent_at is None and d.last_status is None
        # ... and says why: the rogue's certificate does not chain to the configured CA.
        assert d.last_error.startswith("TLS: the destination's certificate was refused")
        assert "issuer" in d.last_error
    # Why, in the node's log: the certificate verification of the rogue's server certificate.
    assert any("CERTIFICATE_VERIFY_FAILED" in e.get("event", "") for e in node.events()), (
        "the node logs the certificate verification failure"
    )
    failed = [e for e in logged(node, "scu.association_failed") if e.get("peer") == "ROGUE"]
    assert len(failed) >= 2
