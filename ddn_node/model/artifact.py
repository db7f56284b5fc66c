"""The model artifact: ``weights.safetensors`` + ``manifest.json`` (+ ``README.md`` model card).

Loading reads JSON and safetensors only, so a model file cannot execute code (unlike a
pickled ``torch.save`` checkpoint, which ``torch.load`` without ``weights_only`` would
run). The manifest records the weights' sha256 and loading refuses a file whose bytes
differ, so a swapped or corrupted weight file never scores a patient.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ddn_node.model.ddn import DDN, DDNConfig, HeadConfig
from ddn_node.model.identity import device_uid_from_sha256
from ddn_node.model.preprocess import PreprocessSpec
from ddn_node.model.types import AlgorithmInfo, LabelSpec
from ddn_node.vocabulary import HeatMapPolicy


def software_version() -> str:
    """The installed ddn-node version.

    Read from the package metadata rather than ``ddn_node.__version__`` so that it works
    however ``ddn_node`` was imported (an editable install can expose it as a namespace
    package without its ``__init__`` attributes).
    """
    try:
        return version("ddn-node")
    except PackageNotFoundError:
        return "0.0.0+source"


MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
SCHEMA_VERSION = 1
DEMO_INTENDED_USE = (
    "Demonstration and research only, not for diagnostic use. Not a medical device: "
    "no regulatory clearance, trained on a small public data set, not clinically validated."
)


class ArtifactError(ValueError):
    """The artifact is missing, malformed, or its weights do not match the manifest."""


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AbnormalityDef(_M):
    """How a head's probabilities become one study-level abnormality score in [0, 1].

    ``max_probability``: the highest probability among ``labels`` (default: all labels).
    ``complement``: 1 - P(``labels[0]``), for a head with a "normal" class; that class
    (``labels[0]``) is then no finding: never reported present, never given a heat map.
    Study probabilities are the per-label maximum over the study's scored images, and for
    the normal class the minimum: the study is as normal as its most abnormal image, so
    its score is the maximum over images of 1 - P(normal).
    """

    kind: Literal["max_probability", "complement"]
    labels: list[str] = Field(default_factory=list)
    description: str = ""


# --- localisation evidence (which labels get heat maps) ------------------------------
#
# ``ddn-node evaluate --bboxes ... --record-in-manifest`` measures, per label, how often the
# Grad-CAM map's peak falls inside an expert box (the pointing game) and compares it with
# two maps that know nothing about the image: a random one and a fixed centre prior. Only
# labels whose maps beat both get heat maps by default. A manifest without this record
# (older artifacts) loads as before; its labels then have no evidence and get no maps.

PART_NAMES = {
    "val": "validation patients",
    "test": "held-out test patients",
    "all": "all evaluated images",
}


class PartLocalisation(_M):
    """Pointing game of one label on one part of the data (``val``, ``test`` or ``all``)."""

    n_boxes: int = 0
    n_images: int = 0
    n_patients: int = 0
    hits: int = 0
    pointing_game: float | None = None  # hits / n_boxes
    ci95: tuple[float, float] | None = None  # Wilson interval on n_effective
    n_effective: float | None = None  # boxes as independent units after patient clustering (Kish)
    random: float | None = None  # expected hit rate of a random peak: mean box area fraction
    centre: float | None = None  # hit rate of a fixed map peaking at the image centre


class LabelLocalisation(_M):
    maps_shown: bool
    reason: str
    parts: dict[str, PartLocalisation] = Field(default_factory=dict)


class LocalisationRule(_M):
    """How ``maps_shown`` was decided (recorded, so that the decision can be re-read)."""

    kind: Literal["ci_lower_bound", "point_estimate"]
    confidence: float = 0.95
    min_boxes: int = 5
    decided_on: str  # the part whose figures decide: "val" unless the artifact has no split
    description: str = ""


class LocalisationRecord(_M):
    metric: str = ""
    baselines: str = ""
    rule: LocalisationRule
    weights_sha256: str  # the evidence is about these weights only
    labels: dict[str, LabelLocalisation]
    command: str = ""
    created: str = ""


class HeadInfo(_M):
    activation: Literal["sigmoid", "softmax"]
    # The boundary dataclasses themselves (pydantic validates stdlib dataclasses), so the
    # worker gets ``LabelSpec`` objects without a conversion layer.
    labels: list[LabelSpec]
    abnormality: AbnormalityDef
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    localisation: LocalisationRecord | None = None

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, labels: list[LabelSpec]) -> list[LabelSpec]:
        names = [lab.name for lab in labels]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate label names {names}")
        for lab in labels:
            if not 0.0 <= lab.threshold <= 1.0:
                raise ValueError(f"threshold of {lab.name} must be in [0, 1]")
        return labels

    @property
    def label_names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    @property
    def normal_labels(self) -> frozenset[str]:
        """The head's "normal" class (``notumor``), where its abnormality score is the
        complement of one: a label that says no finding was seen."""
        a = self.abnormality
        return frozenset(a.labels[:1]) if a.kind == "complement" else frozenset()


class ArchitectureModel(_M):
    name: str = "DDN"
    backbone: Literal["resnet50", "resnet18", "tiny"]
    attention: str = "CBAM spatial-channel attention (Woo et al., ECCV 2018)"
    attention_stages: list[str]
    attention_reduction: int
    dropout: float
    tiny_widths: list[int] = Field(default_factory=lambda: [8, 16, 32, 64])
    gradcam_layer: str = "layer4"


class WeightsModel(_M):
    file: str = WEIGHTS
    sha256: str
    dtype: str
    n_parameters: int


class Manifest(_M):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    algorithm_name: str
    manufacturer: str = "ddn-node project"
    intended_use: str = DEMO_INTENDED_USE
    is_demo: bool = True
    architecture: ArchitectureModel
    heads: dict[str, HeadInfo]
    preprocess: PreprocessSpec
    weights: WeightsModel
    codes_source: str = ""
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    created: str = ""
    software_version: str = ""

    def ddn_config(self) -> DDNConfig:
        a = self.architecture
        return DDNConfig(
            backbone=a.backbone,
            heads=tuple(
                HeadConfig(n, tuple(h.label_names), h.activation) for n, h in self.heads.items()
            ),
            attention_stages=tuple(a.attention_stages),
            attention_reduction=a.attention_reduction,
            dropout=a.dropout,
            tiny_widths=tuple(a.tiny_widths),  # type: ignore[arg-type]
        )


def architecture_of(config: DDNConfig) -> ArchitectureModel:
    return ArchitectureModel(
        backbone=config.backbone,
        attention_stages=list(config.attention_stages),
        attention_reduction=config.attention_reduction,
        dropout=config.dropout,
        tiny_widths=list(config.tiny_widths),
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serialise_weights(model: DDN, dtype: torch.dtype = torch.float16) -> bytes:
    """Weights as safetensors bytes; floating tensors cast to ``dtype`` (BN counters stay int)."""
    state = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    return st_save(state, metadata={"format": "pt", "producer": f"ddn-node {software_version()}"})


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def save_artifact(
    directory: Path, model: DDN, manifest: Manifest, dtype: torch.dtype = torch.float16
) -> Manifest:
    """Write weights + manifest (the weights entry is filled in here). Returns the final manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    data = serialise_weights(model, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    final = manifest.model_copy(
        update={
            "weights": WeightsModel(
                sha256=_sha256(data), dtype=str(dtype).removeprefix("torch."), n_parameters=n_params
            ),
            "architecture": architecture_of(model.config),
            "software_version": manifest.software_version or software_version(),
        }
    )
    _atomic_write(directory / WEIGHTS, data)
    write_manifest(directory, final)
    return final


def write_manifest(directory: Path, manifest: Manifest) -> None:
    _atomic_write(directory / MANIFEST, (manifest.model_dump_json(indent=2) + "\n").encode())


def read_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e}") from e
    try:
        m = Manifest.model_validate_json(raw)
    except ValidationError as e:
        raise ArtifactError(f"{path} is not a valid model manifest: {e}") from e
    if m.schema_version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema_version {m.schema_version}, this node reads {SCHEMA_VERSION}"
        )
    return m


