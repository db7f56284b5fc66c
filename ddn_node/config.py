"""The node's one typed settings object.

Read from a TOML file and ``DDN_*`` environment overrides, validated once at start-up.
Every other part of the node reads a :class:`Settings`; none writes it, and this module
imports no other part of ``ddn_node`` but the vocabulary (it sits below everything else).

Environment overrides use ``__`` between levels, for example ``DDN_NODE__PORT=11113`` or
``DDN_DATABASE__URL=postgresql+psycopg://...``. Values are parsed as TOML scalars where
possible (``DDN_NODE__PORT=11113`` is an int, ``DDN_WEB__ENABLED=false`` a bool).

Relative paths are resolved against the working directory the node runs in (systemd:
``WorkingDirectory=``), so the example configuration works from a checkout.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ddn_node.vocabulary import HeatMapPolicy, ResultKind, Urgency

ENV_PREFIX = "DDN_"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control chars

Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


def _check_ae(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(value):
        raise ValueError("must be 1-16 printable characters without backslash (DICOM AE title)")
    return stripped


class _Section(BaseModel):
    # Unknown keys are a typo the administrator wants to hear about, not silently ignore.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Section):
    """DICOM TLS (PS3.15 B.1) on a second port."""

    enabled: bool = False
    port: Port = 2762
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = Field(
        default=None,
        description="CA bundle; when set, peers must present a certificate it signed "
        "(and a [[peers]] tls_subject then binds a calling AE title to its certificate)",
    )

    @model_validator(mode="after")
    def _need_cert(self) -> TLSSettings:
        if self.enabled and (self.cert is None or self.key is None):
            raise ValueError("tls.enabled needs both 'cert' and 'key'")
        return self


class NodeSettings(_Section):
    """The DICOM edge: who we are and how we listen."""

    ae_title: str = "DDN_NODE"
    host: str = "0.0.0.0"
    port: Port = 11112
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 16
    max_pdu_size: Annotated[int, Field(ge=0)] = 131072
    acse_timeout_s: Seconds = 30
    dimse_timeout_s: Seconds = 60
    network_timeout_s: Seconds = 60
    spool_dir: Path = Path("var/spool")
    disk_reserve_mb: Annotated[int, Field(ge=0)] = 1024
    max_instance_mb: Annotated[int, Field(ge=1)] = 2048  # larger instances: C-STORE 0xA700
    # Connections open at once from one source address, associated or not (both ports
    # together); more are closed on accept. Without it one host (a port scanner on an
    # allowed subnet, a modality in a retry storm) could hold every association slot.
    # A PACS that sends over more parallel associations needs more.
    max_connections_per_host: Annotated[int, Field(ge=1, le=1000)] = 8
    # How long a new connection has to deliver its whole A-ASSOCIATE-RQ (after the TLS
    # handshake, which has as long). Real peers send it at once; an idle connection holds
    # an association slot for this long at most. Never longer than acse_timeout_s.
    first_pdu_timeout_s: Seconds = 5
    # Processes that serve associations. Python runs one thread at a time per process, so
    # one SCP process uses one core however many associations it serves. Above 1, the
    # process ``serve`` starts accepts on the ports (and applies the allow-list and
    # max_connections_per_host there, for all of them together) and hands each connection
    # to the serving process with the fewest open; max_associations is shared out among
    # them. 0: one per CPU core, at most 4; 1: a single process.
    scp_processes: Annotated[int, Field(ge=0, le=64)] = 0
    tls: TLSSettings = TLSSettings()

    _ae = field_validator("ae_title")(_check_ae)

    @property
    def scp_process_count(self) -> int:
        """How many processes serve associations (``scp_processes``, 0 resolved)."""
        if self.scp_processes:
            return self.scp_processes
        try:
            cores = len(os.sched_getaffinity(0))  # the cores this process may run on
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        return max(1, min(cores, 4))


# The subject attributes a peer's ``tls_subject`` may name, by their usual short names, as
# ssl.SSLSocket.getpeercert() names them.
_SUBJECT_ATTRIBUTES = {
    "CN": "commonName",
    "O": "organizationName",
    "OU": "organizationalUnitName",
    "C": "countryName",
    "L": "localityName",
    "ST": "stateOrProvinceName",
}


class PeerSettings(_Section):
    """One calling AE allowed to associate. ``hosts`` are IPs or CIDR blocks.

    ``tls_subject`` binds the AE title to a client certificate (mutual TLS, ``[node.tls]``
    with ``ca``): ``"CN=ORTHANC"`` (subject attributes, comma-separated, each must be in
    the certificate's subject) or ``"DNS:pacs.example.org"`` (a subjectAltName DNS name).
    Such a peer is then rejected without that certificate, on the plain port too.
    """

    ae_title: str
    hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1"])
    quiet_period_s: Seconds | None = None
    description: str = ""
    tls_subject: str | None = None

    _ae = field_validator("ae_title")(_check_ae)

    @field_validator("tls_subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        if value is not None:
            _subject_terms(value)  # raises ValueError with what is wrong
        return value

    def certificate_matches(self, certificate: Mapping[str, Any] | None) -> bool:
        """Whether a verified client certificate (as ``getpeercert()`` returns it; None
        or empty: none was presented) is the one ``tls_subject`` names. True for a peer
        without ``tls_subject``."""
        if self.tls_subject is None:
            return True
        if not certificate:
            return False
        if self.tls_subject.startswith("DNS:"):
            wanted = self.tls_subject.removeprefix("DNS:").strip().lower()
            names = certificate.get("subjectAltName", ())
            return any(kind == "DNS" and str(name).lower() == wanted for kind, name in names)
        subject = {(k, v) for rdn in certificate.get("subject", ()) for k, v in rdn}
        return all(term in subject for term in _subject_terms(self.tls_subject))

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        import ipaddress

        for host in value:
            if host == "*":
                continue
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError as exc:
                raise ValueError(f"{host!r} is not an IP address or CIDR block") from exc
        return value


def _subject_terms(value: str) -> list[tuple[str, str]]:
    """``"CN=ORTHANC,O=Hospital"`` as getpeercert() subject pairs; ValueError if malformed."""
    if value.startswith("DNS:"):
        if not value.removeprefix("DNS:").strip():
            raise ValueError("'DNS:' needs a name after it")
        return []
    terms = []
    for part in value.split(","):
        key, sep, text = part.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not text or key not in _SUBJECT_ATTRIBUTES:
            raise ValueError(
                f"{part.strip()!r}: expected KEY=VALUE with KEY one of "
                f"{', '.join(_SUBJECT_ATTRIBUTES)} (or 'DNS:name' for a subjectAltName)"
            )
        terms.append((_SUBJECT_ATTRIBUTES[key], text))
    return terms


class DatabaseSettings(_Section):
    url: str = "sqlite:///var/ddn-node.db"
    pool_size: Annotated[int, Field(ge=1)] = 5
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not (value.startswith(("sqlite", "postgresql"))):
            raise ValueError("only sqlite:/// and postgresql+psycopg:// URLs are supported")
        return value


class IngestSettings(_Section):
    """What the SCP does with results that come back with a study (dicom/origin.py).

    Neither kind ever re-opens a study or starts an analysis: only a new source image that
    a routing rule selects does. "drop" answers success (the sender may let go of the
    object) and keeps nothing; "keep" stores it with the study, listed but not analysed.
    """

    own_results: Literal["drop", "keep"] = Field(
        default="drop",
        description="the node's own SR, PM and SC sent back by the PACS: the node has them",
    )
    other_results: Literal["keep", "drop"] = Field(
        default="keep",
        description="results and derived objects of other algorithms and workstations",
    )


class CompletionSettings(_Section):
    """When is a study complete? No DICOM message says so (PS3.4 B.4); we wait for quiet."""

    quiet_period_s: Seconds = 30
    force_complete_s: Seconds = 900
    sweep_interval_s: Seconds = 2


class UrgencyRule(_Section):
    """Studies from a source or a place analysed ahead of (or behind) the others, as in
    ``[[queue.urgency]] calling_aes = ["ED_CR"]  urgency = "STAT"``.

    A rule matches a study when every criterion it names matches: ``calling_aes`` are AE
    titles (exact), ``stations`` and ``departments`` shell patterns (``"ED*"``, case
    ignored) over Station Name (0008,1010) and Institutional Department Name (0008,1040).
    """

    urgency: Urgency
    calling_aes: list[str] = Field(default_factory=list)
    stations: list[str] = Field(default_factory=list)
    departments: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_a_criterion(self) -> UrgencyRule:
        if not (self.calling_aes or self.stations or self.departments):
            raise ValueError("name at least one of calling_aes, stations, departments")
        return self

    def matches(self, calling_ae: str, station: str, department: str) -> bool:
        def like(value: str, patterns: list[str]) -> bool:
            return any(fnmatch.fnmatchcase(value.upper(), p.upper()) for p in patterns)

        return (
            (not self.calling_aes or calling_ae.strip() in {a.strip() for a in self.calling_aes})
            and (not self.stations or like(station, self.stations))
            and (not self.departments or like(department, self.departments))
        )


class QueueSettings(_Section):
    lease_s: Seconds = 300
    max_attempts: Annotated[int, Field(ge=1)] = 3
    retry_delay_s: Seconds = 30
    # Which studies are analysed first (with the order's priority: pipeline/urgency.py).
    urgency: list[UrgencyRule] = Field(default_factory=list)


class WorkerSettings(_Section):
    enabled: bool = True
    device: str = "cpu"
    torch_threads: Annotated[int, Field(ge=0)] = 0
    poll_interval_s: Seconds = 1.0
    # Which findings get a heat map (a Parametric Map frame, an outline in the SR and the
    # overlay): "evidence" only those whose Grad-CAM beat the random and centre-prior
    # baselines in the model's held-out evaluation (see its manifest and model card);
    # "all" every finding at or above its threshold, for an operator whose own evidence
    # says the maps localise; "none" no maps at all.
    heat_maps: HeatMapPolicy = HeatMapPolicy.EVIDENCE
    # The backbone's arithmetic. "bf16" (autocast) was within 0.005 validation AUC of fp32
    # for the bundled model and about 2x faster on a CPU with native bf16; on one without,
    # it can be slower. `ddn-node bench backends` measures both on this machine.
    precision: Literal["fp32", "bf16"] = "fp32"
    # Where the backbone's trunk (up to layer4) runs: "torch", or "onnxruntime" (CPU only,
    # fp32; the ONNX graph is exported from the loaded weights at start-up). Grad-CAM
    # differentiates only the layers after layer4, which stay in torch either way, so
    # probabilities and heat maps match torch fp32. "auto" (the default) is onnxruntime
    # on the CPU at fp32 and torch otherwise (a GPU, bf16): `ddn-node bench backends` on
    # the 2-core development machine, 2026-12-01, validation split: AUC 0.6104 for both
    # (difference 0.0000, no present/absent call changed) and the forward pass 2.4x eager
    # fp32 at batch 16 vs 1.3x for torch channels_last; under load from other processes
    # torch's thread pool collapsed at batch 1 (10x slower) where ONNX Runtime did not.
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"

    @model_validator(mode="after")
    def _backend_fits(self) -> WorkerSettings:
        if self.backend == "onnxruntime" and self.precision != "fp32":
            raise ValueError('backend = "onnxruntime" runs fp32: set precision = "fp32"')
        if self.backend == "onnxruntime" and self.device != "cpu":
            raise ValueError('backend = "onnxruntime" runs on the CPU: set device = "cpu"')
        return self

    @property
    def effective_backend(self) -> Literal["torch", "onnxruntime"]:
        """The backend ``auto`` stands for here, or the one asked for."""
        if self.backend != "auto":
            return self.backend
        return "onnxruntime" if self.device == "cpu" and self.precision == "fp32" else "torch"


class RoutingRule(_Section):
    """Maps studies to a model artifact head, and says which of their images it scores.

    Empty lists match anything. ``match`` and ``exclude`` take any DICOM keyword (or
    ``CallingAE``) -> patterns: a glob (``*``, ``?``, ``[...]``, case-insensitive) or a
    regular expression written ``re:<expression>`` (searched, case-insensitive); an
    instance is selected when, for every ``match`` entry, one of its patterns matches the
    attribute's value, and no ``exclude`` pattern matches. A multi-valued attribute reads
    as its values joined by backslashes (``DERIVED\\PRIMARY``).
    """

    name: str
    model: Path
    head: str
    modalities: list[str] = Field(default_factory=list)
    body_parts: list[str] = Field(default_factory=list)
    views: list[str] = Field(default_factory=list)
    sop_classes: list[str] = Field(default_factory=list)
    match: dict[str, Annotated[list[str], Field(min_length=1)]] = Field(default_factory=dict)
    exclude: dict[str, Annotated[list[str], Field(min_length=1)]] = Field(default_factory=dict)
    # Image Type values that are never scored: a localiser (scout) is not a diagnostic
    # slice, and a secondary image (a screen capture, a reformat, another system's
    # derived output) is not what the head was trained on. Each entry is one value
    # ("LOCALIZER": at any position) or several joined by backslashes that must all be
    # at those positions ("DERIVED\\SECONDARY"; "*" matches any value). DERIVED\\PRIMARY is
    # kept by default: processed radiographs (for presentation) are commonly marked so.
    skip_image_types: list[str] = Field(default_factory=lambda: ["LOCALIZER", "*\\SECONDARY"])
    # When any selected image has one of these views (e.g. the frontal PA/AP of a chest
    # radiograph), only those are scored: a lateral beside a frontal view adds nothing a
    # frontal head can read. Empty: no preference.
    prefer_views: list[str] = Field(default_factory=list)
    # The most images (frames of a multi-frame object each count) scored per study; more
    # are thinned evenly over the series, so a 300-slice MR is read end to end at a
    # bounded cost. 0: no cap.
    max_images: Annotated[int, Field(ge=0)] = 32

    @field_validator("match", "exclude")
    @classmethod
    def _keywords(cls, table: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, patterns in table.items():
            # CallingAE is what the association said, not the header (mercure routes on
            # it too). config imports nothing of pydicom, so a keyword the dictionary does
            # not know reads as a missing attribute (pipeline/routing.py warns once).
            if not re.fullmatch(r"[A-Z][A-Za-z0-9]*", name):
                raise ValueError(
                    f"{name!r} is not a DICOM keyword (e.g. StationName, SeriesDescription) "
                    "nor CallingAE"
                )
            for pattern in patterns:
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as exc:
                        raise ValueError(
                            f"{name}: {pattern!r} is not a regular expression: {exc}"
                        ) from exc
        return table


class DestinationSettings(_Section):
    name: str
    ae_title: str
    host: str
    port: Port
    # Which result kinds this destination gets: "sr" (the findings), "sc" (the overlay any
    # viewer shows), "pm" (the heat maps as Parametric Maps). A PACS whose viewers draw SRs
    # may want only ["sr"]; a legacy archive ["sr", "sc"].
    kinds: list[ResultKind] = Field(
        default_factory=lambda: [ResultKind.SR, ResultKind.PM, ResultKind.SC], min_length=1
    )
    # Ask the destination to commit to keeping what it stored (Storage Commitment Push
    # Model, PS3.4 J), where it offers that; its answer comes to the node's SCP, so the
    # destination must know the node's AE title, host and port (Orthanc: DicomModalities).
    storage_commitment: bool = True
    # When a study is analysed again, withdraw the results it supersedes with an IOCM
    # rejection note (for Orthanc: deploy/orthanc/iocm-rejection.lua applies it).
    withdraw_superseded: bool = False
    # DICOM TLS to the destination. Its certificate is verified against tls_ca (only that
    # CA, never the system's public ones) and must name tls_server_name (default: host; an
    # IP matches a subjectAltName IP entry), and/or it must be the one whose DER encoding
    # has the sha256 tls_pin_sha256 (a self-signed PACS). tls = true needs one of them.
    tls: bool = False
    tls_ca: Path | None = None
    tls_server_name: str | None = None
    tls_pin_sha256: str | None = None
    tls_cert: Path | None = None  # the node's own client certificate (mutual TLS)
    tls_key: Path | None = None

    _ae = field_validator("ae_title")(_check_ae)

    @field_validator("tls_pin_sha256")
    @classmethod
    def _pin(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # As `openssl x509 -noout -fingerprint -sha256` prints it (AB:CD:...) or plain hex.
        pin = value.replace(":", "").strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", pin):
            raise ValueError("must be the sha256 of the certificate: 64 hex digits")
        return pin

    @model_validator(mode="after")
    def _tls_authenticates(self) -> DestinationSettings:
        if self.tls and self.tls_ca is None and self.tls_pin_sha256 is None:
            # Without either the node would send results to whoever answers with any
            # certificate a public CA signed.
            raise ValueError(
                f"destination {self.name!r}: tls = true needs tls_ca (the CA that signed "
                "the PACS's certificate) or tls_pin_sha256 (its certificate's sha256)"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"destination {self.name!r}: tls_cert and tls_key go together")
        return self

    @property
    def server_name(self) -> str:
        """The name the destination's TLS certificate must carry."""
        return self.tls_server_name or self.host


class DeliverySettings(_Section):
    max_attempts: Annotated[int, Field(ge=1)] = 10
    backoff_initial_s: Seconds = 5
    backoff_max_s: Seconds = 900
    sweep_interval_s: Seconds = 2
    timeout_s: Seconds = 30


class TriageSettings(_Section):
    """How an abnormality score and findings become a priority (explained in the UI)."""

    critical_findings: list[str] = Field(default_factory=lambda: ["Pneumothorax"])
    high_score: Annotated[float, Field(ge=0, le=1)] = 0.5
    ageing_minutes_per_step: Annotated[float, Field(ge=0)] = 240.0
    """ROUTINE studies gain one step of rank per this many minutes waiting (0 = off)."""


class UserSettings(_Section):
    name: str
    password_hash: str = Field(description="argon2 hash, made with 'ddn-node hash-password'")
    # radiologist: the worklist, studies, status and priority changes. admin: also the
    # pages under /admin (sessions, the audit trail, quarantined instances).
    role: Literal["radiologist", "admin"] = "radiologist"


# What an API token may do. "read": GET anything a user can see (worklist, studies, images,
# metrics); "worklist:write": mark studies opened / read / unread, override priorities and
# record feedback on findings (POST /api/studies/{uid}/feedback).
# A token is never an admin: the /admin pages need a person's login.
TokenScope = Literal["read", "worklist:write"]


def _read_only() -> list[TokenScope]:
    return ["read"]


class TokenSettings(_Section):
    name: str
    sha256: str = Field(description="sha256 hex of the bearer token")
    # Least privilege by default: a token that only reads the worklist (a dashboard, a RIS
    # polling priorities) cannot change it. Give "worklist:write" explicitly.
    scopes: list[TokenScope] = Field(default_factory=_read_only, min_length=1)
    # From this moment on the token is refused (401, "expired"). A TOML date or date-time;
    # a date, or a date-time without an offset, is in the node's local time zone.
    expires: dt.datetime | dt.date | None = None

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be 64 lower-case hex characters (sha256 of the token)")
        return value

    def expires_at(self) -> dt.datetime | None:
        """``expires`` as an aware date-time (local midnight for a date)."""
        value = self.expires
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            value = dt.datetime(value.year, value.month, value.day)
        # astimezone() on a naive date-time reads it as local time.
        return value if value.tzinfo is not None else value.astimezone()


class WebSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8080
    secret_key: str = Field(default="", description="signs session cookies; generated if empty")
    session_max_age_s: Seconds = 8 * 3600
    login_rate_per_minute: Annotated[int, Field(ge=1)] = 10
    users: list[UserSettings] = Field(default_factory=list)
    tokens: list[TokenSettings] = Field(default_factory=list)
    # HTTPS served by the node itself (TLS 1.2+): PEM certificate (chain) and private key.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # A reverse proxy in front of the node terminates HTTPS (the node listens on loopback):
    # cookies still get the Secure flag and responses Strict-Transport-Security.
    behind_https_proxy: bool = False

    @model_validator(mode="after")
    def _tls_pair(self) -> WebSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("web: tls_cert and tls_key go together (HTTPS needs both)")
        return self

    @property
    def https(self) -> bool:
        """Whether browsers reach the node over HTTPS (served here or by a proxy)."""
        return self.tls_cert is not None or self.behind_https_proxy


HL7Message = Literal["oru", "orm"]


def _oru_only() -> list[HL7Message]:
    return ["oru"]


class HL7Settings(_Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 2575
    sending_application: str = "DDN_NODE"
    sending_facility: str = "RAD"
    receiving_application: str = "RIS"
    receiving_facility: str = "RAD"
    timeout_s: Seconds = 10
    # Which messages go to the RIS, in this order, over the same MLLP connection settings:
    # "oru" the ORU^R01 result (informational: the RIS shows it, its worklist is unchanged),
    # "orm" the ORM^O01 order change (ORC-1 XO) that raises the order's own priority where
    # the RIS sorts its worklist by it. Both: ["oru", "orm"].
    messages: list[HL7Message] = Field(default_factory=_oru_only, min_length=1)

    @field_validator("messages")
    @classmethod
    def _once_each(cls, value: list[HL7Message]) -> list[HL7Message]:
        if len(set(value)) != len(value):
            raise ValueError("each message type once (a RIS would get the same message twice)")
        return value


class HttpAdapterSettings(_Section):
    enabled: bool = False
    url: str = ""
    bearer_token: str = ""
    timeout_s: Seconds = 10


class AdaptersSettings(_Section):
    hl7: HL7Settings = HL7Settings()
    fhir: HttpAdapterSettings = HttpAdapterSettings()
    webhook: HttpAdapterSettings = HttpAdapterSettings()


class RetentionSettings(_Section):
    enabled: bool = False
    max_age_days: Annotated[float, Field(gt=0)] = 30
    interval_s: Seconds = 3600


class DriftSettings(_Section):
    """``[drift]``: the input and score distributions against the model's validation set
    (``pipeline/drift.py``). PSI bands as usually read: < 0.1 no change, >= 0.25 a shift."""

    enabled: bool = True
    window: Annotated[int, Field(ge=10)] = 200  # the latest images of a model version and head
    min_images: Annotated[int, Field(ge=10)] = 100  # fewer: figures shown, no alarm
    psi_alarm: Annotated[float, Field(gt=0)] = 0.25
    # Back under this before the alarm clears, so a PSI wavering at the threshold raises
    # one alarm, not one per image.
    psi_clear: Annotated[float, Field(gt=0)] = 0.1


class AuditSettings(_Section):
    """Where the audit trail goes besides the database: a syslog audit repository.

    "udp": RFC 5426 (port 514; plain, unacknowledged). "tls": RFC 5425, the transport
    DICOM's audit trail profile recommends (port 6514, set it): the repository's
    certificate is verified against ``syslog_ca`` and its name (``syslog_server_name``,
    else ``syslog_host``); ``syslog_cert`` / ``syslog_key`` present the node's own.
    """

    syslog_host: str | None = None
    syslog_port: Port = 514  # the registered port of syslog over TLS is 6514
    syslog_transport: Literal["udp", "tls"] = "udp"
    syslog_ca: Path | None = None
    syslog_cert: Path | None = None
    syslog_key: Path | None = None
    syslog_server_name: str | None = None
    syslog_timeout_s: Seconds = 10

    @model_validator(mode="after")
    def _tls(self) -> AuditSettings:
        if (self.syslog_cert is None) != (self.syslog_key is None):
            raise ValueError("audit: syslog_cert and syslog_key go together")
        if self.syslog_transport == "tls" and self.syslog_host and self.syslog_ca is None:
            # Without a CA of its own the node would trust any public CA's certificate
            # for that name: the audit repository is named by the hospital's PKI.
            raise ValueError("audit: syslog_transport = 'tls' needs syslog_ca")
        return self


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_output: bool = Field(default=True, alias="json")
    file: Path | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Settings(_Section):
    node: NodeSettings = NodeSettings()
    peers: list[PeerSettings] = Field(default_factory=list)
    database: DatabaseSettings = DatabaseSettings()
    ingest: IngestSettings = IngestSettings()
    completion: CompletionSettings = CompletionSettings()
    queue: QueueSettings = QueueSettings()
    worker: WorkerSettings = WorkerSettings()
    routing: list[RoutingRule] = Field(default_factory=list)
    destinations: list[DestinationSettings] = Field(default_factory=list)
    delivery: DeliverySettings = DeliverySettings()
    triage: TriageSettings = TriageSettings()
    web: WebSettings = WebSettings()
    adapters: AdaptersSettings = AdaptersSettings()
    retention: RetentionSettings = RetentionSettings()
    audit: AuditSettings = AuditSettings()
    drift: DriftSettings = DriftSettings()
    logging: LoggingSettings = LoggingSettings()
    demo: bool = Field(
        default=False, description="marks results 'NOT FOR DIAGNOSTIC USE' even for clinical models"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        for label, names in (
            ("destinations", [d.name for d in self.destinations]),
            ("routing", [r.name for r in self.routing]),
            ("web.users", [u.name for u in self.web.users]),
        ):
            dupes = {n for n in names if names.count(n) > 1}
            if dupes:
                raise ValueError(f"{label}: duplicate name(s) {sorted(dupes)}")
        return self

    def quiet_period_for(self, calling_ae: str) -> float:
        for peer in self.peers:
            if peer.ae_title == calling_ae.strip() and peer.quiet_period_s is not None:
                return peer.quiet_period_s
        return self.completion.quiet_period_s


@dataclass(frozen=True)
class ConfigProblem:
    """One precise complaint about a configuration: where and what."""

    source: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}"


class ConfigError(Exception):
    """Raised with every problem found, so the administrator fixes them in one pass."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Nested dict from DDN_A__B=... variables, plus which variable set which key."""
    tree: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        # Other DDN_* variables (DDN_DATA for the tests, say) are not settings.
        if path[0] not in Settings.model_fields:
            continue
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_env_value(raw)
        origin[".".join(path)] = name
    return tree, origin


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _loc_to_key(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts) or "(root)"


def _problems_from_validation(
    exc: ValidationError, source: str, env_origin: dict[str, str]
) -> list[ConfigProblem]:
    problems = []
    for err in exc.errors():
        key = _loc_to_key(err["loc"])
        where = env_origin.get(re.sub(r"\[\d+\]", "", key), source)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (typo? see deploy/ddn-node.example.toml for every setting)"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg = f"{msg} (got {err['input']!r})"
        problems.append(ConfigProblem(where, key, msg))
    return problems


def load_settings(
    path: Path | str | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read, merge and validate. Raises :class:`ConfigError` listing every problem."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([ConfigProblem(source, "(file)", "file not found")]) from None
        except PermissionError:
            raise ConfigError([ConfigProblem(source, "(file)", "file not readable")]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([ConfigProblem(source, "(syntax)", str(exc))]) from None
    overrides, origin = _env_overrides(environ)
    merged = _merge(data, overrides)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_problems_from_validation(exc, source, origin)) from None


def check_paths(settings: Settings, source: str = "(config)") -> list[ConfigProblem]:  # noqa: C901 - one flat check per configured path
    """Problems that only the filesystem can reveal (unreadable certificates, missing models).

    Separate from :func:`load_settings` so that unit tests and tools can build settings
    without the files existing.
    """
    problems: list[ConfigProblem] = []

    def readable(key: str, p: Path | None) -> None:
        if p is None:
            return
        if not p.exists():
            problems.append(ConfigProblem(source, key, f"path {str(p)!r} does not exist"))
        elif not os.access(p, os.R_OK):
            problems.append(ConfigProblem(source, key, f"path {str(p)!r} is not readable"))

    def writable_dir(key: str, p: Path) -> None:
        probe = p
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            problems.append(ConfigProblem(source, key, f"directory {str(p)!r} is not writable"))

    writable_dir("node.spool_dir", settings.node.spool_dir)
    tls = settings.node.tls
    if tls.enabled:
        readable("node.tls.cert", tls.cert)
        readable("node.tls.key", tls.key)
        readable("node.tls.ca", tls.ca)
    for i, peer in enumerate(settings.peers):
        if peer.tls_subject is not None and not (tls.enabled and tls.ca is not None):
            problems.append(
                ConfigProblem(
                    source,
                    f"peers[{i}].tls_subject",
                    f"{peer.ae_title} must present a client certificate, but the node asks "
                    "for none: set [node.tls] enabled = true with ca",
                )
            )
    for i, dest in enumerate(settings.destinations):
        readable(f"destinations[{i}].tls_ca", dest.tls_ca)
        readable(f"destinations[{i}].tls_cert", dest.tls_cert)
        readable(f"destinations[{i}].tls_key", dest.tls_key)
    readable("web.tls_cert", settings.web.tls_cert)
    readable("web.tls_key", settings.web.tls_key)
    if settings.audit.syslog_host:
        readable("audit.syslog_ca", settings.audit.syslog_ca)
        readable("audit.syslog_cert", settings.audit.syslog_cert)
        readable("audit.syslog_key", settings.audit.syslog_key)
    for i, rule in enumerate(settings.routing):
        if not (rule.model / "manifest.json").is_file():
            problems.append(
                ConfigProblem(
                    source, f"routing[{i}].model", f"no model artifact at {str(rule.model)!r}"
                )
            )
    if settings.database.url.startswith("sqlite:///"):
        db_path = Path(settings.database.url.removeprefix("sqlite:///"))
        if str(db_path) not in ("", ":memory:"):
            writable_dir("database.url", db_path.parent)
    if settings.logging.file is not None:
        writable_dir("logging.file", settings.logging.file.parent)
    return problems


# Credentials anyone can guess: the example configuration's (its comments print them) and
# the usual first choices. A node that accepts one of them is open to whoever reaches it.
GUESSABLE_PASSWORDS = ("radiologist", "admin", "password", "demo", "changeme", "ddn-node")
GUESSABLE_TOKENS = ("demo-token", "demo", "token", "changeme", "test", "secret")
MIN_SECRET_KEY_CHARS = 32


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def insecure_settings(settings: Settings, source: str = "(config)") -> list[ConfigProblem]:
    """Logins, tokens and the session key of ``[web]`` that an outsider could guess, and
    a login served over plain HTTP beyond this host.

    Allowed only when the configuration says it is a demo (``demo = true``), and then
    said on every page and in every log line; otherwise ``serve`` refuses to start and
    ``config check`` fails. A web part that is disabled has nothing to guess.
    """
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError

    web = settings.web
    if not web.enabled:
        return []
    problems: list[ConfigProblem] = []
    secret = web.secret_key
    # Without users there are no sessions to forge.
    if web.users and (len(secret) < MIN_SECRET_KEY_CHARS or len(set(secret)) < 8):
        what = "empty" if not secret else f"{len(secret)} characters"
        problems.append(
            ConfigProblem(
                source,
                "web.secret_key",
                f"{what}: needs at least {MIN_SECRET_KEY_CHARS} random characters (sessions "
                "must survive restarts and be the same in every process), e.g. from "
                "'python -c \"import secrets; print(secrets.token_urlsafe(32))\"'",
            )
        )
    hasher = PasswordHasher()
    for i, user in enumerate(web.users):
        for guess in (user.name, *GUESSABLE_PASSWORDS):
            try:
                hasher.verify(user.password_hash, guess)
            except (VerificationError, InvalidHashError):
                continue
            problems.append(
                ConfigProblem(
                    source,
                    f"web.users[{i}].password_hash",
                    f"user {user.name!r} has a guessable password (the demo's or a common "
                    "one): set another with 'ddn-node hash-password'",
                )
            )
            break
    if not web.https and not _loopback(web.host) and (web.users or web.tokens):
        problems.append(
            ConfigProblem(
                source,
                "web.host",
                f"plain HTTP on {web.host!r}: passwords, tokens and session cookies would "
                "cross the network readable; set tls_cert and tls_key (or behind_https_proxy "
                "= true when a TLS proxy in front is the only way in)",
            )
        )
    guessed = {hashlib.sha256(t.encode()).hexdigest() for t in GUESSABLE_TOKENS}
    for i, token in enumerate(web.tokens):
        if token.sha256 in guessed:
            problems.append(
                ConfigProblem(
                    source,
                    f"web.tokens[{i}].sha256",
                    f"token {token.name!r} is a guessable one (the demo's or a common word): "
                    "issue a random token (e.g. secrets.token_urlsafe(32)) and store its sha256",
                )
            )
    return problems
