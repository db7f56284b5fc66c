"""The independent-peer harnesses work, proved against each other (never against ddn-node):

- PixelMed SCU -> DCMTK storescp, DCMTK storescu -> PixelMed SCP;
- dcmjs-dimse sender -> dcmjs-dimse receiver and -> storescp; storescu -> dcmjs receiver;
- a dcmjs receiver that answers chosen failure statuses / refuses contexts / rejects
  associations, as seen by storescu, dcmjs and PixelMed senders;
- CTN simple_storage as a legacy archive: SC and older SR classes stored, Comprehensive
  3D SR and Parametric Map refused at the presentation context (result 1, user-rejection);
- DICOM TLS with DCMTK (and dcmjs): right CA accepted both ways, a certificate from the
  other CA refused by the server and by the client.

Every wait is on a condition (a socket listening, a line printed, a file announced), and
each tool that is missing skips its tests with the reason.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from support.peers import (
    CtnStoreSCP,
    DcmjsStoreSCP,
    DcmtkStoreSCP,
    PixelMedStoreSCP,
    Pki,
    dcmjs_send,
    echoscu_echo,
    make_pki,
    missing,
    pixelmed_send,
    storescu_send,
)
from support.peers.dcmtk import parse_storescu
from support.peers.samples import (
    BASIC_TEXT_SR,
    COMPREHENSIVE_3D_SR,
    COMPREHENSIVE_SR,
    PARAMETRIC_MAP,
    SECONDARY_CAPTURE,
    write_instance,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLE_STUDIES = REPO / "sample_studies"


def needs(*peers: str) -> pytest.MarkDecorator:
    reasons = [r for p in peers if (r := missing(p))]
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "available")


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny instance per result SOP class the node sends, plus basic and comprehensive SR."""
    folder = tmp_path_factory.mktemp("result-objects")
    kinds = {
        "sc": SECONDARY_CAPTURE,
        "3d-sr": COMPREHENSIVE_3D_SR,
        "pm": PARAMETRIC_MAP,
        "basic-sr": BASIC_TEXT_SR,
        "comprehensive-sr": COMPREHENSIVE_SR,
    }
    return {kind: write_instance(uid, folder, name=f"{kind}.dcm") for kind, uid in kinds.items()}


@pytest.fixture(scope="module")
def source_images() -> list[Path]:
    files = sorted(SAMPLE_STUDIES.glob("*/*.dcm"))[:2]
    if not files:
        pytest.skip(f"no sample studies under {SAMPLE_STUDIES}")
    return files


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if reason := missing("tls"):
        pytest.skip(reason)
    return make_pki(tmp_path_factory.mktemp("pki"))