@dataclass
class ModelArtifact:
    """A verified artifact: manifest + a DDN with its weights loaded (eval mode, float32, CPU)."""

    path: Path
    manifest: Manifest
    model: DDN
    weights_sha256: str

    @classmethod
    def load(cls, path: Path | str) -> ModelArtifact:
        directory = Path(path)
        manifest = read_manifest(directory)
        wpath = directory / manifest.weights.file
        if Path(manifest.weights.file).name != manifest.weights.file:
            raise ArtifactError(
                "manifest weights.file must be a plain file name inside the artifact"
            )
        try:
            data = wpath.read_bytes()
        except OSError as e:
            raise ArtifactError(f"cannot read {wpath}: {e}") from e
        digest = _sha256(data)
        if digest != manifest.weights.sha256:
            raise ArtifactError(
                f"{wpath}: sha256 {digest[:16]}... does not match the manifest ({manifest.weights.sha256[:16]}...); refusing to load"
            )
        try:
            # safetensors is a JSON header + raw tensor bytes: nothing in it can execute.
            state = st_load(data)
        except (SafetensorError, ValueError) as e:
            raise ArtifactError(f"{wpath} is not a safetensors file: {e}") from e
        model = DDN(manifest.ddn_config())
        own = model.state_dict()
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ArtifactError(
                f"{wpath} does not fit the manifest's architecture: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise ArtifactError(
                    f"{wpath}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
                )
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
        model.eval()
        return cls(directory, manifest, model, digest)

    # --- what the node reads -------------------------------------------------------

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def heads(self) -> dict[str, HeadInfo]:
        return self.manifest.heads

    @property
    def preprocess(self) -> PreprocessSpec:
        return self.manifest.preprocess

    @property
    def algorithm(self) -> AlgorithmInfo:
        m = self.manifest
        return AlgorithmInfo(
            name=m.algorithm_name,
            version=m.version,
            manufacturer=m.manufacturer,
            software_version=software_version(),
            device_uid=device_uid_from_sha256(self.weights_sha256),
            is_demo=m.is_demo,
            intended_use=m.intended_use,
        )

    def labels(self, head: str) -> list[LabelSpec]:
        return self.head(head).labels

    def localisation(self, head: str) -> dict[str, LocalisationEvidence]:
        """Per label of ``head``: does its Grad-CAM map beat the random and centre baselines?

        Read from the manifest (``heads.<head>.localisation``, written by ``ddn-node
        evaluate --record-in-manifest``). Every label of the head has an entry; a manifest
        without the record, or with one measured on other weights, gives ``shown=False``
        with a reason that says so.
        """
        return localisation_evidence(self.head(head), self.weights_sha256)

    def heatmap_labels(self, head: str, policy: str = "evidence") -> frozenset[str]:
        """The labels of ``head`` that may get heat maps.

        ``"evidence"`` (the default): those whose recorded localisation evidence beats both
        baselines; ``"all"``: every label (an operator who has the evidence elsewhere);
        ``"none"``: no heat maps. A normal class never gets one, under any policy: there
        is nothing in the image that it could point at.
        """
        normal = self.head(head).normal_labels
        if policy == "all":
            return frozenset(self.head(head).label_names) - normal
        if policy == "none":
            return frozenset()
        if policy != "evidence":
            raise ValueError(
                f"heat-map policy must be one of {[p.value for p in HeatMapPolicy]}, got {policy!r}"
            )
        return frozenset(n for n, ev in self.localisation(head).items() if ev.shown) - normal

    def head(self, head: str) -> HeadInfo:
        try:
            return self.manifest.heads[head]
        except KeyError:
            raise KeyError(
                f"artifact {self.name} has no head {head!r}; heads: {sorted(self.manifest.heads)}"
            ) from None


