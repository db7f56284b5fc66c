"""A PACS that takes only Implicit VR Little Endian (DCMTK ``storescp +xi``) still gets the
node's objects: the sender re-encodes an Explicit VR file for it, and what arrives is the
same data set (pixels and every attribute) in the syntax the peer accepted."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian
from support.dicomgen import make_cr, to_file_bytes
from support.peers.dcmtk import STORESCP, DcmtkStoreSCP

from ddn_node.dicom.scu import Peer, StoreSCU

pytestmark = pytest.mark.skipif(not STORESCP, reason="DCMTK storescp not installed")


def test_explicit_file_reaches_an_implicit_only_pacs(tmp_path: Path) -> None:
    source = tmp_path / "explicit.dcm"
    source.write_bytes(to_file_bytes(make_cr("1.2.826.0.1.3680043.8.498.6060", seed=3)))
    with DcmtkStoreSCP(
        tmp_path / "storescp", aet="IMPLICIT", accept_all=False, extra_args=["+xi"]
    ) as scp:
        outcome = StoreSCU("DDN_NODE", Peer("IMPLICIT", "127.0.0.1", scp.port)).send([source])[0]
        assert outcome.status == 0x0000, outcome.error
        (received,) = scp.wait_for_files(1)
    sent, got = pydicom.dcmread(source), pydicom.dcmread(received)
    assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert got.SOPInstanceUID == sent.SOPInstanceUID
    assert got.PixelData == sent.PixelData
    assert [(e.tag, e.value) for e in got] == [(e.tag, e.value) for e in sent]
