"""The Storage SCP: C-ECHO and C-STORE on the configured AE title, plain and TLS ports.

The DIMSE thread only writes bytes and commits a row: pynetdicom streams each dataset to a
file in the spool's ``incoming/`` as it arrives (``STORE_RECV_CHUNKED_DATASET``), the
handler reads the indexed header attributes (never the pixels), fsyncs and renames the
file into place, commits the rows, and only then answers 0x0000. Decoding and inference
happen later, in the worker.

Statuses (PS3.4 B.2.3, listed in docs/conformance-statement.md):
0x0000 stored (also for an idempotent re-send); 0xA700 out of resources (disk below the
reserve, spool or database unwritable); 0xC000 the data set cannot be parsed; 0xC001 a
required UID is missing; 0xC002 the data set's SOP Instance UID differs from the command's;
0xC003 its identity contradicts what the node holds (a known SOP Instance UID in another
study or series, a known Series UID in another study, a known study with another Patient
ID): refused with an Error Comment saying which, kept in quarantine and audited.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import uid_to_sop_class
from sqlalchemy.exc import SQLAlchemyError

from ddn_node.config import PeerSettings, Settings
from ddn_node.dicom.dispatch import READY, HandedServer
from ddn_node.dicom.hardening import (
    ConnectionGate,
    GuardedRequestHandler,
    HardenedServer,
    Received,
    peer_certificate,
    register_server,
    remember_valid_uids,
    share_contexts,
    skip_discarded_logging,
    stream_received_datasets,
    take_received,
)
from ddn_node.dicom.headers import (
    Header,
    HeaderError,
    dataset_offset,
    order_priority,
    read_received_header,
)
from ddn_node.dicom.origin import classify
from ddn_node.dicom.scu import STORAGE_COMMITMENT
from ddn_node.dicom.spool import Spool, StoredFile
from ddn_node.dicom.syntaxes import (
    IMPLEMENTATION_CLASS_UID,
    implementation_version_name,
    storage_sop_classes,
    supported_transfer_syntaxes,
)
from ddn_node.model.identity import manifest_device_uid
from ddn_node.store.audit import AuditEventName, add_audit, audit
from ddn_node.store.engine import Database
from ddn_node.store.ingest import (
    IdentityConflict,
    IngestOutcome,
    InstanceRecord,
    KnownSeries,
    record_instance,
    warm_up,
)
from ddn_node.store.models import UID_LEN, utcnow
from ddn_node.store.quarantine import Refusal, record_refusal
from ddn_node.store.results import CommitmentReport, record_commitment
from ddn_node.vocabulary import ConflictKind, InstanceOrigin

log = structlog.get_logger("ddn_node.scp")

# pynetdicom generates its SOP class names at import, where mypy cannot see them.
Verification = uid_to_sop_class("1.2.840.10008.1.1")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
MISSING_UID = 0xC001
UID_MISMATCH = 0xC002
IDENTITY_CONFLICT = 0xC003

# Error Comment (0000,0902, LO: at most 64 characters) of a 0xC003 answer, per kind.
CONFLICT_COMMENTS = {
    ConflictKind.INSTANCE_OTHER_STUDY: "SOP Instance UID already stored in another study",
    ConflictKind.INSTANCE_OTHER_SERIES: "SOP Instance UID already stored in another series",
    ConflictKind.SERIES_OTHER_STUDY: "Series Instance UID already stored in another study",
    ConflictKind.STUDY_OTHER_PATIENT: "Study Instance UID already stored for another Patient ID",
}

# A-ASSOCIATE-RJ (result, source, reason) triples, PS3.8 9.3.4
RJ_CALLING_AE = (0x01, 0x01, 0x03)
RJ_CALLED_AE = (0x01, 0x01, 0x07)
RJ_CONGESTION = (0x02, 0x03, 0x01)


def peer_allowed(
    peers: list[PeerSettings],
    calling_ae: str | None,
    host: str,
    certificate: Mapping[str, Any] | None = None,
    *,
    match_certificate: bool = True,
) -> bool:
    """Is (calling AE title, source address, client certificate) on the allow-list?

    ``calling_ae`` None: any entry's AE title (the check on accept, by address alone).
    ``certificate`` is the verified client certificate (None: plain TCP, or none asked
    for); an entry with ``tls_subject`` needs one that matches it, unless
    ``match_certificate`` is False (to tell which of the checks refused a caller).
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for peer in peers:
        if calling_ae is not None and peer.ae_title != calling_ae.strip():
            continue
        if (
            calling_ae is not None
            and match_certificate
            and not peer.certificate_matches(certificate)
        ):
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
        selects: Callable[[InstanceRecord], bool] | None = None,
    ):
        self.settings = settings
        self.database = database
        self.spool = spool
        self.on_stored = on_stored
        # Whether a received source image is one a routing rule scores: only those re-open
        # a completed study (the node's composition passes pipeline.routing.selects).
        self.selects = selects or (lambda record: record.origin == InstanceOrigin.SOURCE)
        # The Device UIDs of the node's models, by which its own results are recognised.
        self._own_devices = frozenset(
            uid for uid in (manifest_device_uid(rule.model) for rule in settings.routing) if uid
        )
        self._servers: list[HardenedServer] = []
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
        # The answers to the node's Storage Commitment requests (N-EVENT-REPORT), which a
        # PACS sends on an association of its own (PS3.4 J.3.3).
        ae.add_supported_context(STORAGE_COMMITMENT, scu_role=True, scp_role=True)
        return ae

    def _handlers(self) -> list[evt.EventHandlerType]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_EVENT_REPORT, self._on_commitment),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]

    def warm_up(self) -> None:
        """Do once, before the first peer, what the first instance would otherwise wait
        for: compiling the ingest statements, pydicom's first parse."""
        try:
            warm_up(self.database)
        except (SQLAlchemyError, IdentityConflict) as exc:
            log.warning("scp.warm_up_failed", error=type(exc).__name__)
        probe = Dataset()
        probe.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        probe.SOPInstanceUID = probe.StudyInstanceUID = probe.SeriesInstanceUID = "2.25.1"
        probe.PatientID = "warm-up"
        probe.file_meta = FileMetaDataset()
        probe.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = self.spool.incoming / f"warm-up-{os.getpid()}.dcm"
        try:
            probe.save_as(path, enforce_file_format=True)
            read_received_header(path, dataset_offset(path), ExplicitVRLittleEndian)
        except (OSError, HeaderError) as exc:
            log.warning("scp.warm_up_failed", error=type(exc).__name__)
        finally:
            path.unlink(missing_ok=True)

    def start(self) -> list[int]:
        """Start listening (non-blocking); returns the bound ports (plain first)."""
        self.spool.prepare()
        stream_received_datasets(self.spool.incoming)
        skip_discarded_logging()
        remember_valid_uids()
        self.warm_up()
        node = self.settings.node
        ports = [self._serve(node.host, node.port, None)]
        if node.tls.enabled:
            assert node.tls.cert is not None and node.tls.key is not None
            ctx = server_tls_context(node.tls.cert, node.tls.key, node.tls.ca)
            ports.append(self._serve(node.host, node.tls.port, ctx))
        log.info("scp.started", ae_title=node.ae_title, ports=ports)
        return ports

    def serve_handed(self, channels: list[socket.socket], parent_gone: threading.Event) -> None:
        """Serve the connections another process accepts and hands over (one of a group
        of ``[node] scp_processes``; ``dicom/dispatch.py``): one pair per port, plain
        first. That process applies the allow-list gate and the per-host limit; this one
        gets its share of ``max_associations``."""
        self.spool.prepare()
        stream_received_datasets(self.spool.incoming)
        skip_discarded_logging()
        remember_valid_uids()
        self.warm_up()
        node = self.settings.node
        self.ae.maximum_associations = max(1, -(-node.max_associations // node.scp_process_count))
        tls = None
        if node.tls.enabled:
            assert node.tls.cert is not None and node.tls.key is not None
            tls = server_tls_context(node.tls.cert, node.tls.key, node.tls.ca)
        ports = [node.port, node.tls.port]
        for index, channel in enumerate(channels):
            server = self._make_server(
                node.host, ports[index], tls if index else None, HandedServer, gate=False
            )
            assert isinstance(server, HandedServer)
            server.attach(channel, parent_gone)
            self._run(server, f"scp-handed-{index}")
        self.say_to_group(READY)
        log.info("scp.started", ae_title=node.ae_title, ports=ports[: len(channels)], handed=True)

    def say_to_group(self, message: bytes) -> None:
        """One message to the group's accepting process (after :meth:`serve_handed`)."""
        cast(HandedServer, self._servers[0]).say(message)

    def _make_server(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        server_class: type[HardenedServer] = HardenedServer,
        *,
        gate: bool = True,
    ) -> HardenedServer:
        node = self.settings.node
        server = self.ae.make_server(
            (host, port),
            evt_handlers=self._handlers(),
            server_class=server_class,
            request_handler=GuardedRequestHandler,
        )
        assert isinstance(server, HardenedServer)
        share_contexts(server)
        server.tls = tls
        # The TLS handshake and then the A-ASSOCIATE-RQ each get the first-PDU timeout.
        server.first_pdu_timeout_s = min(node.first_pdu_timeout_s, node.acse_timeout_s)
        server.handshake_timeout_s = server.first_pdu_timeout_s
        # One gate for both ports, so that the per-host limit counts them together. On
        # accept only the address is known: any entry's hosts let it in ("*": any).
        if gate:
            server.gate = (
                self._servers[0].gate
                if self._servers
                else ConnectionGate(
                    lambda address: peer_allowed(self.settings.peers, None, address),
                    node.max_connections_per_host,
                )
            )
        register_server(self.ae, server)
        return server

    def _run(self, server: HardenedServer, name: str) -> None:
        thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
        thread.start()
        self._servers.append(server)
        self._threads.append(thread)

    def _serve(self, host: str, port: int, tls: ssl.SSLContext | None) -> int:
        server = self._make_server(host, port, tls)
        self._run(server, f"scp-{port}")
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
        primitive = assoc.requestor.primitive
        assert primitive is not None  # EVT_REQUESTED: the A-ASSOCIATE-RQ has arrived
        calling = primitive.calling_ae_title.strip()
        called = primitive.called_ae_title.strip()
        host = assoc.requestor.address
        peers = self.settings.peers
        certificate = peer_certificate(assoc)
        reason = None
        rj = RJ_CALLING_AE
        if called != self.settings.node.ae_title:
            reason, rj = "called AE title not recognised", RJ_CALLED_AE
        elif not peer_allowed(peers, calling, host, match_certificate=False):
            reason, rj = "calling AE title and host not on the allow-list", RJ_CALLING_AE
        elif not peer_allowed(peers, calling, host, certificate):
            # Mutual TLS bound to the AE title: another client certificate (or none, on the
            # plain port) may not speak as this peer.
            reason, rj = "client certificate does not match the peer's tls_subject", RJ_CALLING_AE
        elif self._below_reserve():
            reason, rj = "free disk below the configured reserve", RJ_CONGESTION
        if reason is None:
            return
        assoc.acse.send_reject(*rj)
        # As pynetdicom's own rejection does: wait until the DUL has sent the A-ASSOCIATE-RJ
        # and the peer closed (or ARTIM expired) before the socket is shut down.
        assoc.kill()
        # Which certificate was presented is no patient data, and says what to fix.
        subject = ",".join(
            f"{k}={v}" for rdn in (certificate or {}).get("subject", ()) for k, v in rdn
        )
        log.warning(
            "scp.association_rejected",
            calling_ae=calling,
            called_ae=called,
            host=host,
            reason=reason,
            **({"certificate_subject": subject} if subject else {}),
        )
        try:
            audit(
                self.database,
                AuditEventName.ASSOCIATION_REJECTED,
                actor=calling,
                host=host,
                outcome="failure",
                called_ae=called,
                reason=reason,
                **({"certificate_subject": subject} if subject else {}),
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

    def _on_commitment(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """A Storage Commitment result (PS3.4 J.3.3): which of the objects the node asked a
        destination to keep it commits to (Event Type 1) and which it does not (2)."""
        info = event.event_information
        transaction = str(info.get("TransactionUID", ""))
        committed = [str(r.ReferencedSOPInstanceUID) for r in info.get("ReferencedSOPSequence", [])]
        failed = {
            str(r.ReferencedSOPInstanceUID): int(r.get("FailureReason", 0x0110))
            for r in info.get("FailedSOPSequence", [])
        }
        report = CommitmentReport(transaction, committed, failed)
        try:
            with self.database.session() as session:
                named = record_commitment(session, report, utcnow())
        except SQLAlchemyError as exc:
            log.error(
                "scp.commitment_not_recorded", transaction_uid=transaction, error=type(exc).__name__
            )
            return 0x0110, None  # processing failure: the PACS may send the report again
        log.info(
            "scp.commitment_report",
            calling_ae=event.assoc.requestor.ae_title.strip(),
            transaction_uid=transaction,
            committed=len(committed),
            failed=len(failed),
            rows=named,
        )
        return SUCCESS, None

    def _on_echo(self, event: evt.Event) -> int:
        log.info("scp.echo", calling_ae=event.assoc.requestor.ae_title.strip())
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        status = self._store(event)
        code = int(status.Status) if isinstance(status, Dataset) else status
        with self._lock:
            stats = self._stats.get(id(event.assoc))
            if stats is not None:
                if code == SUCCESS:
                    stats.stored += 1
                else:
                    stats.refused += 1
        return status

    def _dropped(self, origin: InstanceOrigin) -> bool:
        """Results the configuration says not to keep ([ingest]); acknowledged all the same:
        the node has its own, and another's is no source of an analysis."""
        ingest = self.settings.ingest
        return (origin is InstanceOrigin.OWN and ingest.own_results == "drop") or (
            origin is InstanceOrigin.OTHER and ingest.other_results == "drop"
        )

    def _refusal(self, tmp: Path, sop_uid: str, size: int | None) -> int | None:
        """0xA700 when the instance cannot be kept: the disk is below its reserve, or the
        instance is larger than allowed (``size``: of the file, None to look)."""
        if self._below_reserve():
            log.warning("scp.store_refused", sop_instance_uid=sop_uid, reason="disk below reserve")
            return OUT_OF_RESOURCES
        if size is None:
            try:
                size = tmp.stat().st_size
            except OSError:
                size = 0
        if size > self.settings.node.max_instance_mb * 1024 * 1024:
            # pynetdicom has already streamed it to disk (never to memory); refusing it
            # keeps it out of the spool, and the PACS sees why.
            log.warning(
                "scp.store_refused",
                sop_instance_uid=sop_uid,
                reason="instance above max_instance_mb",
                size=size,
            )
            return OUT_OF_RESOURCES
        return None

    # Each early return below is one C-STORE status (PS3.4 B.2.3), in the order decided.
    def _store(self, event: evt.Event) -> int | Dataset:
        request = cast(C_STORE, event.request)  # EVT_C_STORE's request is a C-STORE
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        calling = event.assoc.requestor.ae_title.strip()
        tmp = Path(event.dataset_path)
        # What streaming the file learnt (its size, hash, first bytes): None if it was
        # not streamed through the hashing file, and then the file itself is read.
        received = take_received(tmp)
        refused = self._refusal(tmp, sop_uid, received.size if received else None)
        if refused is not None:
            return refused
        # The file's fsync runs while its header is read and checked; nothing is renamed
        # or committed before it has completed (Spool.commit waits for it).
        synced = self.spool.start_sync(tmp, received.fd if received else None)
        transfer_syntax = str(event.context.transfer_syntax)
        try:
            offset, header = _read_received(tmp, received, transfer_syntax)
        except HeaderError as exc:
            log.warning(
                "scp.store_unparseable",
                sop_instance_uid=sop_uid,
                calling_ae=calling,
                error=str(exc),
            )
            return exc.status
        study_uid, series_uid = header.text("StudyInstanceUID"), header.text("SeriesInstanceUID")
        if not (study_uid and series_uid and sop_uid):
            log.warning("scp.store_missing_uid", sop_instance_uid=sop_uid, calling_ae=calling)
            return MISSING_UID
        if max(len(study_uid), len(series_uid), len(sop_uid)) > UID_LEN:
            log.warning(
                "scp.store_uid_too_long", sop_instance_uid=sop_uid[:UID_LEN], calling_ae=calling
            )
            return CANNOT_UNDERSTAND
        ds_sop = header.text("SOPInstanceUID")
        if ds_sop and ds_sop != sop_uid:
            log.warning("scp.store_uid_mismatch", sop_instance_uid=sop_uid, dataset_uid=ds_sop)
            return UID_MISMATCH
        origin = classify(header, self._own_devices)
        if self._dropped(origin):
            tmp.unlink(missing_ok=True)
            log.info(
                "scp.result_dropped",
                sop_instance_uid=sop_uid,
                study_uid=study_uid,
                origin=origin.value,
                calling_ae=calling,
            )
            return SUCCESS
        try:
            stored = self.spool.commit(
                tmp,
                self.spool.instance_relpath(study_uid, sop_uid),
                sha256=received.sha256 if received else None,
                hash_from=offset,
                overlap=True,
                keep_existing=True,
                synced=synced,
            )
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                log.error("scp.store_disk_full", sop_instance_uid=sop_uid, error=str(exc))
            else:
                log.error("scp.store_write_failed", sop_instance_uid=sop_uid, error=str(exc))
            return OUT_OF_RESOURCES
        record = _record_of(header, request, stored, calling, transfer_syntax, origin)
        try:
            outcome = record_instance(
                self.database,
                record,
                quiet_period_s=self.settings.quiet_period_for(calling),
                force_complete_s=self.settings.completion.force_complete_s,
                known=self._known,
                may_reopen=self.selects(record),
            )
        except IdentityConflict as conflict:
            return self._refuse_conflict(record, conflict, event.assoc.requestor.address)
        except SQLAlchemyError as exc:
            # The file is in place but not acknowledged: a re-send of it is identical.
            log.error("scp.store_db_failed", sop_instance_uid=sop_uid, error=type(exc).__name__)
            return OUT_OF_RESOURCES
        try:
            # The row committed while the directory entry was being synced; 0x0000 only
            # once both are on disk.
            stored.wait_durable()
        except OSError as exc:
            log.error("scp.store_write_failed", sop_instance_uid=sop_uid, error=str(exc))
            return OUT_OF_RESOURCES
        self._acknowledged(event, record, stored, outcome)
        return SUCCESS

    def _acknowledged(
        self, event: evt.Event, record: InstanceRecord, stored: StoredFile, outcome: IngestOutcome
    ) -> None:
        """What follows a durable store: the duplicate's spare copy goes, then counts and logs."""
        if outcome.path != stored.relpath:
            # An identical re-send: the instance row keeps naming the copy it had.
            self.spool.path(stored.relpath).unlink(missing_ok=True)
        with self._lock:
            stats = self._stats.get(id(event.assoc))
            if stats is not None:
                stats.studies.add(record.study_uid)
        log.info(
            "scp.instance_stored",
            sop_instance_uid=record.sop_instance_uid,
            study_uid=record.study_uid,
            sop_class_uid=record.sop_class_uid,
            transfer_syntax=record.transfer_syntax_uid,
            size=stored.size,
            duplicate=not (outcome.new_instance or outcome.changed),
            reopened=outcome.reopened,
        )
        if self.on_stored is not None:
            self.on_stored(outcome)

    def _refuse_conflict(
        self, record: InstanceRecord, conflict: IdentityConflict, host: str
    ) -> int | Dataset:
        """0xC003 with an Error Comment; the bytes go to quarantine for the administrator,
        the refusal to the audit trail. Nothing the node held has changed."""
        try:
            quarantined = self.spool.quarantine(record.path)
        except OSError as exc:
            log.error(
                "scp.quarantine_failed", sop_instance_uid=record.sop_instance_uid, error=str(exc)
            )
            quarantined = ""
            self.spool.path(record.path).unlink(missing_ok=True)
        log.warning(
            "scp.store_identity_conflict",
            sop_instance_uid=record.sop_instance_uid,
            study_uid=record.study_uid,
            existing_study_uid=conflict.existing_study_uid,
            kind=conflict.kind.value,
            calling_ae=record.calling_ae,
        )
        refusal = Refusal(
            kind=conflict.kind,
            calling_ae=record.calling_ae,
            host=host,
            sop_instance_uid=record.sop_instance_uid,
            sop_class_uid=record.sop_class_uid,
            study_uid=record.study_uid,
            series_uid=record.series_uid,
            existing_study_uid=conflict.existing_study_uid,
            existing_series_uid=conflict.existing_series_uid,
            path=quarantined,
            size=record.size,
            sha256=record.sha256,
        )
        try:
            with self.database.session() as session:
                record_refusal(session, refusal)
        except SQLAlchemyError as exc:
            log.error("scp.audit_failed", error=type(exc).__name__)
        answer = Dataset()
        answer.Status = IDENTITY_CONFLICT
        answer.ErrorComment = CONFLICT_COMMENTS[conflict.kind]
        return answer


def _read_received(
    tmp: Path, received: Received | None, transfer_syntax: str
) -> tuple[int, Header]:
    """(where the data set starts, its indexed attributes): from what streaming the file
    kept, or from the file itself where it was not streamed so."""
    if received is None:
        offset = dataset_offset(tmp)
        return offset, read_received_header(tmp, offset, transfer_syntax)
    offset = received.dataset_offset
    head = received.head
    return offset, read_received_header(tmp, offset, transfer_syntax, head, received.dataset_bytes)


def _record_of(
    header: Header,
    request: C_STORE,
    stored: StoredFile,
    calling: str,
    transfer_syntax: str,
    origin: InstanceOrigin,
) -> InstanceRecord:
    """What the database keeps of one stored instance: its header's indexed attributes."""
    study_uid, series_uid = header.text("StudyInstanceUID"), header.text("SeriesInstanceUID")
    sop_uid = str(request.AffectedSOPInstanceUID or "")
    return InstanceRecord(
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
        origin=origin,
        image_type=header.text("ImageType").upper(),
        station_name=header.text("StationName"),
        institution_name=header.text("InstitutionName"),
        # A missing or nonsensical Number of Frames is one frame (PS3.3 C.7.6.6).
        frames=max(1, header.integer("NumberOfFrames") or 1),
        order_priority=order_priority(header),
        department=header.text("InstitutionalDepartmentName"),
    )
