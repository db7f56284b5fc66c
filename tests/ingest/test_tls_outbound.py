"""Outbound DICOM TLS authenticates the destination (issue 15, item 4).

Real TLS, with a throw-away PKI made by ``openssl`` (support.peers.tls: a right CA whose
server certificate names 127.0.0.1 and localhost, and a stranger CA), a self-signed
certificate for pinning, and an in-process pynetdicom Storage SCP as the PACS. Each
destination gets one result object through the node's own Deliverer: the delivery row
says whether it was sent and, if not, why.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from support.dicomgen import make_cr, to_file_bytes
from support.peers.tls import Pki, make_pki, openssl_available

from ddn_node.config import Settings, load_settings
from ddn_node.dicom.spool import Spool
from ddn_node.pipeline.delivery import Deliverer
from ddn_node.store.engine import make_database
from ddn_node.store.migrate import upgrade
from ddn_node.store.models import Delivery, Study
from ddn_node.vocabulary import DeliveryState

pytestmark = pytest.mark.skipif(not openssl_available(), reason="openssl not installed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A PACS's self-signed certificate, which no CA vouches for: it can only be pinned."""
    folder = tmp_path_factory.mktemp("self-signed")
    key, cert = folder / "pacs.key", folder / "pacs.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=self-signed-pacs"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return key, cert


def sha256_of(cert: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


@dataclass
class TlsPacs:
    """A pynetdicom Storage SCP behind TLS: what it stored, by SOP Instance UID."""

    server: ThreadedAssociationServer
    stored: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


@pytest.fixture
def start_pacs() -> Iterator[Any]:
    servers: list[ThreadedAssociationServer] = []

    def start(key: Path, cert: Path) -> TlsPacs:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        ae = AE(ae_title="TLS_PACS")
        # Explicit VR only: the objects travel as they are stored.
        for storage in StoragePresentationContexts:
            ae.add_supported_context(storage.abstract_syntax, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        pacs = TlsPacs(None)  # type: ignore[arg-type]

        def on_store(event: evt.Event) -> int:
            pacs.stored.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

        server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            ssl_context=context,
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        assert server is not None
        pacs.server = server
        servers.append(server)
        return pacs

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Any]:
    """Queue one result object per destination and deliver it as the node does; the
    delivery rows are returned by destination."""
    made = []

    def deliver(destinations: list[dict[str, Any]]) -> dict[str, Delivery]:
        settings = Settings.model_validate(
            {
                "node": {"spool_dir": str(tmp_path / "spool")},
                "database": {"url": f"sqlite:///{tmp_path / 'ddn.sqlite'}"},
                "destinations": destinations,
                "delivery": {"timeout_s": 10},
            }
        )
        database = make_database(settings.database.url)
        made.append(database)
        upgrade(database)
        spool = Spool(settings.node.spool_dir)
        spool.prepare()
        study_uid = "1.2.826.0.1.3680043.8.498.4215"
        ds = make_cr(study_uid, series_uid=f"{study_uid}.1", sop_uid=f"{study_uid}.1.1", size=64)
        relpath = "results/sr.dcm"
        spool.path(relpath).parent.mkdir(parents=True, exist_ok=True)
        spool.path(relpath).write_bytes(to_file_bytes(ds))
        with database.session() as session:
            study = Study(study_uid=study_uid)
            session.add(study)
            session.flush()
            for dest in destinations:
                session.add(
                    Delivery(
                        study_id=study.id,
                        destination=dest["name"],
                        kind="sr",
                        sop_class_uid=str(ds.SOPClassUID),
                        sop_instance_uid=str(ds.SOPInstanceUID),
                        path=relpath,
                    )
                )
        Deliverer(settings, database, spool, owner="test").deliver_due()
        with database.read() as session:
            return {row.destination: row for row in session.scalars(select(Delivery))}

    yield deliver
    for database in made:
        database.dispose()


def destination(name: str, port: int, **tls: Any) -> dict[str, Any]:
    return {
        "name": name,
        "ae_title": "TLS_PACS",
        "host": "127.0.0.1",
        "port": port,
        "storage_commitment": False,
        "tls": True,
        **{key: str(value) for key, value in tls.items()},
    }


def test_only_a_pacs_that_proves_who_it_is_gets_the_results(
    pki: Pki, self_signed: tuple[Path, Path], start_pacs: Any, outbox: Any
) -> None:
    right = start_pacs(pki.server.key, pki.server.cert)  # the right CA; names 127.0.0.1
    rogue = start_pacs(pki.other_server.key, pki.other_server.cert)  # another CA
    pinned = start_pacs(*self_signed)
    rows = outbox(
        [
            destination("right", right.port, tls_ca=pki.ca_cert),
            # The right PACS, expected under another name: its certificate does not say it.
            destination(
                "wrong-name", right.port, tls_ca=pki.ca_cert, tls_server_name="pacs.example.org"
            ),
            destination("rogue", rogue.port, tls_ca=pki.ca_cert),
            destination("pinned", pinned.port, tls_pin_sha256=sha256_of(self_signed[1])),
            # Someone else's certificate where the self-signed one is pinned.
            destination("wrong-pin", right.port, tls_pin_sha256=sha256_of(self_signed[1])),
            # A pin and a CA: both must hold (here the chain and name do, the pin not).
            destination("ca-and-pin", right.port, tls_ca=pki.ca_cert, tls_pin_sha256="ab" * 32),
        ]
    )
    sent = {name for name, row in rows.items() if row.state == DeliveryState.SENT}
    assert sent == {"right", "pinned"}
    sop = rows["right"].sop_instance_uid
    assert right.stored == [sop] and pinned.stored == [sop] and rogue.stored == []
    # Not sent, and the row says why (for 'ddn-node deliveries list' and the worklist).
    errors = {name: row.last_error for name, row in rows.items() if name not in sent}
    assert "certificate was refused" in errors["wrong-name"]
    assert "pacs.example.org" in errors["wrong-name"]  # the name it was expected to carry
    assert "certificate was refused" in errors["rogue"]
    assert "issuer" in errors["rogue"]  # unable to get local issuer certificate
    assert "not the pinned one" in errors["wrong-pin"]
    assert sha256_of(pki.server.cert) in errors["wrong-pin"]  # what it presented instead
    assert "not the pinned one" in errors["ca-and-pin"]
    # A certificate problem is for the administrator to fix; the row waits and retries.
    assert all(rows[name].state == DeliveryState.PENDING for name in errors)


def test_tls_without_a_ca_or_a_pin_is_refused_by_config_check(tmp_path: Path) -> None:
    config = tmp_path / "ddn-node.toml"
    config.write_text(
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.1.2.3"\nport = 2762\n'
        "tls = true\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DDN_")}
    done = subprocess.run(
        [sys.executable, "-m", "ddn_node", "config", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 2
    assert "destination 'pacs': tls = true needs tls_ca" in done.stderr
    assert "tls_pin_sha256" in done.stderr


def test_a_pin_is_read_as_openssl_prints_it(tmp_path: Path) -> None:
    fingerprint = ":".join(f"{b:02X}" for b in bytes.fromhex("ab" * 32))  # AB:AB:...
    config = tmp_path / "ddn-node.toml"
    config.write_text(
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.1.2.3"\nport = 2762\n'
        f'tls = true\ntls_pin_sha256 = "{fingerprint}"\n'
    )
    (dest,) = load_settings(config, environ={}).destinations
    assert dest.tls_pin_sha256 == "ab" * 32 and dest.server_name == "10.1.2.3"
