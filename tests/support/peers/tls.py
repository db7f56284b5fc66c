"""A throw-away PKI for DICOM TLS tests, and the DCMTK command-line flags that use it.

:func:`make_pki` creates, with ``openssl``, two independent certification authorities in a
folder: the *right* CA (whose server and client certificates the peers trust) and an
*other* CA (a stranger: its certificates must be refused). Every leaf certificate carries
``subjectAltName = IP:127.0.0.1, DNS:localhost`` and both serverAuth and clientAuth, so it
can serve on either side of a loopback association (Node.js checks the host name; DCMTK
does not).

DCMTK flags (storescp / storescu / echoscu 3.6.7):

- ``+tls KEY CERT``: enable TLS with our private key and certificate (PEM by default);
- ``+cf CA.pem``: add a trusted certificate (repeatable) - the peer's chain must end there;
- ``-rc`` (``--require-peer-cert``, the default): verify the peer certificate and fail if
  absent; on storescp this is what *requires client certificates*; ``-vc`` verifies only
  when present, ``-ic`` ignores it;
- the default TLS profile is ``+py`` (non-downgrading BCP 195: TLS 1.2+, ECDHE-RSA/ECDSA
  with AES-GCM), which RSA-2048 keys satisfy.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from support.peers._proc import tool

OPENSSL = tool("openssl")

_LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def openssl_available() -> bool:
    return OPENSSL is not None


@dataclass(frozen=True)
class TlsIdentity:
    """A private key, its certificate, and the CA certificates this side trusts."""

    key: Path
    cert: Path
    trusted: tuple[Path, ...]

    def dcmtk_args(self, peer_cert: str = "require") -> list[str]:
        """DCMTK flags for this identity: ``peer_cert`` is require | verify | ignore."""
        flag = {"require": "-rc", "verify": "-vc", "ignore": "-ic"}[peer_cert]
        args = ["+tls", str(self.key), str(self.cert)]
        for ca in self.trusted:
            args += ["+cf", str(ca)]
        return [*args, flag]


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca_cert: Path
    server: TlsIdentity
    client: TlsIdentity
    other_ca_cert: Path
    #: a server and a client whose certificates the *other* CA signed, but which trust the
    #: right CA: against the right peers the only thing wrong is their own certificate, so
    #: a failed handshake proves the right peer refused it.
    other_server: TlsIdentity
    other_client: TlsIdentity

    def client_trusting(self, *cas: Path) -> TlsIdentity:
        """The right client's key and certificate, trusting ``cas`` instead."""
        return TlsIdentity(self.client.key, self.client.cert, tuple(cas))


def _openssl(args: list[str], cwd: Path) -> None:
    assert OPENSSL is not None, "openssl not installed"
    done = subprocess.run(
        [OPENSSL, *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl(
        [
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "7",
            "-keyout", key.name, "-out", cert.name, "-subj", f"/O=ddn-node tests/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash",
        ],
        folder,
    )  # fmt: skip
    return key, cert


def _make_leaf(
    folder: Path, name: str, ca_key: Path, ca_cert: Path, serial: int
) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    ext = folder / "leaf.ext"
    ext.write_text(_LEAF_EXTENSIONS)
    _openssl(
        ["req", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256", "-keyout", key.name, "-out", csr.name,
         "-subj", f"/O=ddn-node tests/CN={name}"],
        folder,
    )  # fmt: skip
    _openssl(
        ["x509", "-req", "-in", csr.name, "-CA", ca_cert.name, "-CAkey", ca_key.name, "-set_serial", str(serial),
         "-days", "7", "-sha256", "-extfile", ext.name, "-out", cert.name],
        folder,
    )  # fmt: skip
    return key, cert


def make_pki(folder: Path) -> Pki:
    """Create both CAs and their server / client certificates in ``folder`` (idempotent:
    an existing complete set is reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["ca", "server", "client", "other-ca", "other-server", "other-client"]
    if not all((folder / f"{n}.pem").is_file() and (folder / f"{n}.key").is_file() for n in names):
        ca_key, ca_cert = _make_ca(folder, "ca")
        _make_leaf(folder, "server", ca_key, ca_cert, 1001)
        _make_leaf(folder, "client", ca_key, ca_cert, 1002)
        oca_key, oca_cert = _make_ca(folder, "other-ca")
        _make_leaf(folder, "other-server", oca_key, oca_cert, 2001)
        _make_leaf(folder, "other-client", oca_key, oca_cert, 2002)
    ca, other = folder / "ca.pem", folder / "other-ca.pem"

    def ident(name: str, trusted: Path) -> TlsIdentity:
        return TlsIdentity(folder / f"{name}.key", folder / f"{name}.pem", (trusted,))

    return Pki(
        folder=folder,
        ca_cert=ca,
        server=ident("server", ca),
        client=ident("client", ca),
        other_ca_cert=other,
        other_server=ident("other-server", ca),
        other_client=ident("other-client", ca),
    )
