"""The Storage SCP: C-ECHO and C-STORE on the configured AE title, plain and TLS ports.

The DIMSE thread only writes bytes and commits a row: pynetdicom streams each dataset to a
file in the spool's ``incoming/`` as it arrives (``STORE_RECV_CHUNKED_DATASET``), the
handler reads the indexed header attributes (never the pixels), fsyncs and renames the
file into place, commits the rows, and only then answers 0x0000. Decoding and inference
happen later, in the worker.

Statuses (PS3.4 B.2.3, listed in docs/conformance-statement.md):
0x0000 stored (also for an idempotent re-send); 0xA700 out of resources (disk below the
reserve, spool or database unwritable); 0xC000 the data set cannot be parsed; 0xC001 a
required UID is missing; 0xC002 the data set's SOP Instance UID differs from the command's.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from ddn_node.config import PeerSettings, Settings
from ddn_node.dicom.headers import HeaderError, dataset_offset, read_header
from ddn_node.dicom.spool import Spool
from ddn_node.dicom.syntaxes import (
    IMPLEMENTATION_CLASS_UID,
    implementation_version_name,
    storage_sop_classes,
    supported_transfer_syntaxes,
)
from ddn_node.store.audit import AuditEventName, add_audit, audit
from ddn_node.store.engine import Database
from ddn_node.store.ingest import IngestOutcome, InstanceRecord, KnownSeries, record_instance
from ddn_node.store.models import UID_LEN

log = structlog.get_logger("ddn_node.scp")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
MISSING_UID = 0xC001
UID_MISMATCH = 0xC002

# A-ASSOCIATE-RJ (result, source, reason) triples, PS3.8 9.3.4
RJ_CALLING_AE = (0x01, 0x01, 0x03)
RJ_CALLED_AE = (0x01, 0x01, 0x07)
RJ_CONGESTION = (0x02, 0x03, 0x01)


def peer_allowed(peers: list[PeerSettings], calling_ae: str, host: str) -> bool:
    """Is (calling AE title, source address) on the allow-list?"""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for peer in peers:
        if peer.ae_title != calling_ae.strip():
            continue
        for allowed in peer.hosts:
            if allowed == "*" or address in ipaddress.ip_network(allowed, strict=False):
                return True
    return False


def server_tls_context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    """TLS for the DICOM port (PS3.15 B.1 / BCP 195): TLS 1.2+, mutual when a CA is set."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


# The largest PDU accepted before an association is established. An A-ASSOCIATE-RQ with
# 128 presentation contexts of ten transfer syntaxes each is ~100 kB; user identity
# tokens add a few kB more.
MAX_REQUEST_PDU_BYTES = 1 << 20


class _RequestGuard(AssociationSocket):
    """The DUL socket of an acceptor, stricter while the peer is still anonymous.

    pynetdicom reads a whole PDU into memory, whatever length its header declares, and
    only then decodes it; the allow-list is checked after that. Until the association is
    established this socket therefore refuses (i) a PDU declaring more than
    ``MAX_REQUEST_PDU_BYTES`` (an anonymous peer could otherwise make the node buffer up
    to 4 GiB), and (ii) taking longer than the ACSE timeout in all to arrive (the ARTIM
    rule of PS3.8 9.1.2; the network timeout alone bounds each read, so a peer trickling
    one byte a second held a thread and an association slot indefinitely). Either ends
    in an OSError, which pynetdicom treats as the connection closing.

    (iii) When the connection ends before an A-ASSOCIATE-RQ arrived (a port probe, a
    health check, junk), pynetdicom's association thread would go on waiting for the
    request until the ACSE timeout, holding one of ``max_associations`` slots all that
    time: a TCP health check every 2 s filled 16 slots with the default 30 s. The guard
    wakes it with the same "no request" it gets on a timeout.
    """

    _deadline: float
    _host: str

    def guard(self, acse_timeout: float | None, host: str) -> None:
        self._deadline = time.monotonic() + (acse_timeout or 30.0)
        self._host = host

    def recv(self, nr_bytes: int) -> bytearray:
        if self.assoc.is_established or self.socket is None:
            return super().recv(nr_bytes)
        try:
            out = self._recv_before_association(nr_bytes)
        except OSError:  # TimeoutError included
            self._no_request()
            raise
        if len(out) < nr_bytes:  # closed by the peer
            self._no_request()
        return out

    def _recv_before_association(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        if nr_bytes > MAX_REQUEST_PDU_BYTES:
            log.warning("scp.request_too_large", host=self._host, declared=nr_bytes)
            raise OSError(f"a PDU of {nr_bytes} bytes before association")
        out = bytearray()
        network_timeout = self.socket.gettimeout()
        try:
            while len(out) < nr_bytes:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    log.warning("scp.request_too_slow", host=self._host, received=len(out), wanted=nr_bytes)
                    raise TimeoutError("the association request did not arrive within the ACSE timeout")
                self.socket.settimeout(min(left, network_timeout) if network_timeout else left)
                try:
                    chunk = self.socket.recv(min(4096, nr_bytes - len(out)))
                except TimeoutError:
                    if time.monotonic() >= self._deadline:
                        log.warning("scp.request_too_slow", host=self._host, received=len(out), wanted=nr_bytes)
                    raise
                if not chunk:  # closed by the peer: return what there is, as pynetdicom does
                    break
                out += chunk
        finally:
            if self.socket is not None:
                self.socket.settimeout(network_timeout)
        return out

    def close(self) -> None:
        # The DUL closes the transport itself after aborting a bad first PDU (A-ABORT,
        # then close): no A-ASSOCIATE-RQ will come on this connection either.
        super().close()
        self._no_request()

    def _no_request(self) -> None:
        """Wake the association thread if it is still waiting for an A-ASSOCIATE-RQ that
        can no longer come. None is what its wait returns on the ACSE timeout; it then
        stops the DUL once that has seen the close (Sta1) and shuts the socket down."""
        if self.assoc.requestor.primitive is not None:
            return  # the request arrived: the association thread is past that wait
        queued = list(self.assoc.dul.to_user_queue.queue)
        if any(isinstance(p, A_ASSOCIATE) or p is None for p in queued):
            return  # a request, or the wake-up, is already on its way
        self.assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]