@dataclass(frozen=True)
class LocalisationEvidence:
    """Whether a label's heat maps carry evidence of where the finding is.

    ``shown`` is the manifest's decision (False whenever nothing was recorded, or it was
    recorded for other weights); ``reason`` says why in one line. The figures are those of
    the part the decision used (``split``: "val" for the bundled model); ``parts`` holds
    every part recorded (e.g. the held-out "test" figures too).
    """

    label: str
    shown: bool
    reason: str
    split: str | None = None
    pointing_game: float | None = None
    ci: tuple[float, float] | None = None
    n_boxes: int = 0
    random: float | None = None
    centre: float | None = None
    recorded: bool = False  # False: the manifest carries no (valid) evidence for this label
    parts: Mapping[str, PartLocalisation] = field(default_factory=dict)


NO_EVIDENCE_REASON = (
    "no localisation evidence in the manifest (measure it with `ddn-node evaluate --bboxes ... "
    "--record-in-manifest`): heat maps withheld"
)


def localisation_evidence(head: HeadInfo, weights_sha256: str) -> dict[str, LocalisationEvidence]:
    """Per label of ``head``: its :class:`LocalisationEvidence` from the manifest record."""
    rec = head.localisation
    names = head.label_names
    if rec is None:
        return {n: LocalisationEvidence(n, False, NO_EVIDENCE_REASON) for n in names}
    if rec.weights_sha256 != weights_sha256:
        why = (
            f"the localisation record was measured on other weights (sha256 {rec.weights_sha256[:12]}...), "
            f"not these ({weights_sha256[:12]}...): heat maps withheld until `ddn-node evaluate` is re-run"
        )
        return {n: LocalisationEvidence(n, False, why) for n in names}
    out: dict[str, LocalisationEvidence] = {}
    for n in names:
        entry = rec.labels.get(n)
        if entry is None:
            out[n] = LocalisationEvidence(
                n, False, f"{n} is not in the manifest's localisation record: heat maps withheld"
            )
            continue
        part = entry.parts.get(rec.rule.decided_on) or PartLocalisation()
        out[n] = LocalisationEvidence(
            label=n,
            shown=entry.maps_shown,
            reason=entry.reason,
            split=rec.rule.decided_on,
            pointing_game=part.pointing_game,
            ci=part.ci95,
            n_boxes=part.n_boxes,
            random=part.random,
            centre=part.centre,
            recorded=True,
            parts=dict(entry.parts),
        )
    return out
