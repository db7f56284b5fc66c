"""The pynetdicom internals that ``dicom/hardening.py`` relies on are still there.

When pynetdicom is upgraded this is the test that says what to re-check: each assertion
names an internal the hardening uses. The behaviour itself is tested against real peers in
tests/hostile (slow peers, oversized PDUs, port probes) and tests/ingest.
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

import pynetdicom
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler

from ddn_node.dicom.hardening import PYNETDICOM_VERSION

REPO = Path(__file__).resolve().parents[2]


def test_the_pinned_pynetdicom_is_the_one_checked() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"pynetdicom=={PYNETDICOM_VERSION}"' in pyproject
    assert version("pynetdicom") == PYNETDICOM_VERSION == pynetdicom.__version__


def test_the_internals_the_hardening_uses_exist() -> None:
    # Streaming datasets to and from files.
    assert isinstance(_config.STORE_RECV_CHUNKED_DATASET, bool)
    assert isinstance(_config.STORE_SEND_CHUNKED_DATASET, bool)
    # Servers made with make_server are tracked in AE._servers.
    assert isinstance(AE()._servers, list)
    # The request handler builds the association; the guard swaps its socket's class.
    assert callable(RequestHandler._create_association)
    assert "nr_bytes" in inspect.signature(AssociationSocket.recv).parameters
    # The guard wakes the association thread through the DUL's queue to the user.
    source = inspect.getsource(DULServiceProvider.__init__)
    assert re.search(r"self\.to_user_queue\b", source)
    assert "socket" in inspect.getsource(DULServiceProvider)
    assert "requestor" in inspect.getsource(Association.__init__)
