"""The model artifacts the routing table names, loaded once per process."""

from __future__ import annotations

import threading
from pathlib import Path

import structlog

from ddn_node.config import RoutingRule, Settings
from ddn_node.dicom.results.region import CONTOUR_GRID
from ddn_node.model.artifact import ArtifactError, ModelArtifact
from ddn_node.model.inference import Predictor

log = structlog.get_logger("ddn_node.worker")


class AnalysisError(Exception):
    """A study cannot be analysed; ``permanent`` means retrying will not help."""

    def __init__(self, message: str, *, permanent: bool):
        super().__init__(message)
        self.permanent = permanent


class ModelRegistry:
    """One :class:`Predictor` per model artifact, shared by the process's worker threads."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._predictors: dict[Path, Predictor] = {}
        self._lock = threading.Lock()

    def rule(self, name: str) -> RoutingRule:
        """The routing rule a job was routed by; gone from the config is permanent."""
        for rule in self.settings.routing:
            if rule.name == name:
                return rule
        raise AnalysisError(f"routing rule {name!r} is no longer configured", permanent=True)

    def predictor(self, rule: RoutingRule, model: Path | None = None) -> Predictor:
        """The predictor of ``model`` (by default the rule's configured one: a promotion
        names another, store/assignments.py), loaded on first use."""
        path = (model or rule.model).resolve()
        with self._lock:
            if path not in self._predictors:
                artifact = ModelArtifact.load(path)
                if rule.head not in artifact.heads:
                    raise AnalysisError(
                        f"model {artifact.name} has no head {rule.head!r} (routing rule {rule.name})",
                        permanent=True,
                    )
                worker = self.settings.worker
                self._predictors[path] = Predictor(
                    artifact,
                    device=worker.device,
                    threads=worker.torch_threads,
                    precision=worker.precision,
                    backend=worker.effective_backend,
                    # The SR outlines on this grid and phase 2 keeps maps no wider
                    # (analysis.PARKED_MAP_SIDE): larger maps would only be shrunk again.
                    heatmap_max_side=CONTOUR_GRID,
                )
                log.info(
                    "worker.model_loaded",
                    model=artifact.name,
                    version=artifact.version,
                    device=worker.device,
                    backend=worker.effective_backend,
                )
            return self._predictors[path]

    def preload(self) -> None:
        for rule in self.settings.routing:
            self.predictor(rule)


def check_candidate(rule: RoutingRule, live: ModelArtifact, path: Path) -> ModelArtifact:
    """The artifact at ``path`` if it can shadow ``rule``'s live model: it loads (weights
    checked against their sha256, never unpickled), has the rule's head, shares at least
    one of its labels (the comparison is per label), and does not pass for the live model
    under the same name and version with other weights (results would be confused)."""
    try:
        candidate = ModelArtifact.load(path)
    except (ArtifactError, OSError, ValueError) as exc:
        raise AnalysisError(
            f"{path}: not a loadable model artifact: {exc}", permanent=True
        ) from exc
    if rule.head not in candidate.heads:
        raise AnalysisError(
            f"model {candidate.name} {candidate.version} has no head {rule.head!r}"
            f" (routing rule {rule.name})",
            permanent=True,
        )
    if not {s.name for s in candidate.labels(rule.head)} & {s.name for s in live.labels(rule.head)}:
        raise AnalysisError(
            f"model {candidate.name} {candidate.version} shares no label with"
            f" {live.name} {live.version} on head {rule.head!r}: nothing to compare",
            permanent=True,
        )
    # Results, SRs and the monitor name a model by its algorithm name and version.
    if (candidate.algorithm.name, candidate.version) == (live.algorithm.name, live.version):
        same = candidate.weights_sha256 == live.weights_sha256
        raise AnalysisError(
            f"the candidate is {live.name} {live.version} itself"
            if same
            else f"the candidate calls itself {live.name} {live.version} with other weights:"
            " give it its own version, so that every result says which model produced it",
            permanent=True,
        )
    return candidate
