"""Data that crosses the boundary between the model and the rest of the node.

The DICOM result builders (``dicom/results``), the worker (``pipeline``) and the web part
read these; they never import torch. Kept free of torch so that importing them is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Code:
    """A coded concept (PS3.3 8.8 Code Sequence Macro)."""

    value: str
    scheme: str  # "SCT" (SNOMED CT), "RADLEX", "DCM", "99DDN" (private)
    meaning: str


@dataclass(frozen=True)
class LabelSpec:
    """One output of a head: a finding and how to read its probability."""

    name: str  # as in the training data, e.g. "Pneumothorax"
    code: Code
    threshold: float  # probability at or above which the finding is "present"
    threshold_method: str = ""  # how the threshold was chosen, for the model card


@dataclass(frozen=True)
class AlgorithmInfo:
    """What produced a result: for TID 4019 and the Contributing Equipment Sequence."""

    name: str  # e.g. "DDN chest X-ray"
    version: str  # artifact version, e.g. "2026.11.27-ddn-cxr-r1"
    manufacturer: str  # "ddn-node project"
    software_version: str  # ddn_node package version
    device_uid: str  # changes whenever the weights change (derived from their hash)
    is_demo: bool  # True -> "NOT FOR DIAGNOSTIC USE" on every output
    intended_use: str


@dataclass
class ImagePrediction:
    """The model's output for one source image."""

    sop_instance_uid: str
    probabilities: dict[str, float]
    # label -> heat map in [0, 1], float32, at the source image's rows x columns;
    # only for labels at or above their threshold.
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)
    # The frame (1-based, as Referenced Frame Number counts) of a multi-frame source;
    # None for a single-frame image.
    frame: int | None = None


@dataclass
class StudyPrediction:
    """The study-level summary of one analysis."""

    head: str
    labels: list[LabelSpec]
    # study level: per label the maximum over the scored images, for a normal class the
    # minimum (see model/inference.py study_probabilities)
    probabilities: dict[str, float]
    abnormality_score: float
    images: list[ImagePrediction]
    algorithm: AlgorithmInfo
    timings_ms: dict[str, float] = field(default_factory=dict)
    # label -> why a finding at or above its threshold has no heat map (its localisation
    # evidence did not beat the baselines, say); the SR and the study page say so.
    heatmap_notes: dict[str, str] = field(default_factory=dict)
    # label -> what a reader must know of a map that *was* drawn: an operator asked for
    # maps whose localisation evidence is missing or weak.
    heatmap_caveats: dict[str, str] = field(default_factory=dict)
    # The head's "normal" class (brain_mri's notumor): a probability, never a finding.
    normal: frozenset[str] = frozenset()
    # How many images were scored (frames of a multi-frame object each count); ``images``
    # holds one per source instance, the frame that decided for it.
    scored_images: int = 0

    @property
    def positive(self) -> list[str]:
        """The findings at or above their threshold; a normal class is never one."""
        return [
            spec.name
            for spec in self.labels
            if spec.name not in self.normal
            and self.probabilities.get(spec.name, 0.0) >= spec.threshold
        ]
