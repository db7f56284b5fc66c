"""The pynetdicom internals that ``dicom/hardening.py`` relies on are still there.

When pynetdicom is upgraded this is the test that says what to re-check: each assertion
names an internal the hardening uses. The behaviour itself is tested against real peers in
tests/hostile (slow peers, oversized PDUs, port probes) and tests/ingest.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import logging
import re
import socket
import socketserver
import threading
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
import structlog
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, _config, dimse_messages
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dsutils import create_file_meta
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import (
    AssociationServer,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from ddn_node.dicom import hardening
from ddn_node.dicom.hardening import PYNETDICOM_VERSION, ConnectionGate

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


def _digest(function: Any) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def test_the_reactor_loops_the_quiet_ones_copy_are_unchanged() -> None:
    # QuietDUL and QuietAssociation are copies of these loops with their polling sleep
    # replaced by a wait; after an upgrade, compare them line by line and update the
    # copies (and these digests).
    assert _digest(DULServiceProvider.run_reactor) == "e3a10eb3a0931e48"
    assert _digest(Association._run_reactor) == "f28838c5559e462a"
    assert _digest(DULServiceProvider.stop_dul) == "28a7e0be126e7b30"
    assert _digest(Association.kill) == "8f9713666a7f4cff"
    # What they wake on: the queues the DUL and the DIMSE provider make in __init__, and
    # the thread target Thread.__init__ bound (replaced before the thread starts).
    dul_init = inspect.getsource(DULServiceProvider.__init__)
    assert "self.to_provider_queue" in dul_init and "self.to_user_queue" in dul_init
    assert "target=make_target(self.run_reactor)" in dul_init
    assert "self.msg_queue" in inspect.getsource(DIMSEServiceProvider.__init__)
    assert hasattr(threading.Thread(target=print), "_target")
    # Received data sets are hashed as they stream: pynetdicom makes the file with the
    # NamedTemporaryFile of its module's namespace, writes the File Meta Information with
    # plain writes, then each data set fragment as a write followed by .file.flush().
    decode = inspect.getsource(dimse_messages.DIMSEMessage.decode_msg)
    assert "NamedTemporaryFile(delete=False" in decode
    assert hasattr(dimse_messages, "NamedTemporaryFile")
    fragment = (
        "self._data_set_file.write(data[1:])\n                    self._data_set_file.file.flush()"
    )
    assert fragment in decode
    assert decode.count(".file.flush()") == 1
    # The per-association deep copy of the supported contexts, and where they live.
    create = inspect.getsource(RequestHandler._create_association)
    assert "deepcopy(self.server.contexts)" in create
    assert "self.contexts = contexts" in inspect.getsource(AssociationServer.__init__)


def test_the_internals_the_port_limits_use_exist() -> None:
    # The gate runs in socketserver's own hook, which pynetdicom's server leaves alone:
    # it is called on the accept loop, before a request thread, and False closes.
    assert ThreadedAssociationServer.verify_request is socketserver.BaseServer.verify_request
    accept = inspect.getsource(socketserver.BaseServer._handle_request_noblock)
    assert "self.verify_request(request, client_address)" in accept
    assert "self.shutdown_request(request)" in accept
    # The acceptor waits for the A-ASSOCIATE-RQ for the association's ACSE timeout, whose
    # setter also sets the DUL's ARTIM timer: the guard shortens both to the first-PDU
    # timeout.
    assert "receive_pdu(wait=True, timeout=self.acse_timeout)" in inspect.getsource(
        Association.run_reactor
    )
    acse_setter = Association.acse_timeout.fset
    assert acse_setter is not None and "artim_timer.timeout" in inspect.getsource(acse_setter)
    # Every PDU is read as its 6-byte header, then the length it declares: the guard sees
    # the header first and aborts before the body is read.
    read = inspect.getsource(DULServiceProvider._read_pdu_data)
    assert "self.socket.recv(6)" in read and "self.socket.recv(pdu_length)" in read
    # The node's Maximum Length Received is the acceptor's maximum_length.
    create = inspect.getsource(RequestHandler._create_association)
    assert "assoc.acceptor.maximum_length = self.ae.maximum_pdu_size" in create
    # The client certificate is read from the association's socket (as nodelay does).
    assert re.search(r"self\.socket\b", inspect.getsource(DULServiceProvider.__init__))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_gate_closes_strangers_and_the_connections_over_the_limit() -> None:
    gate = ConnectionGate(lambda host: host.startswith("10.0.0."), 2, clock=_Clock())
    assert not gate.admit(("192.0.2.7", 40001))
    assert gate.admit(("10.0.0.5", 40001)) and gate.admit(("10.0.0.5", 40002))
    assert not gate.admit(("10.0.0.5", 40003))  # a third at once
    assert gate.admit(("10.0.0.6", 40001))  # another allowed address has its own
    # A connection whose request thread is done, with no association (a failed TLS
    # handshake), no longer counts.
    gate.handled(("10.0.0.5", 40001))
    assert gate.open_from("10.0.0.5") == 1
    assert gate.admit(("10.0.0.5", 40004))


def test_refusals_are_logged_once_per_address_and_reason_per_interval() -> None:
    clock = _Clock()
    gate = ConnectionGate(lambda host: False, 4, log_every_s=10, clock=clock)
    with structlog.testing.capture_logs() as logs:
        for port in range(1000):
            assert not gate.admit(("192.0.2.7", port))
        clock.now = 10.0
        gate.admit(("192.0.2.7", 1))
        gate.admit(("192.0.2.8", 1))
    refused = [e for e in logs if e["event"] == "scp.connection_refused"]
    assert [(e["host"], e["unlogged"]) for e in refused] == [
        ("192.0.2.7", 0),
        ("192.0.2.7", 999),  # how many went unlogged in between
        ("192.0.2.8", 0),
    ]
    assert all(e["reason"] == "host not on the allow-list" for e in refused)


def test_the_received_file_meta_is_written_through_the_names_replaced() -> None:
    # stream_received_datasets replaces the two names decode_msg writes the File Meta
    # Information of a received data set with.
    decode = inspect.getsource(dimse_messages.DIMSEMessage.decode_msg)
    assert "write_file_meta_info(" in decode and "create_file_meta(" in decode
    for keyword in ("sop_class_uid=", "sop_instance_uid=", "transfer_syntax="):
        assert keyword in decode
    # ... and what it falls back to is what those names were.
    assert hardening._original_write_file_meta_info is write_file_meta_info
    assert hardening._original_create_file_meta is create_file_meta


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even, odd
        ("1.2.840.10008.5.1.4.1.1.1", "1.2.33", "1.2.840.10008.1.2"),
        ("1.2", "1.2.826.0.1.3680043.8.498.12345678901234567890", "1.2.840.10008.1.2.4.50"),
    ],
)
def test_the_file_meta_is_written_as_pydicom_writes_it(
    sop_class: str, sop_instance: str, syntax: str
) -> None:
    args = {
        "sop_class_uid": UID(sop_class),
        "sop_instance_uid": UID(sop_instance),
        "transfer_syntax": UID(syntax),
    }
    theirs, ours = io.BytesIO(), io.BytesIO()
    write_file_meta_info(theirs, create_file_meta(**args))
    hardening._write_file_meta(ours, hardening._file_meta(**args))
    assert ours.getvalue() == theirs.getvalue()


def test_file_meta_pydicom_would_refuse_is_left_to_pydicom() -> None:
    # An empty SOP Instance UID: pydicom refuses it (as it did without the direct
    # encoding: the DUL thread aborts the association).
    meta = hardening._file_meta(
        sop_class_uid=UID("1.2.3"),
        sop_instance_uid=UID(""),
        transfer_syntax=UID("1.2.840.10008.1.2"),
    )
    with pytest.raises(AttributeError, match="Media Storage SOP Instance UID"):
        hardening._write_file_meta(io.BytesIO(), meta)


def test_the_established_read_returns_what_was_asked_or_what_came_before_the_close() -> None:
    guard = hardening.RequestGuard.__new__(hardening.RequestGuard)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        guard.socket = ours
        payload = bytes(range(256)) * 9000  # larger than one growth step of the buffer
        sender = threading.Thread(target=theirs.sendall, args=(payload,))
        sender.start()
        assert guard._recv_established(len(payload) - 5) == payload[:-5]
        sender.join()
        theirs.shutdown(socket.SHUT_WR)
        assert guard._recv_established(100) == payload[-5:]  # the peer closed
        assert guard._recv_established(6) == b""


def test_a_streamed_file_says_where_its_data_set_starts_and_what_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As pynetdicom writes a received data set: preamble, File Meta Information, then
    # each fragment written and flushed; the handler takes what was learnt, once.
    monkeypatch.setattr(hardening, "_INCOMING", [str(tmp_path)])
    handle = hardening._hashing_temporary_file(delete=False, mode="wb", suffix=".dcm")
    handle.write(b"\0" * 128)
    handle.write(b"DICM")
    handle.write(b"M" * 50)
    fragments = [b"a" * 70000, b"b" * 3]
    for fragment in fragments:
        handle.write(fragment)
        handle.file.flush()
    path = Path(handle.name)
    received = hardening.take_received(path)
    assert received is not None
    assert received.dataset_offset == 182 and received.size == 182 + 70003
    assert received.head == (b"a" * 70000)[: hardening.HEAD_BYTES]
    assert received.sha256 == hashlib.sha256(b"".join(fragments)).hexdigest()
    assert hardening.take_received(path) is None
    handle.close()
    assert path.read_bytes()[182:] == b"".join(fragments)


def test_a_file_pynetdicom_drops_is_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An association aborted in the middle of a data set drops its file: nothing of it
    # (descriptor, first bytes) stays behind. pynetdicom holds the file from its DIMSE
    # message to the C-STORE request the handler gets.
    assert "primitive._dataset_file = self._data_set_file" in inspect.getsource(
        dimse_messages.DIMSEMessage.message_to_primitive
    )
    monkeypatch.setattr(hardening, "_INCOMING", [str(tmp_path)])
    handle = hardening._hashing_temporary_file()
    handle.write(b"x")
    name = handle.name
    assert name in hardening._STREAMED
    del handle
    assert name not in hardening._STREAMED


def test_the_standard_logging_handlers_are_bound_only_where_their_output_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What skip_discarded_logging switches: the setting both the association and the
    # server read when they bind their default handlers.
    assert '_config.LOG_HANDLER_LEVEL == "standard"' in inspect.getsource(
        Association._bind_defaults
    )
    assert '_config.LOG_HANDLER_LEVEL == "standard"' in inspect.getsource(
        AssociationServer._bind_defaults
    )
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    try:
        logger.setLevel(logging.DEBUG)
        hardening.skip_discarded_logging()
        assert _config.LOG_HANDLER_LEVEL == "standard"
        logger.setLevel(logging.WARNING)
        hardening.skip_discarded_logging()
        assert _config.LOG_HANDLER_LEVEL == "none"
    finally:
        logger.setLevel(level)


def test_each_uid_is_checked_once_and_a_wrong_one_still_refused(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """remember_valid_uids: pynetdicom's primitives and presentation contexts keep their
    UID checks, a UID seen before is not checked again (the ~130 contexts of every
    association), and a value pynetdicom refuses is refused every time."""
    from pynetdicom import dimse_primitives, presentation
    from pynetdicom.dimse_primitives import C_STORE

    from ddn_node.dicom.hardening import remember_valid_uids

    remember_valid_uids()
    remember_valid_uids()  # idempotent: still one layer over pynetdicom's own
    checks: list[str] = []
    real = UID.is_valid

    def counted(self: UID) -> bool:
        checks.append(str(self))
        return bool(real.fget(self))  # type: ignore[attr-defined]

    monkeypatch.setattr(UID, "is_valid", property(counted))
    uid = "1.2.826.0.1.3680043.10.1.424242"
    for _ in range(3):
        request = C_STORE()
        request.AffectedSOPInstanceUID = uid
        assert request.AffectedSOPInstanceUID == uid
        assert isinstance(request.AffectedSOPInstanceUID, UID)
        context = presentation.PresentationContext()
        context.abstract_syntax = uid
    assert checks.count(uid) <= 2  # once per kind of use (here two), not once per use (six)
    for _ in range(2):
        with pytest.raises(ValueError, match="must not exceed 64"):
            C_STORE().AffectedSOPInstanceUID = "1." * 40
    assert dimse_primitives.set_uid is presentation.set_uid