def sop_instance(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def uids(paths: list[Path]) -> set[str]:
    return {sop_instance(p) for p in paths}


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[DcmtkStoreSCP]:
    with DcmtkStoreSCP(tmp_path / "storescp", aet="STORESCP") as scp:
        yield scp


# -- no processes: parsing ------------------------------------------------------------------


def test_parse_storescu_statuses_and_refused_contexts(tmp_path: Path) -> None:
    a, b, c, w, d = (tmp_path / n for n in ("a.dcm", "b.dcm", "c.dcm", "w.dcm", "d.dcm"))
    lines = [
        "I: Requesting Association",
        f"I: Sending file: {a}",
        "D: DIMSE Status                  : 0x0000: Success",
        f"I: Sending file: {b}",
        "D: DIMSE Status                  : 0xa700: Refused: Out of resources",
        f"I: Sending file: {c}",
        "E: No presentation context for: (SR3) 1.2.840.10008.5.1.4.1.1.88.34",
        f"I: Sending file: {w}",
        "D: DIMSE Status                  : 0xb000: Warning",
    ]
    ra, rb, rc, rw, rd = parse_storescu([a, b, c, w, d], lines)
    assert (ra.ok, ra.status) == (True, 0)
    assert (rb.ok, rb.status, rb.status_hex) == (False, 0xA700, "0xA700")
    assert rc.context_refused and not rc.ok and rc.status is None
    assert (rw.ok, rw.status) == (True, 0xB000)  # a warning is a success that was noted
    assert not rd.ok and rd.detail == "not sent"


# -- PixelMed -------------------------------------------------------------------------------


@pytest.mark.slow
@needs("pixelmed", "dcmtk")
def test_pixelmed_scu_to_storescp(
    storescp: DcmtkStoreSCP, source_images: list[Path], results_dir: dict[str, Path], tmp_path: Path
) -> None:
    files = [*source_images, results_dir["sc"], results_dir["3d-sr"], results_dir["pm"]]
    run = pixelmed_send(
        storescp.port,
        files,
        called="STORESCP",
        calling="PIXELMED",
        log_path=tmp_path / "pixelmed-scu.log",
    )
    assert [r.ok for r in run.results] == [True] * len(files), run.results
    received = storescp.wait_for_files(len(files))
    assert uids(received) == uids(files)


@pytest.mark.slow
@needs("pixelmed", "dcmtk")
def test_storescu_to_pixelmed_scp(
    tmp_path: Path, source_images: list[Path], results_dir: dict[str, Path]
) -> None:
    files = [
        source_images[0],
        results_dir["sc"],
        results_dir["3d-sr"],
        results_dir["pm"],
        results_dir["basic-sr"],
    ]
    with PixelMedStoreSCP(tmp_path / "pixelmed", aet="PIXELMED") as scp:
        run = storescu_send(
            scp.port,
            files,
            called="PIXELMED",
            calling="STORESCU",
            log_path=tmp_path / "storescu.log",
        )
        assert [(r.ok, r.status) for r in run.results] == [(True, 0)] * len(files), run.results
        received = scp.wait_for_files(len(files))
        assert scp.received_calling_aets().count("STORESCU") == len(files)
    assert uids(received) == uids(files)


@pytest.mark.slow
@needs("pixelmed", "dcmjs")
def test_pixelmed_scu_reports_failures_and_refused_context(
    tmp_path: Path, results_dir: dict[str, Path]
) -> None:
    with DcmjsStoreSCP(
        tmp_path / "dcmjs",
        fail={SECONDARY_CAPTURE: 0xA700, BASIC_TEXT_SR: 0xB000},
        reject_contexts=[PARAMETRIC_MAP],
    ) as scp:
        files = [
            results_dir["sc"],
            results_dir["basic-sr"],
            results_dir["pm"],
            results_dir["3d-sr"],
        ]
        run = pixelmed_send(scp.port, files, log_path=tmp_path / "pixelmed-scu.log")
        by_kind = dict(zip(["sc", "basic-sr", "pm", "3d-sr"], run.results, strict=True))
        assert (
            not by_kind["sc"].ok and not by_kind["sc"].context_refused
        )  # 0xA700: PixelMed says "failed"
        assert by_kind["basic-sr"].ok  # a warning (0xB000) is success to PixelMed
        assert by_kind["pm"].context_refused and not by_kind["pm"].ok
        assert by_kind["3d-sr"].ok
        # PixelMed keeps the files in a hash set: the order on the wire is not the order given.
        assert sorted(e["status"] for e in scp.refused()) == [0xA700, 0xB000]
        assert uids(scp.wait_for_files(1)) == {sop_instance(results_dir["3d-sr"])}


# -- dcmjs-dimse ------------------------------------------------------------------------------


@pytest.mark.slow
@needs("dcmjs")
def test_dcmjs_sender_to_dcmjs_receiver(
    tmp_path: Path, source_images: list[Path], results_dir: dict[str, Path]
) -> None:
    files = [*source_images, results_dir["sc"], results_dir["3d-sr"], results_dir["pm"]]
    with DcmjsStoreSCP(tmp_path / "dcmjs-scp", aet="DCMJS_SCP", allow_calling=["DCMJS_SCU"]) as scp:
        run = dcmjs_send(
            scp.port, files, called="DCMJS_SCP", echo=True, log_path=tmp_path / "send.log"
        )
        assert run.association_accepted and run.echo_status == 0 and run.network_error is None
        assert [(r.ok, r.status) for r in run.results] == [(True, 0)] * len(files), run.results
        received = scp.wait_for_files(len(files))
        assert [e["calling"] for e in scp.events("stored")] == ["DCMJS_SCU"] * len(files)
    assert uids(received) == uids(files)
    # Bytes of the pixel data survive the dcmjs round trip.
    original = pydicom.dcmread(source_images[0])
    copy = pydicom.dcmread(next(p for p in received if sop_instance(p) == original.SOPInstanceUID))
    assert copy.PixelData == original.PixelData


@pytest.mark.slow
@needs("dcmjs", "dcmtk")
def test_dcmjs_sender_to_storescp(
    storescp: DcmtkStoreSCP, source_images: list[Path], results_dir: dict[str, Path], tmp_path: Path
) -> None:
    files = [source_images[0], results_dir["3d-sr"], results_dir["pm"]]
    run = dcmjs_send(
        storescp.port, files, called="STORESCP", echo=True, log_path=tmp_path / "send.log"
    )
    assert run.echo_status == 0
    assert [(r.ok, r.status) for r in run.results] == [(True, 0)] * len(files), run.results
    assert uids(storescp.wait_for_files(len(files))) == uids(files)


@pytest.mark.slow
@needs("dcmjs", "dcmtk")
def test_refusing_pacs_as_seen_by_storescu_and_dcmjs(
    tmp_path: Path, results_dir: dict[str, Path]
) -> None:
    """A PACS that refuses: 0xA700 (SC), 0xA900 (basic SR), 0xC000 (comprehensive SR), and the
    Parametric Map context; it stores only the 3D SR."""
    fail = {SECONDARY_CAPTURE: 0xA700, BASIC_TEXT_SR: 0xA900, COMPREHENSIVE_SR: 0xC000}
    kinds = ["sc", "basic-sr", "comprehensive-sr", "pm", "3d-sr"]
    files = [results_dir[k] for k in kinds]
    want = {
        "sc": 0xA700,
        "basic-sr": 0xA900,
        "comprehensive-sr": 0xC000,
        "pm": None,
        "3d-sr": 0x0000,
    }
    with DcmjsStoreSCP(tmp_path / "refusing", fail=fail, reject_contexts=[PARAMETRIC_MAP]) as scp:
        dcmtk = storescu_send(scp.port, files, log_path=tmp_path / "storescu.log")
        js = dcmjs_send(scp.port, files, log_path=tmp_path / "dcmjs.log")
        for run in (dcmtk.results, js.results):
            got = dict(zip(kinds, run, strict=True))
            assert {k: r.status for k, r in got.items()} == want, run
            assert [k for k, r in got.items() if r.context_refused] == ["pm"]
            assert [k for k, r in got.items() if r.ok] == ["3d-sr"]
        assert js.association is not None
        pm_context = next(
            c for c in js.association["contexts"] if c["abstract_syntax"] == PARAMETRIC_MAP
        )
        assert pm_context["result"] == 3  # abstract-syntax-not-supported
        assert len(scp.refused()) == 6
        assert uids(scp.wait_for_files(1)) == {
            sop_instance(results_dir["3d-sr"])
        }  # the same UID, twice


@pytest.mark.slow
@needs("dcmjs", "dcmtk")
@pytest.mark.parametrize(("mode", "result"), [("permanent", 1), ("transient", 2)])
def test_association_rejection(
    tmp_path: Path, results_dir: dict[str, Path], mode: str, result: int
) -> None:
    with DcmjsStoreSCP(tmp_path / "rj", reject_association=mode) as scp:
        js = dcmjs_send(scp.port, [results_dir["sc"]], log_path=tmp_path / "dcmjs.log")
        assert js.association is not None and js.association["accepted"] is False
        assert (
            js.association["reject"]["result"] == result
        )  # 1 permanent, 2 transient (PS3.8 9.3.4)
        assert not js.results[0].ok and js.results[0].status is None
        dcmtk = storescu_send(scp.port, [results_dir["sc"]], log_path=tmp_path / "storescu.log")
        assert dcmtk.association_rejected and not dcmtk.results[0].ok
        expected = "Rejected Permanent" if mode == "permanent" else "Rejected Transient"
        assert expected in dcmtk.output


# -- CTN: the legacy archive ------------------------------------------------------------------


@pytest.mark.slow
@needs("ctn", "dcmtk")
def test_ctn_accepts_sc_and_old_sr_refuses_3d_sr_and_pm(
    tmp_path: Path, results_dir: dict[str, Path]
) -> None:
    kinds = ["sc", "3d-sr", "basic-sr", "pm", "comprehensive-sr"]
    files = [results_dir[k] for k in kinds]
    with CtnStoreSCP(tmp_path / "ctn", aet="CTN_ARCHIVE") as ctn:
        run = storescu_send(
            ctn.port, files, called="CTN_ARCHIVE", log_path=tmp_path / "storescu.log"
        )
        got = dict(zip(kinds, run.results, strict=True))
        assert {k: r.ok for k, r in got.items()} == {
            "sc": True,
            "3d-sr": False,
            "basic-sr": True,
            "pm": False,
            "comprehensive-sr": True,
        }, run.results
        assert got["3d-sr"].context_refused and got["pm"].context_refused
        assert "No presentation context for: (SR3) 1.2.840.10008.5.1.4.1.1.88.34" in run.output
        assert {COMPREHENSIVE_3D_SR, PARAMETRIC_MAP} <= set(ctn.refused_sop_classes())
        stored = ctn.wait_for_files(3)
        assert uids(stored) == uids(
            [results_dir["sc"], results_dir["basic-sr"], results_dir["comprehensive-sr"]]
        )
        assert any(p.parent.name == "SC" for p in stored)  # classes CTN has a folder for
        # All files are DICOM Part 10 (our config sets STORAGE/PART10FLAG 1).
        assert all(pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in stored)

        # What the A-ASSOCIATE-AC says, read by a second independent implementation.
        if not missing("dcmjs"):
            js = dcmjs_send(
                ctn.port,
                [results_dir["3d-sr"], results_dir["sc"]],
                called="CTN_ARCHIVE",
                log_path=tmp_path / "dcmjs.log",
            )
            assert js.association is not None
            contexts = {c["abstract_syntax"]: c["result"] for c in js.association["contexts"]}
            assert contexts == {COMPREHENSIVE_3D_SR: 1, SECONDARY_CAPTURE: 0}  # 1 = user-rejection
            assert [r.context_refused for r in js.results] == [True, False]

        # A wrong called AE title is rejected (permanent, called AE not recognised) ...
        wrong = storescu_send(
            ctn.port,
            [results_dir["sc"]],
            called="SOMEONE_ELSE",
            log_path=tmp_path / "wrong-aet.log",
        )
        assert wrong.association_rejected and "Called AE Title Not Recognized" in wrong.output
        # ... and the archive is still serving afterwards.
        again = storescu_send(
            ctn.port, [results_dir["sc"]], called="CTN_ARCHIVE", log_path=tmp_path / "again.log"
        )
        assert again.results[0].ok


# -- TLS ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pki_two_independent_cas(pki: Pki) -> None:
    def verify(ca: Path, cert: Path) -> bool:
        done = subprocess.run(
            ["openssl", "verify", "-CAfile", str(ca), str(cert)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return done.returncode == 0

    assert verify(pki.ca_cert, pki.server.cert) and verify(pki.ca_cert, pki.client.cert)
    assert verify(pki.other_ca_cert, pki.other_client.cert) and verify(
        pki.other_ca_cert, pki.other_server.cert
    )
    assert not verify(pki.ca_cert, pki.other_client.cert)
    assert not verify(pki.other_ca_cert, pki.client.cert)


@pytest.mark.slow
@needs("tls")
def test_dcmtk_tls_right_ca_accepted_other_ca_refused(
    pki: Pki, tmp_path: Path, results_dir: dict[str, Path]
) -> None:
    with DcmtkStoreSCP(
        tmp_path / "tls-scp", aet="TLS_SCP", tls=pki.server, peer_cert="require"
    ) as scp:
        ok = echoscu_echo(
            scp.port, called="TLS_SCP", tls=pki.client, log_path=tmp_path / "echo-ok.log"
        )
        assert ok.ok, ok.output

        files = [results_dir["sc"], results_dir["3d-sr"]]
        run = storescu_send(
            scp.port, files, called="TLS_SCP", tls=pki.client, log_path=tmp_path / "store-ok.log"
        )
        assert [(r.ok, r.status) for r in run.results] == [(True, 0), (True, 0)], run.output
        assert uids(scp.wait_for_files(2)) == uids(files)

        # A client certificate from the other CA: the server refuses the handshake.
        stranger = echoscu_echo(
            scp.port, called="TLS_SCP", tls=pki.other_client, log_path=tmp_path / "echo-other.log"
        )
        assert not stranger.ok
        refused_store = storescu_send(
            scp.port,
            [results_dir["sc"]],
            called="TLS_SCP",
            tls=pki.other_client,
            log_path=tmp_path / "store-other.log",
        )
        assert not refused_store.results[0].ok and refused_store.results[0].status is None
        # No client certificate at all (anonymous TLS client) is refused too, since -rc.
        anonymous = echoscu_echo(
            scp.port, called="TLS_SCP", tls=None, log_path=tmp_path / "echo-plain.log"
        )
        assert not anonymous.ok
        assert scp.process is not None
        scp.process.wait_until(
            lambda lines: any("certificate verify failed" in line for line in lines),
            60,
            "storescp to log the refused certificate",
        )
        # Still serving the right client after the refusals.
        assert echoscu_echo(
            scp.port, called="TLS_SCP", tls=pki.client, log_path=tmp_path / "echo-again.log"
        ).ok
    assert len(uids(scp.received_files())) == 2


@pytest.mark.slow
@needs("tls")
def test_dcmtk_tls_client_refuses_server_from_other_ca(pki: Pki, tmp_path: Path) -> None:
    with DcmtkStoreSCP(tmp_path / "rogue-scp", aet="ROGUE", tls=pki.other_server) as scp:
        res = echoscu_echo(scp.port, called="ROGUE", tls=pki.client, log_path=tmp_path / "echo.log")
        assert not res.ok
        assert "certificate verify failed" in res.output


@pytest.mark.slow
@needs("tls", "dcmjs")
def test_tls_across_implementations(pki: Pki, tmp_path: Path, results_dir: dict[str, Path]) -> None:
    """dcmjs (Node's OpenSSL binding) <-> DCMTK over TLS, with the same PKI."""
    with DcmtkStoreSCP(tmp_path / "tls-scp", aet="TLS_SCP", tls=pki.server) as scp:
        run = dcmjs_send(
            scp.port,
            [results_dir["pm"]],
            called="TLS_SCP",
            echo=True,
            tls=pki.client,
            log_path=tmp_path / "js.log",
        )
        assert run.echo_status == 0 and run.results[0].ok, run.events
        bad = dcmjs_send(
            scp.port,
            [results_dir["pm"]],
            called="TLS_SCP",
            tls=pki.other_client,
            log_path=tmp_path / "js-bad.log",
        )
        assert not bad.association_accepted and not bad.results[0].ok
        assert len(scp.wait_for_files(1)) == 1
    with DcmjsStoreSCP(tmp_path / "tls-js", tls=pki.server) as js:
        ok = storescu_send(
            js.port, [results_dir["3d-sr"]], tls=pki.client, log_path=tmp_path / "storescu.log"
        )
        assert ok.results[0].ok, ok.output
        bad_store = storescu_send(
            js.port,
            [results_dir["3d-sr"]],
            tls=pki.other_client,
            log_path=tmp_path / "storescu-bad.log",
        )
        assert not bad_store.results[0].ok
        assert len(js.wait_for_files(1)) == 1
