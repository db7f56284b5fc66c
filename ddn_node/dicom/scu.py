"""C-STORE SCU: sending files to a peer (``ddn-node send``, result delivery).

Files are sent as they are on disk (no decode / re-encode): each is proposed in its own
transfer syntax, plus Explicit and Implicit VR Little Endian for uncompressed data so that
a peer that does not accept e.g. big endian can still take it after pydicom re-encodes.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UncompressedTransferSyntaxes,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

from ddn_node.config import DestinationSettings
from ddn_node.dicom.hardening import nodelay, send_datasets_from_files
from ddn_node.dicom.headers import PARSE_ERRORS, ClampedReader
from ddn_node.dicom.syntaxes import IMPLEMENTATION_CLASS_UID, implementation_version_name

log = structlog.get_logger("ddn_node.scu")

# PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255 (128); one is kept for
# Storage Commitment.
MAX_CONTEXTS = 127
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance

# Called with (Transaction UID, SOP Instance UIDs) before a commitment request is sent.
CommitmentHook = Callable[[str, Sequence[str]], None]


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = None
    # The name the peer's TLS certificate must carry (None: ``host``).
    server_name: str | None = None


class Disposition(StrEnum):
    """What became of one object at one peer."""

    SENT = "sent"  # stored (success, or a warning under which the peer keeps it)
    REFUSED = "refused"  # the peer will not take it: sending it again cannot help
    DEFERRED = "deferred"  # not now (resources, time-out, a lost connection): try again later


@dataclass(frozen=True)
class SendOutcome:
    path: Path
    sop_instance_uid: str
    status: int | None  # None: never reached the peer (association failed, unreadable)
    error: str = ""
    disposition: Disposition | None = None  # None: from the status (see classify_status)
    # The Storage Commitment transaction that asked the peer to keep it (PS3.4 J), if any.
    commitment_uid: str | None = None

    @property
    def outcome(self) -> Disposition:
        if self.disposition is not None:
            return self.disposition
        return classify_status(self.status) if self.status is not None else Disposition.DEFERRED

    @property
    def ok(self) -> bool:
        """Success or a warning status the peer stored the object with (PS3.4 B.2.3)."""
        return self.outcome is Disposition.SENT


# Warnings under which Storage SCPs still keep the object: coercion of data elements,
# element discarded, data set does not match SOP class (stored anyway).
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
# Failures that a later attempt may not meet (PS3.7 C.5, PS3.4 B.2.3): a processing
# failure, a peer busy with or unable to cancel other work.
TRANSIENT_STATUSES = frozenset({0x0110, 0x0210, 0x0213})


def classify_status(status: int) -> Disposition:
    """A C-STORE response status as sent, refused or deferred.

    The standard names no such classes; this is what each status means for a retry.
    Refused: Out of Resources (A7xx) and the transient general failures are deferred;
    Error: Data Set does not match SOP Class (A9xx), Cannot understand (Cxxx), and the
    refusals of PS3.7 C.5 - SOP class not supported (0122), not authorized (0124),
    unrecognised operation (0211), mistyped argument (0212), invalid object instance
    (0117) - are refusals: the same object would be refused again.
    """
    if status == 0x0000 or status in WARNING_STATUSES or 0xB000 <= status <= 0xBFFF:
        return Disposition.SENT
    if 0xA700 <= status <= 0xA7FF or status in TRANSIENT_STATUSES:
        return Disposition.DEFERRED
    return Disposition.REFUSED


class _VerifiedSocket(ssl.SSLSocket):
    """An outgoing TLS socket that checks the certificate pin once the handshake is done,
    and leaves on its context why a handshake failed (pynetdicom only logs it)."""

    def do_handshake(self, block: bool = False) -> None:
        context = self.context
        assert isinstance(context, ClientTLSContext)
        try:
            super().do_handshake(block)
        except ssl.SSLCertVerificationError as exc:
            context.failure = (
                f"TLS: the destination's certificate was refused ({exc.verify_message})"
            )
            raise
        except (ssl.SSLError, OSError) as exc:
            context.failure = f"TLS: the handshake failed ({exc})"
            raise
        if context.pin_sha256 is None:
            return
        der = self.getpeercert(binary_form=True) or b""
        presented = hashlib.sha256(der).hexdigest()
        if presented != context.pin_sha256:
            context.failure = (
                "TLS: the destination's certificate is not the pinned one "
                f"(tls_pin_sha256; it presented sha256 {presented})"
            )
            raise ssl.SSLCertVerificationError(context.failure)


class ClientTLSContext(ssl.SSLContext):
    """TLS to a destination that authenticates it: its chain verified against the
    configured CA and its name checked, or its certificate pinned, or both.

    ``failure`` says why the latest handshake failed, for the delivery's error; a context
    serves one send at a time (delivery builds one per attempt)."""

    sslsocket_class = _VerifiedSocket
    pin_sha256: str | None = None
    failure: str | None = None


def client_tls_context(
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    *,
    pin_sha256: str | None = None,
) -> ClientTLSContext:
    """TLS 1.2+ to a DICOM peer (PS3.15 B.1 / BCP 195), which must prove who it is.

    With ``ca``: the chain must end at that CA (the system's public CAs are not trusted)
    and the certificate must carry the name the association is opened with (``Peer``'s
    ``server_name``, else its host; an IP matches a subjectAltName IP). With
    ``pin_sha256`` (sha256 hex of the DER certificate): the peer must present exactly
    that certificate, which is how a self-signed PACS certificate is trusted. With both,
    both hold. ``cert`` and ``key``: the node's own certificate, for mutual TLS.
    """
    if ca is None and pin_sha256 is None:
        raise ValueError("TLS to a peer needs its CA or a pinned certificate")
    context = ClientTLSContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
    else:
        # The pin is the trust: a self-signed certificate has no chain and may carry
        # any name. Compared after the handshake, before a byte of DICOM is sent.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.pin_sha256 = pin_sha256.replace(":", "").lower() if pin_sha256 else None
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


def destination_peer(dest: DestinationSettings) -> Peer:
    """The DICOM peer a ``[[destinations]]`` entry names, with its TLS when it has any."""
    tls = (
        client_tls_context(dest.tls_ca, dest.tls_cert, dest.tls_key, pin_sha256=dest.tls_pin_sha256)
        if dest.tls
        else None
    )
    return Peer(dest.ae_title, dest.host, dest.port, tls, server_name=dest.server_name)


@dataclass(frozen=True)
class _Item:
    path: Path
    sop_class: str
    sop_instance: str
    syntax: str
    raw_ok: bool  # File Meta present and consistent with the data set: send the bytes as they are


def _encoding_syntax(ds: Dataset) -> UID:
    """The transfer syntax of a data set read from a file without File Meta Information."""
    implicit, little = ds.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little in (True, None) else ExplicitVRBigEndian


def _scan(paths: Iterable[Path]) -> tuple[list[_Item], list[SendOutcome]]:
    items, bad = [], []
    for path in paths:
        try:
            # A corrupt length must not make the scan allocate gigabytes (see ClampedReader).
            with ClampedReader(path) as handle:
                ds = pydicom.dcmread(
                    handle,
                    stop_before_pixels=True,
                    specific_tags=["SOPClassUID", "SOPInstanceUID"],
                    force=True,
                    defer_size=4096,
                )
            meta = ds.file_meta
            syntax = meta.get("TransferSyntaxUID") or _encoding_syntax(ds)
            # Some real files carry a File Meta SOP Instance UID that differs from the data
            # set's; the command must name the data set's, so those are re-encoded.
            raw_ok = (
                "TransferSyntaxUID" in meta
                and meta.get("MediaStorageSOPInstanceUID") == ds.SOPInstanceUID
                and meta.get("MediaStorageSOPClassUID") == ds.SOPClassUID
            )
            items.append(
                _Item(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(syntax), raw_ok)
            )
        except (*PARSE_ERRORS, AttributeError) as exc:
            bad.append(SendOutcome(path, "", None, f"not a DICOM file: {exc}"))
    return items, bad


def _contexts(items: Sequence[_Item]) -> list[tuple[list[PresentationContext], list[_Item]]]:
    """Group the items' (SOP class, syntax) needs into batches of at most 128 contexts,
    each with the items it carries.

    Each file's own syntax is proposed first: acceptors pick the first proposed syntax
    they support, and the file's own means its bytes travel unchanged. A deflated file's
    syntax is proposed in a context of its own, because acceptors such as Orthanc prefer
    Explicit VR Little Endian within one context and then store the object inflated (a
    Parametric Map 20 times its deflated size); the usual context is the fallback. A
    compressed file likewise gets a context of its own beside an uncompressed fallback.
    """
    batches: list[tuple[list[PresentationContext], list[_Item]]] = []
    current: dict[tuple[str, str], list[str]] = {}
    carried: list[_Item] = []

    def flush() -> None:
        if current:
            batches.append(([build_context(k[0], v) for k, v in current.items()], list(carried)))
        current.clear()
        carried.clear()

    for item in items:
        needs: list[tuple[tuple[str, str], list[str]]] = []
        if item.syntax == DeflatedExplicitVRLittleEndian:
            needs.append(((item.sop_class, "deflated"), [item.syntax]))
            needs.append(((item.sop_class, ""), [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        elif item.syntax in UncompressedTransferSyntaxes:
            needs.append(
                (
                    (item.sop_class, ""),
                    [item.syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                )
            )
        else:
            # A compressed file in its own syntax, and decompressed where the peer takes
            # only uncompressed data (a JPEG Secondary Capture to a legacy archive).
            needs.append(((item.sop_class, item.syntax), [item.syntax]))
            needs.append(((item.sop_class, ""), [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        new_keys = sum(1 for key, _ in needs if key not in current)
        if new_keys and len(current) + new_keys > MAX_CONTEXTS:
            flush()
        for key, wanted in needs:
            syntaxes = current.setdefault(key, [])
            syntaxes += [s for s in wanted if s not in syntaxes]
        carried.append(item)
    flush()
    return batches


class StoreSCU:
    """Sends DICOM files to one peer over as few associations as possible."""

    def __init__(
        self,
        calling_ae: str,
        peer: Peer,
        *,
        timeout_s: float = 30,
        max_pdu: int = 131072,
    ):
        self.calling_ae = calling_ae
        self.peer = peer
        self.timeout_s = timeout_s
        self.max_pdu = max_pdu

    def _associate(self, contexts: list[PresentationContext]) -> Association:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = implementation_version_name()
        ae.requested_contexts = contexts
        tls = self.peer.tls
        tls_args = None
        if tls is not None:
            if isinstance(tls, ClientTLSContext):
                tls.failure = None
            tls_args = (tls, self.peer.server_name or self.peer.host)
        return ae.associate(
            self.peer.host,
            self.peer.port,
            ae_title=self.peer.ae_title,
            max_pdu=self.max_pdu,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)],
        )

    def _tls_failure(self) -> str | None:
        tls = self.peer.tls
        return tls.failure if isinstance(tls, ClientTLSContext) else None

    def echo(self) -> int | None:
        ae_contexts = [build_context("1.2.840.10008.1.1")]
        assoc = self._associate(ae_contexts)
        if not assoc.is_established:
            return None
        try:
            status = assoc.send_c_echo()
            return int(status.Status) if "Status" in status else None
        finally:
            assoc.release()

    def send(
        self,
        paths: Iterable[Path],
        progress: Callable[[SendOutcome], Any] | None = None,
        *,
        commit: CommitmentHook | None = None,
    ) -> list[SendOutcome]:
        """Send ``paths``; with ``commit``, ask the peer to commit to keeping what it
        stored (Storage Commitment Push Model, PS3.4 J), where it offers that. The hook is
        called with the Transaction UID and the SOP Instance UIDs just before the request
        goes out: a peer may answer within milliseconds, on another association, and the
        answer must find the transaction already recorded."""
        items, outcomes = _scan(paths)
        for outcome in outcomes:
            if progress:
                progress(outcome)
        for contexts, batch_items in _contexts(items):
            if commit is not None:
                contexts = [*contexts, build_context(STORAGE_COMMITMENT)]
            outcomes += self._send_batch(contexts, batch_items, progress, commit=commit)
        return outcomes

    def _send_batch(
        self,
        contexts: list[PresentationContext],
        items: list[_Item],
        progress: Callable[[SendOutcome], Any] | None,
        *,
        commit: CommitmentHook | None = None,
    ) -> list[SendOutcome]:
        outcomes: list[SendOutcome] = []
        assoc = self._associate(contexts)
        if not assoc.is_established:
            why, disposition = _not_associated(assoc, self._tls_failure())
            log.warning(
                "scu.association_failed",
                peer=self.peer.ae_title,
                host=self.peer.host,
                reason=why,
                disposition=disposition.value,
            )
            for item in items:
                outcome = SendOutcome(item.path, item.sop_instance, None, why, disposition)
                outcomes.append(outcome)
                if progress:
                    progress(outcome)
            return outcomes
        try:
            for item in items:
                outcome = self._send_one(assoc, item)
                outcomes.append(outcome)
                if progress:
                    progress(outcome)
                if not assoc.is_established:
                    break
            if commit is not None and assoc.is_established:
                outcomes = self._request_commitment(assoc, outcomes, items, commit)
        finally:
            if assoc.is_established:
                assoc.release()
        sent = {o.path for o in outcomes}
        for item in items:
            if item.path not in sent:
                outcome = SendOutcome(item.path, item.sop_instance, None, "association lost")
                outcomes.append(outcome)
                if progress:
                    progress(outcome)
        return outcomes

    def _send_one(self, assoc: Association, item: _Item) -> SendOutcome:
        """Send the file's bytes as they are when the peer took its transfer syntax;
        otherwise decode with pydicom and let pynetdicom re-encode in an accepted one."""
        accepted = {
            str(cx.transfer_syntax[0])
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == item.sop_class
        }
        if not accepted:
            # The peer refused every context proposed for this SOP class (result 1-4,
            # PS3.8 9.3.3.2): it does not take such objects.
            return SendOutcome(
                item.path,
                item.sop_instance,
                None,
                f"no presentation context: the peer does not take {_class_name(item.sop_class)}",
                Disposition.REFUSED,
            )
        try:
            if item.syntax in accepted and item.raw_ok and _has_file_meta(item.path):
                # Raw bytes, streamed from disk: what was stored is what is sent.
                send_datasets_from_files()
                status = assoc.send_c_store(item.path)
            else:
                status = assoc.send_c_store(_reencodable(item, accepted))
        except (ValueError, AttributeError, OSError, RuntimeError, InvalidDicomError) as exc:
            # e.g. no accepted context for this SOP class / syntax
            return SendOutcome(item.path, item.sop_instance, None, str(exc))
        if "Status" not in status:
            return SendOutcome(item.path, item.sop_instance, None, "no response (timeout or abort)")
        code = int(status.Status)
        return SendOutcome(
            item.path, item.sop_instance, code, "" if code == 0 else f"status 0x{code:04X}"
        )

    def _request_commitment(
        self,
        assoc: Association,
        outcomes: list[SendOutcome],
        items: list[_Item],
        before: CommitmentHook,
    ) -> list[SendOutcome]:
        """N-ACTION Request Storage Commitment (PS3.4 J.3.2) for what the peer stored in
        this association; the outcomes of those objects carry its Transaction UID. The peer
        answers later, with an N-EVENT-REPORT to the node's SCP (its AE title must be
        known to the peer). Skipped when the peer did not accept the SOP class."""
        if not any(cx.abstract_syntax == STORAGE_COMMITMENT for cx in assoc.accepted_contexts):
            return outcomes
        classes = {item.sop_instance: item.sop_class for item in items}
        stored = [o for o in outcomes if o.ok and o.sop_instance_uid in classes]
        if not stored:
            return outcomes
        request = Dataset()
        request.TransactionUID = generate_uid()
        request.ReferencedSOPSequence = []
        for o in stored:
            ref = Dataset()
            ref.ReferencedSOPClassUID = classes[o.sop_instance_uid]
            ref.ReferencedSOPInstanceUID = o.sop_instance_uid
            request.ReferencedSOPSequence.append(ref)
        before(str(request.TransactionUID), [o.sop_instance_uid for o in stored])
        try:
            status, _reply = assoc.send_n_action(
                request, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
            )
        except (ValueError, RuntimeError, OSError) as exc:
            log.warning("scu.commitment_not_requested", peer=self.peer.ae_title, error=str(exc))
            return outcomes
        if "Status" not in status or int(status.Status) != 0x0000:
            log.warning(
                "scu.commitment_not_requested",
                peer=self.peer.ae_title,
                status=str(status.get("Status")),
            )
            return outcomes
        log.info(
            "scu.commitment_requested",
            peer=self.peer.ae_title,
            transaction_uid=str(request.TransactionUID),
            objects=len(stored),
        )
        committed = {o.sop_instance_uid for o in stored}
        return [
            replace(o, commitment_uid=str(request.TransactionUID))
            if o.sop_instance_uid in committed
            else o
            for o in outcomes
        ]


def _not_associated(assoc: Association, tls_failure: str | None = None) -> tuple[str, Disposition]:
    """Why an association did not happen, and whether trying again can help: an
    A-ASSOCIATE-RJ says so itself (result 1 permanent, 2 transient, PS3.8 9.3.4); a peer
    that accepted the association but none of its presentation contexts (a legacy archive
    asked for classes it lacks) will not take those objects; no answer is transient. A
    certificate that did not authenticate the peer is transient too: a PACS's certificate
    is renewed, or its administrator fixes the chain, and the results then go."""
    if tls_failure is not None:
        return tls_failure, Disposition.DEFERRED
    primitive = assoc.acceptor.primitive
    if (
        not assoc.is_rejected
        and getattr(primitive, "result", None) == 0x00
        and assoc.rejected_contexts
    ):
        classes = sorted({_class_name(str(cx.abstract_syntax)) for cx in assoc.rejected_contexts})
        return (
            f"no presentation context: the peer does not take {', '.join(classes)}",
            Disposition.REFUSED,
        )
    if not assoc.is_rejected:
        return "association failed (no connection, or no answer)", Disposition.DEFERRED
    result = getattr(primitive, "result", None)
    source = getattr(primitive, "result_source", None)
    reason = getattr(primitive, "diagnostic", None)
    detail = f"result {result}, source {source}, reason {reason}"
    if result == 0x01:
        return f"association rejected permanently ({detail})", Disposition.REFUSED
    return f"association rejected for now ({detail})", Disposition.DEFERRED


def _class_name(sop_class: str) -> str:
    name = UID(sop_class).name
    return f"{name} ({sop_class})" if name and name != sop_class else sop_class


def _has_file_meta(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def _reencodable(item: _Item, accepted: set[str]) -> Dataset:
    """The data set, decompressed if need be, tagged with a syntax the peer accepted."""
    ds = pydicom.dcmread(item.path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = _encoding_syntax(ds)
    current = ds.file_meta.TransferSyntaxUID
    if current in accepted:
        return ds
    if current.is_compressed and "PixelData" in ds:
        # -> Explicit VR Little Endian; the same object, so the same SOP Instance UID
        # (pydicom 3 makes a new one by default).
        ds.decompress(generate_instance_uid=False)
    if ds.file_meta.TransferSyntaxUID not in accepted:
        target = next((UID(s) for s in accepted if UID(s) in UncompressedTransferSyntaxes), None)
        if target is None:
            raise ValueError(f"the peer accepted no usable transfer syntax for {item.sop_class}")
        ds.file_meta.TransferSyntaxUID = target
        # The data set is re-encoded in the accepted syntax on the wire; pynetdicom refuses
        # one still marked as read in another VR encoding or byte order.
        ds.set_original_encoding(
            target.is_implicit_VR, target.is_little_endian, ds.original_character_set
        )
    return ds


def dicom_files(root: Path) -> list[Path]:
    """Files under ``root`` (or ``root`` itself) in a stable order."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
