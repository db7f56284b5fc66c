"""Mutual TLS bound to the calling AE title (issue 15, item 4): a ``[[peers]]`` entry with
``tls_subject`` associates only with the client certificate it names.

Without the binding, any certificate the node's CA signed could speak as any allowed AE
title (the CA is often the hospital's, and signs every modality's); and the same AE title
on the plain port needs no certificate at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select
from support.net import free_port, wait_for
from support.peers.tls import Pki, make_pki, openssl_available

from ddn_node.config import PeerSettings, Settings, check_paths
from ddn_node.dicom.scu import client_tls_context
from ddn_node.store.engine import make_database
from ddn_node.store.models import AuditEvent

pytestmark = pytest.mark.skipif(not openssl_available(), reason="openssl not installed")

MISMATCH = "client certificate does not match the peer's tls_subject"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def echo(port: int, calling: str, pki: Pki | None = None) -> str:
    """'ok', 'rejected' (A-ASSOCIATE-RJ) or 'failed' (no association at all)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    tls_args = None
    if pki is not None:
        context = client_tls_context(pki.ca_cert, pki.client.cert, pki.client.key)
        tls_args = (context, "127.0.0.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="DDN_NODE", tls_args=tls_args)
    if not assoc.is_established:
        return "rejected" if assoc.is_rejected else "failed"
    status = assoc.send_c_echo()
    assoc.release()
    return "ok" if "Status" in status and status.Status == 0 else "failed"


def rejections(db_url: str) -> list[AuditEvent]:
    db = make_database(db_url)
    try:
        with db.read() as s:
            rows = s.scalars(select(AuditEvent).where(AuditEvent.event == "association.rejected"))
            return list(rows)
    finally:
        db.dispose()


def test_a_bound_ae_title_needs_its_own_certificate(
    make_node: Any, sqlite_url: str, pki: Pki
) -> None:
    tls_port = free_port()
    node = make_node(
        sqlite_url,
        node={
            "tls": {
                "enabled": True,
                "port": tls_port,
                "cert": str(pki.server.cert),
                "key": str(pki.server.key),
                "ca": str(pki.ca_cert),  # mutual TLS: client certificates this CA signed
            }
        },
        peers=[
            # The client certificate is "CN=client", SAN DNS:localhost and IP:127.0.0.1.
            {"ae_title": "ECHOSCU", "hosts": ["127.0.0.1"], "tls_subject": "CN=client"},
            {"ae_title": "TESTSCU", "hosts": ["127.0.0.1"], "tls_subject": "DNS:localhost"},
            {"ae_title": "STORESCU", "hosts": ["127.0.0.1"], "tls_subject": "CN=storescu"},
            {"ae_title": "DDN_SEND", "hosts": ["127.0.0.1"]},  # not bound
        ],
    )
    with node:
        assert echo(tls_port, "ECHOSCU", pki) == "ok"
        assert echo(tls_port, "TESTSCU", pki) == "ok"
        assert echo(tls_port, "DDN_SEND", pki) == "ok"
        # The CA signed this certificate, but for another AE title.
        assert echo(tls_port, "STORESCU", pki) == "rejected"
        # On the plain port a bound AE title has no certificate to show.
        assert echo(node.port, "ECHOSCU") == "rejected"
        assert echo(node.port, "DDN_SEND") == "ok"

        rows = wait_for(
            lambda: (r := rejections(sqlite_url)) and len(r) >= 2 and r, 10, "two audit rows"
        )
    assert sorted((r.actor, r.detail["reason"]) for r in rows) == [
        ("ECHOSCU", MISMATCH),
        ("STORESCU", MISMATCH),
    ]
    # The log (and the audit) say which certificate was presented, to fix the config by.
    logged = [e for e in node.events() if e.get("event") == "scp.association_rejected"]
    by_ae = {e["calling_ae"]: e for e in logged}
    assert "commonName=client" in by_ae["STORESCU"]["certificate_subject"]
    assert "certificate_subject" not in by_ae["ECHOSCU"]  # the plain port: none
    assert {r.actor: r.detail.get("certificate_subject") for r in rows}["STORESCU"]


CLIENT_CERT = {
    "subject": ((("organizationName", "Hospital"),), (("commonName", "ORTHANC"),)),
    "subjectAltName": (("DNS", "pacs.example.org"), ("IP Address", "10.1.2.3")),
}


@pytest.mark.parametrize(
    ("tls_subject", "matches"),
    [
        ("CN=ORTHANC", True),
        ("CN=ORTHANC, O=Hospital", True),
        ("CN=ORTHANC,O=Elsewhere", False),
        ("CN=orthanc", False),  # a subject attribute is compared exactly
        ("DNS:PACS.example.org", True),  # a DNS name is not case-sensitive
        ("DNS:other.example.org", False),
    ],
)
def test_tls_subject_forms(tls_subject: str, matches: bool) -> None:
    peer = PeerSettings(ae_title="ORTHANC", tls_subject=tls_subject)
    assert peer.certificate_matches(CLIENT_CERT) is matches
    assert not peer.certificate_matches(None)  # no certificate never matches
    assert PeerSettings(ae_title="ORTHANC").certificate_matches(None)  # not bound


@pytest.mark.parametrize("bad", ["ORTHANC", "XX=ORTHANC", "CN=", "DNS:"])
def test_a_malformed_tls_subject_is_a_config_error(bad: str) -> None:
    with pytest.raises(ValidationError, match="tls_subject"):
        PeerSettings(ae_title="ORTHANC", tls_subject=bad)


def test_config_check_refuses_a_bound_peer_without_mutual_tls(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {
            "node": {"spool_dir": str(tmp_path / "spool")},
            "database": {"url": f"sqlite:///{tmp_path / 'ddn.sqlite'}"},
            "peers": [{"ae_title": "ORTHANC", "tls_subject": "CN=ORTHANC"}],
        }
    )
    problems = check_paths(settings, "ddn-node.toml")
    assert [
        (p.key, "ORTHANC must present a client certificate" in p.message) for p in problems
    ] == [("peers[0].tls_subject", True)]