class _GuardedRequestHandler(RequestHandler):
    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        # pynetdicom builds the AssociationSocket itself (and queues the transport event
        # in its constructor, so it cannot be built twice); give it the guard's recv.
        assert type(sock) is AssociationSocket
        sock.__class__ = _RequestGuard
        sock.guard(self.ae.acse_timeout, str(self.client_address[0]))
        return assoc


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with Nagle off and the TLS handshake off the accept loop."""

    handshake_timeout_s: float = 30.0
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        # Small DIMSE responses must not wait ~40 ms for a delayed ACK (Nagle's algorithm).
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # An accepted socket is blocking without a timeout (the listening socket's does not
        # carry over), and pynetdicom's reactor, once part of a PDU has arrived, blocks in
        # recv() for the rest: a peer that sends half a PDU and stalls would hold the
        # thread and its association slot forever. Bound every read by the network timeout.
        client.settimeout(self.ae.network_timeout)
        return client, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is not None:
            request.settimeout(self.handshake_timeout_s)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.warning("scp.tls_handshake_failed", host=client_address[0], error=str(exc))
                request.close()
                return
            request.settimeout(self.ae.network_timeout)
        super().finish_request(request, client_address)


@dataclass
class _AssocStats:
    calling_ae: str
    host: str
    stored: int = 0
    refused: int = 0
    studies: set[str] = field(default_factory=set)


class StorageSCP:
    """The node's DICOM listener. One per process; bound to a database and a spool."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        spool: Spool,
        on_stored: Callable[[IngestOutcome], None] | None = None,
    ):
        self.settings = settings
        self.database = database
        self.spool = spool
        self.on_stored = on_stored
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self._stats: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        self._known = KnownSeries()
        self.ae = self._make_ae()

    # -- set-up -----------------------------------------------------------------------

    def _make_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu_size
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.require_called_aet = False  # checked in _on_requested, so that it is audited
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = implementation_version_name()
        syntaxes = list(supported_transfer_syntaxes())
        contexts: list[PresentationContext] = [build_context(Verification)]
        contexts += [build_context(uid, syntaxes) for uid in storage_sop_classes()]
        ae.supported_contexts = contexts
        return ae

    def _handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]

    def start(self) -> list[int]:
        """Start listening (non-blocking); returns the bound ports (plain first)."""
        # pynetdicom streams datasets to tempfile's directory: make it the spool's
        # incoming/ so that the final rename is atomic (same filesystem). Process-wide,
        # like _config below, because pynetdicom offers no per-AE setting.
        self.spool.prepare()
        tempfile.tempdir = str(self.spool.incoming)
        _config.STORE_RECV_CHUNKED_DATASET = True
        node = self.settings.node
        ports = [self._serve(node.host, node.port, None)]
        if node.tls.enabled:
            assert node.tls.cert is not None and node.tls.key is not None
            ctx = server_tls_context(node.tls.cert, node.tls.key, node.tls.ca)
            ports.append(self._serve(node.host, node.tls.port, ctx))
        log.info("scp.started", ae_title=node.ae_title, ports=ports)
        return ports

    def _serve(self, host: str, port: int, tls: ssl.SSLContext | None) -> int:
        server = self.ae.make_server(
            (host, port),
            evt_handlers=self._handlers(),
            server_class=_Server,
            request_handler=_GuardedRequestHandler,
        )
        assert isinstance(server, _Server)
        server.tls = tls
        server.handshake_timeout_s = self.settings.node.acse_timeout_s
        self.ae._servers.append(server)  # as start_server does: server_close() removes it
        thread = threading.Thread(target=server.serve_forever, name=f"scp-{port}", daemon=True)
        thread.start()
        self._servers.append(server)
        self._threads.append(thread)
        return int(server.server_address[1])

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for assoc in list(self.ae.active_associations):
            assoc.abort()
        self._servers.clear()
        log.info("scp.stopped")

    # -- association ------------------------------------------------------------------

    def _below_reserve(self) -> bool:
        try:
            return self.spool.free_bytes() < self.settings.node.disk_reserve_mb * 1024 * 1024
        except OSError:
            return True

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = assoc.requestor.primitive.calling_ae_title.strip()
        called = assoc.requestor.primitive.called_ae_title.strip()
        host = assoc.requestor.address
        reason = None
        rj = RJ_CALLING_AE
        if called != self.settings.node.ae_title:
            reason, rj = "called AE title not recognised", RJ_CALLED_AE
        elif not peer_allowed(self.settings.peers, calling, host):
            reason, rj = "calling AE title and host not on the allow-list", RJ_CALLING_AE
        elif self._below_reserve():
            reason, rj = "free disk below the configured reserve", RJ_CONGESTION
        if reason is None:
            return
        assoc.acse.send_reject(*rj)
        # As pynetdicom's own rejection does: wait until the DUL has sent the A-ASSOCIATE-RJ
        # and the peer closed (or ARTIM expired) before the socket is shut down.
        assoc.kill()
        log.warning("scp.association_rejected", calling_ae=calling, called_ae=called, host=host, reason=reason)
        try:
            audit(
                self.database,
                AuditEventName.ASSOCIATION_REJECTED,
                actor=calling,
                host=host,
                outcome="failure",
                called_ae=called,
                reason=reason,
            )
        except SQLAlchemyError as exc:
            log.error("scp.audit_failed", error=str(exc))

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = assoc.requestor.ae_title.strip()
        host = assoc.requestor.address
        with self._lock:
            self._stats[id(assoc)] = _AssocStats(calling, host)
        log.info("scp.association_accepted", calling_ae=calling, host=host)

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        log.info(
            "scp.association_closed",
            calling_ae=stats.calling_ae,
            host=stats.host,
            stored=stats.stored,
            refused=stats.refused,
            how="released" if event.event is evt.EVT_RELEASED else "aborted",
        )
        try:
            with self.database.session() as session:
                add_audit(
                    session,
                    AuditEventName.ASSOCIATION_ACCEPTED,
                    actor=stats.calling_ae,
                    host=stats.host,
                    stored=stats.stored,
                    refused=stats.refused,
                )
                for study_uid in sorted(stats.studies):
                    add_audit(
                        session,
                        AuditEventName.INSTANCES_RECEIVED,
                        actor=stats.calling_ae,
                        host=stats.host,
                        study_uid=study_uid,
                    )
        except SQLAlchemyError as exc:
            log.error("scp.audit_failed", error=str(exc))

    # -- DIMSE ------------------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        log.info("scp.echo", calling_ae=event.assoc.requestor.ae_title.strip())
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        status = self._store(event)
        with self._lock:
            stats = self._stats.get(id(event.assoc))
            if stats is not None:
                if status == SUCCESS:
                    stats.stored += 1
                else:
                    stats.refused += 1
        return status

    def _store(self, event: evt.Event) -> int:
        request = event.request
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        calling = event.assoc.requestor.ae_title.strip()
        tmp = Path(event.dataset_path)
        if self._below_reserve():
            log.warning("scp.store_refused", sop_instance_uid=sop_uid, reason="disk below reserve")
            return OUT_OF_RESOURCES
        try:
            size = tmp.stat().st_size
        except OSError:
            size = 0
        if size > self.settings.node.max_instance_mb * 1024 * 1024:
            # pynetdicom has already streamed it to disk (never to memory); refusing it
            # keeps it out of the spool, and the PACS sees why.
            log.warning("scp.store_refused", sop_instance_uid=sop_uid, reason="instance above max_instance_mb", size=size)
            return OUT_OF_RESOURCES
        try:
            header = read_header(tmp)
            offset = dataset_offset(tmp)
        except HeaderError as exc:
            log.warning("scp.store_unparseable", sop_instance_uid=sop_uid, calling_ae=calling, error=str(exc))
            return exc.status
        study_uid, series_uid = header.text("StudyInstanceUID"), header.text("SeriesInstanceUID")
        if not (study_uid and series_uid and sop_uid):
            log.warning("scp.store_missing_uid", sop_instance_uid=sop_uid, calling_ae=calling)
            return MISSING_UID
        if max(len(study_uid), len(series_uid), len(sop_uid)) > UID_LEN:
            log.warning("scp.store_uid_too_long", sop_instance_uid=sop_uid[:UID_LEN], calling_ae=calling)
            return CANNOT_UNDERSTAND
        ds_sop = header.text("SOPInstanceUID")
        if ds_sop and ds_sop != sop_uid:
            log.warning("scp.store_uid_mismatch", sop_instance_uid=sop_uid, dataset_uid=ds_sop)
            return UID_MISMATCH
        try:
            stored = self.spool.commit(
                tmp, self.spool.instance_relpath(study_uid, sop_uid), hash_from=offset, overlap=True
            )
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                log.error("scp.store_disk_full", sop_instance_uid=sop_uid, error=str(exc))
            else:
                log.error("scp.store_write_failed", sop_instance_uid=sop_uid, error=str(exc))
            return OUT_OF_RESOURCES
        transfer_syntax = str(event.context.transfer_syntax)
        record = InstanceRecord(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=str(request.AffectedSOPClassUID),
            transfer_syntax_uid=transfer_syntax,
            path=stored.relpath,
            size=stored.size,
            sha256=stored.sha256,
            calling_ae=calling,
            patient_id=header.text("PatientID"),
            patient_name=header.text("PatientName"),
            patient_birth_date=header.text("PatientBirthDate"),
            patient_sex=header.text("PatientSex"),
            accession_number=header.text("AccessionNumber"),
            dicom_study_id=header.text("StudyID"),
            study_date=header.text("StudyDate"),
            study_time=header.text("StudyTime"),
            study_description=header.text("StudyDescription"),
            referring_physician=header.text("ReferringPhysicianName"),
            specific_character_set=header.text("SpecificCharacterSet"),
            modality=header.text("Modality"),
            body_part=header.text("BodyPartExamined").upper(),
            series_number=header.text("SeriesNumber"),
            series_description=header.text("SeriesDescription"),
            instance_number=header.text("InstanceNumber"),
            view_position=header.text("ViewPosition").upper(),
            image_laterality=header.text("ImageLaterality"),
            photometric=header.text("PhotometricInterpretation"),
            rows=header.integer("Rows"),
            columns=header.integer("Columns"),
        )
        try:
            outcome = record_instance(
                self.database,
                record,
                quiet_period_s=self.settings.quiet_period_for(calling),
                force_complete_s=self.settings.completion.force_complete_s,
                known=self._known,
            )
        except SQLAlchemyError as exc:
            # The file is in place but not acknowledged: a re-send overwrites it.
            log.error("scp.store_db_failed", sop_instance_uid=sop_uid, error=type(exc).__name__)
            return OUT_OF_RESOURCES
        try:
            # The row committed while the directory entry was being synced; 0x0000 only
            # once both are on disk.
            stored.wait_durable()
        except OSError as exc:
            log.error("scp.store_write_failed", sop_instance_uid=sop_uid, error=str(exc))
            return OUT_OF_RESOURCES
        with self._lock:
            stats = self._stats.get(id(event.assoc))
            if stats is not None:
                stats.studies.add(study_uid)
        log.info(
            "scp.instance_stored",
            sop_instance_uid=sop_uid,
            study_uid=study_uid,
            sop_class_uid=record.sop_class_uid,
            transfer_syntax=transfer_syntax,
            size=stored.size,
            duplicate=not (outcome.new_instance or outcome.changed),
            reopened=outcome.reopened,
        )
        if self.on_stored is not None:
            self.on_stored(outcome)
        return SUCCESS


def transfer_syntax_name(uid: str) -> str:
    return UID(uid).name
