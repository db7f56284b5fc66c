"""Only allowed peers get in; rejections are A-ASSOCIATE-RJ, logged and audited; TLS works."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select
from support.net import free_port, wait_for

from ddn_node.dicom.scu import client_tls_context
from ddn_node.store.engine import make_database
from ddn_node.store.models import AuditEvent


def echoscu(port: int, calling: str, called: str = "DDN_NODE") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def audit_rows(db_url: str, event: str) -> list[AuditEvent]:
    db = make_database(db_url)
    try:
        with db.read() as s:
            return list(s.scalars(select(AuditEvent).where(AuditEvent.event == event)))
    finally:
        db.dispose()


def test_allow_list_and_called_ae(make_node, db_url: str) -> None:
    node = make_node(
        db_url,
        peers=[
            {"ae_title": "ECHOSCU", "hosts": ["127.0.0.1"]},
            {"ae_title": "FARAWAY", "hosts": ["10.20.30.0/24"]},
        ],
    )
    with node:
        assert echoscu(node.port, "ECHOSCU").returncode == 0

        unknown_ae = echoscu(node.port, "INTRUDER")
        assert unknown_ae.returncode != 0 and "Calling AE Title Not Recognized" in unknown_ae.stderr

        unknown_host = echoscu(node.port, "FARAWAY")  # allowed AE, but not from this address
        assert (
            unknown_host.returncode != 0
            and "Calling AE Title Not Recognized" in unknown_host.stderr
        )

        wrong_called = echoscu(node.port, "ECHOSCU", called="SOMEONE_ELSE")
        assert (
            wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr
        )

        # Still serving after the rejections.
        assert echoscu(node.port, "ECHOSCU").returncode == 0

        rejected = wait_for(
            lambda: (
                len(audit_rows(db_url, "association.rejected")) >= 3
                and audit_rows(db_url, "association.rejected")
            ),
            10,
            "audit rows",
        )
        actors = sorted(r.actor for r in rejected)
        assert actors == ["ECHOSCU", "FARAWAY", "INTRUDER"]
        assert all(r.outcome == "failure" and r.host == "127.0.0.1" for r in rejected)
        reasons = {r.actor: r.detail["reason"] for r in rejected}
        assert reasons["ECHOSCU"] == "called AE title not recognised"
    log_events = [e for e in node.events() if e.get("event") == "scp.association_rejected"]
    assert len(log_events) == 3


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away CA, a server certificate and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=Test CA",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.crt"),
    )
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(d / f"{name}.key"),
            "-out",
            str(d / f"{name}.csr"),
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            str(d / f"{name}.csr"),
            "-CA",
            str(d / "ca.crt"),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            str(d / f"{name}.crt"),
        )
    return d


def _tls_echo(port: int, pki: Path, with_client_cert: bool) -> bool:
    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(Verification)
    ctx = client_tls_context(
        pki / "ca.crt",
        pki / "client.crt" if with_client_cert else None,
        pki / "client.key" if with_client_cert else None,
    )
    # The client checks the server's name: this certificate names "server" (its CN).
    assoc = ae.associate("127.0.0.1", port, ae_title="DDN_NODE", tls_args=(ctx, "server"))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return "Status" in status and status.Status == 0


def test_mutual_tls(make_node, sqlite_url: str, pki: Path) -> None:
    tls_port = free_port()
    node = make_node(
        sqlite_url,
        node={
            "tls": {
                "enabled": True,
                "port": tls_port,
                "cert": str(pki / "server.crt"),
                "key": str(pki / "server.key"),
                "ca": str(pki / "ca.crt"),
            }
        },
    )
    with node:
        assert _tls_echo(tls_port, pki, with_client_cert=True)
        assert not _tls_echo(tls_port, pki, with_client_cert=False)
        # A plain-TCP caller on the TLS port gets nowhere; the plain port still works.
        assert echoscu(tls_port, "ECHOSCU").returncode != 0
        assert echoscu(node.port, "ECHOSCU").returncode == 0
    assert any(e.get("event") == "scp.tls_handshake_failed" for e in node.events())
