"""Independent DICOM peers for interoperability tests: implementations that share no code
with pynetdicom (what the node uses) or with each other where it matters.

Receivers (``start()`` / ``stop()``, or ``with``): each stores into ``<folder>/received``
and lists complete files with ``received_files()`` / ``wait_for_files(n)``.

==========================  =============================================================
``DcmtkStoreSCP``           DCMTK storescp, plain or TLS (``tls=pki.server``)
``PixelMedStoreSCP``        PixelMed StorageSOPClassSCPDispatcher (Java)
``DcmjsStoreSCP``           dcmjs-dimse (Node.js); can refuse contexts / answer failures
``CtnStoreSCP``             CTN simple_storage: a legacy archive that refuses 3D SR and PM
==========================  =============================================================

Senders (return per-file :class:`StoreResult`): ``storescu_send`` / ``echoscu_echo``
(DCMTK, plain or TLS), ``pixelmed_send``, ``dcmjs_send``.

TLS material: :func:`make_pki` (two CAs: the right one and another whose certificates must
be refused). Tiny result-class instances: :mod:`support.peers.samples`.

Every harness has an ``*_available()`` function; tests skip with a clear reason when a
tool is missing (see :func:`missing`).
"""

from __future__ import annotations

from support.peers._proc import PeerError, StoreResult, port_listening
from support.peers.ctn import CtnStoreSCP, ctn_available
from support.peers.dcmjs import DcmjsStoreSCP, dcmjs_available, dcmjs_missing_reason, dcmjs_send
from support.peers.dcmtk import DcmtkStoreSCP, dcmtk_available, echoscu_echo, storescu_send
from support.peers.pixelmed import PixelMedStoreSCP, pixelmed_available, pixelmed_send
from support.peers.tls import Pki, TlsIdentity, make_pki, openssl_available

__all__ = [
    "CtnStoreSCP",
    "DcmjsStoreSCP",
    "DcmtkStoreSCP",
    "PeerError",
    "PixelMedStoreSCP",
    "Pki",
    "StoreResult",
    "TlsIdentity",
    "ctn_available",
    "dcmjs_available",
    "dcmjs_send",
    "dcmtk_available",
    "echoscu_echo",
    "make_pki",
    "missing",
    "openssl_available",
    "pixelmed_available",
    "pixelmed_send",
    "port_listening",
    "storescu_send",
]


def missing(peer: str) -> str | None:
    """Why ``peer`` (dcmtk | pixelmed | dcmjs | ctn | tls) cannot run here, or None."""
    if peer == "dcmtk":
        return (
            None
            if dcmtk_available()
            else "DCMTK storescp/storescu/echoscu not installed (apt install dcmtk)"
        )
    if peer == "pixelmed":
        return (
            None
            if pixelmed_available()
            else "PixelMed not installed (apt install libpixelmed-java default-jre-headless)"
        )
    if peer == "dcmjs":
        return None if dcmjs_available() else dcmjs_missing_reason()
    if peer == "ctn":
        return None if ctn_available() else "CTN simple_storage not installed (apt install ctn)"
    if peer == "tls":
        if not openssl_available():
            return "openssl not installed"
        return None if dcmtk_available() else "DCMTK not installed (apt install dcmtk)"
    raise ValueError(f"unknown peer {peer!r}")
