"""One study generation's analysis, as steps that each take the analysis and return it.

The steps here are the model's side: which images, their pixels, the model's probabilities
and triage decision, the heat maps. ``pipeline/reporting.py`` holds the results' side (the
SR and the other objects, their files and records). The worker runs them in two phases::

    phase 1 (the report)    start -> decode -> predict -> localise -> report -> send
                            -> shadow -> park
    phase 2 (the pictures)  build_objects -> record

Heat maps are drawn in phase 1 because the SR outlines each finding on its image; they are
cheap (Grad-CAM back-propagates only through the layers after the last stage). The
Parametric Maps and overlays, which take longer to build, wait for phase 2, so the SRs of
studies that arrive meanwhile go first.

A candidate model assigned to the rule (``ddn-node model shadow``, store/assignments.py)
scores the same images in ``shadow``, after the live report has been sent: what it says
is stored (store/shadow.py) and never sent, and nothing it does, fails included, changes
the live analysis.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
import structlog
from PIL import Image
from pydicom.dataset import Dataset

from ddn_node.config import RoutingRule, Settings
from ddn_node.dicom.frames import load_display_frames
from ddn_node.dicom.pixels import PixelDataError
from ddn_node.dicom.results import ResultObjects
from ddn_node.dicom.results.overlay import MAX_SIDE, fit_display
from ddn_node.dicom.spool import Spool
from ddn_node.model.inference import ForwardPass, Predictor, study_probabilities
from ddn_node.model.types import StudyPrediction
from ddn_node.pipeline.drift import ImageInputs, image_inputs
from ddn_node.pipeline.registry import AnalysisError, ModelRegistry
from ddn_node.pipeline.routing import (
    StoredInstance,
    header_lookup,
    route_study,
    spread,
    study_instances,
)
from ddn_node.pipeline.triage import TriageDecision, decide
from ddn_node.store.assignments import assignment
from ddn_node.store.engine import Database
from ddn_node.store.feedback import study_ref
from ddn_node.store.lifecycle import Lease
from ddn_node.store.shadow import ShadowRecord, record_shadow
from ddn_node.vocabulary import ResultKind

log = structlog.get_logger("ddn_node.worker")

# While phase 2 waits, heat maps are kept at most this wide: the Parametric Maps are built
# at no more (a Grad-CAM map comes from a 7 x 7 grid), the overlays resample them anyway.
PARKED_MAP_SIDE = 256


@dataclass(frozen=True)
class Source:
    """A scored source image: its row, and its header (the pixels are in ``images``)."""

    instance_id: int
    sop_instance_uid: str
    dataset: Dataset


@dataclass(frozen=True)
class Scored:
    """One scored image: a source (its index in ``Analysis.sources``) and, for a
    multi-frame object, which frame (1-based); None for a single-frame image."""

    source: int
    frame: int | None


@dataclass(frozen=True)
class Analysis:
    """Everything one analysis knows so far; each step returns a new one with more."""

    lease: Lease
    rule: RoutingRule
    predictor: Predictor
    routed: tuple[StoredInstance, ...]
    shadow: Predictor | None = None  # a candidate beside the live model (never sent)
    sources: tuple[Source, ...] = ()
    # One per scored image (frame) until the heat maps are drawn, then one per source:
    # the frame that decided for it (``localise``).
    images: tuple[np.ndarray, ...] = ()
    scored: tuple[Scored, ...] = ()
    unreadable: tuple[str, ...] = ()
    forward: ForwardPass | None = None  # the backbone's features, until the maps are drawn
    prediction: StudyPrediction | None = None
    decision: TriageDecision | None = None
    inputs: tuple[ImageInputs, ...] = ()  # per scored image, for the drift monitor
    # Every scored image as the live model saw it, with its SOP Instance UID, kept from
    # ``localise`` (which keeps one per source) until the candidate has scored them too;
    # empty without a candidate.
    shadow_images: tuple[tuple[str, np.ndarray], ...] = ()
    objects: ResultObjects | None = None
    result_id: int | None = None
    files: tuple[tuple[ResultKind, Dataset, str], ...] = ()
    built_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    phase1_done: float = 0.0
    # The SR's send on the SR sender's thread (how many rows it attempted), until it is
    # over the heat maps wait; None when the SR was sent from the worker's thread or left
    # to the delivery loop.
    sr_sending: Future[int] | None = None

    @property
    def study_uid(self) -> str:
        return str(self.sources[0].dataset.StudyInstanceUID)

    @property
    def uid_seed(self) -> str:
        # A retried job rebuilds the same UIDs, so a PACS that got the first attempt's
        # objects keeps one copy of each.
        return f"ddn-node:{self.study_uid}:generation:{self.lease.generation}"

    def predicted(self) -> tuple[StudyPrediction, TriageDecision]:
        assert self.prediction is not None and self.decision is not None
        return self.prediction, self.decision

    def timed(self, **ms: float) -> Mapping[str, float]:
        return {**self.timings_ms, **ms}


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


class ModelSteps:
    """The model's side of an analysis, bound to the node's settings, database, spool and
    models."""

    def __init__(self, settings: Settings, database: Database, spool: Spool, models: ModelRegistry):
        self.settings = settings
        self.database = database
        self.spool = spool
        self.models = models

    def start(self, lease: Lease) -> Analysis:
        """The route completion decided: the rule, and the instances it selected."""
        with self.database.read() as session:
            stored = study_instances(session, lease.study_id)
            rule_name = lease.route.rule if lease.route is not None else None
            assigned = (
                None
                if rule_name is None
                else assignment(session, rule_name, self.models.rule(rule_name).model)
            )
        if lease.route is None:
            # A job queued before routes were stored on jobs: route it now, once.
            paths = {s.facts.instance_id: s.path for s in stored}
            lookup = header_lookup(lambda f: str(self.spool.path(paths[f.instance_id])))
            route = route_study(self.settings.routing, [s.facts for s in stored], lookup)
            if route is None:
                raise AnalysisError("no routing rule matches this study any more", permanent=True)
            rule, wanted = route.rule, {f.instance_id for f in route.instances}
        else:
            rule, wanted = self.models.rule(lease.route.rule), set(lease.route.instance_ids)
        routed = tuple(s for s in stored if s.facts.instance_id in wanted)
        if not routed:
            raise AnalysisError("the routed instances are no longer stored", permanent=True)
        live = self.models.predictor(rule, assigned.live if assigned else None)
        return Analysis(
            lease=lease,
            rule=rule,
            predictor=live,
            routed=routed,
            shadow=self._candidate(rule, assigned.shadow if assigned else None),
        )

    def _candidate(self, rule: RoutingRule, path: Path | None) -> Predictor | None:
        """The shadow's predictor; one that cannot be loaded is logged and skipped (the
        live analysis goes on)."""
        if path is None:
            return None
        try:
            return self.models.predictor(rule, path)
        except Exception as exc:  # noqa: BLE001 - a candidate never fails the live analysis
            log.warning("worker.shadow_failed", rule=rule.name, model=str(path), error=str(exc))
            return None

    def decode(self, a: Analysis) -> Analysis:
        """Every frame of every routed instance, thinned evenly to the rule's
        ``max_images`` (routing capped the instances; a multi-frame object's frames are
        counted here), decoded to display images."""
        t0 = time.perf_counter()
        candidates = [
            (stored, f) for stored in a.routed for f in range(max(1, stored.facts.frames))
        ]
        wanted: dict[int, list[int]] = {}
        for stored, frame in spread(candidates, a.rule.max_images):
            wanted.setdefault(stored.facts.instance_id, []).append(frame)
        sources: list[Source] = []
        images: list[np.ndarray] = []
        scored: list[Scored] = []
        problems: list[str] = []
        for stored in a.routed:
            facts, path = stored.facts, self.spool.path(stored.path)
            frames = wanted.get(facts.instance_id)
            if not frames:
                continue
            try:
                # The results need the header only.
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except (OSError, ValueError, AttributeError, EOFError) as exc:
                problems.append(self._unreadable(facts.sop_instance_uid, None, exc))
                continue
            multi = facts.frames > 1
            index = len(sources)
            # From the path, so the decoder's guards (deflate and decompression bombs)
            # see the file before anything is inflated (dicom/frames.py). No wider than
            # the overlays need: JPEG 2000 then decodes from a lower resolution level.
            for frame, image in load_display_frames(path, frames, max_side=MAX_SIDE):
                if isinstance(image, PixelDataError):
                    problems.append(
                        self._unreadable(
                            facts.sop_instance_uid, frame + 1 if multi else None, image
                        )
                    )
                    continue
                images.append(image)
                scored.append(Scored(index, frame + 1 if multi else None))
            if len(scored) and scored[-1].source == index:
                sources.append(Source(facts.instance_id, facts.sop_instance_uid, header))
        if not sources:
            raise AnalysisError("no image could be decoded: " + "; ".join(problems), permanent=True)
        log.info(
            "worker.images_selected",
            study_id=a.lease.study_id,
            rule=a.rule.name,
            instances=len(sources),
            images=[_image_key(sources[s.source].sop_instance_uid, s.frame) for s in scored],
            unreadable=len(problems),
        )
        return replace(
            a,
            sources=tuple(sources),
            images=tuple(images),
            scored=tuple(scored),
            unreadable=tuple(problems),
            timings_ms=a.timed(decode_ms=ms_since(t0)),
        )

    @staticmethod
    def _unreadable(sop_instance_uid: str, frame: int | None, exc: Exception) -> str:
        log.warning(
            "worker.image_unreadable",
            sop_instance_uid=sop_instance_uid,
            frame=frame,
            error=str(exc),
        )
        return f"{_image_key(sop_instance_uid, frame)}: {exc}"

    def predict(self, a: Analysis) -> Analysis:
        """Probabilities per image and per study, the abnormality score and the triage
        decision; the forward pass is kept for the heat maps."""
        t0 = time.perf_counter()
        predictor, head = a.predictor, a.rule.head
        uids = [a.sources[s.source].sop_instance_uid for s in a.scored]
        predictions, forward = predictor.predict_deferred(
            list(a.images), head=head, sop_instance_uids=uids
        )
        for prediction_of_image, scored in zip(predictions, a.scored, strict=True):
            prediction_of_image.frame = scored.frame
        labels = predictor.artifact.labels(head)
        normal = predictor.artifact.head(head).normal_labels
        # Per label the image that shows it most; a normal class by the least normal image
        # (model/inference.py): the most abnormal image decides the study's score.
        study_probs = study_probabilities(predictions, normal)
        score = predictor.abnormality_score(head, study_probs)
        algorithm = predictor.artifact.algorithm
        if self.settings.demo and not algorithm.is_demo:
            algorithm = replace(algorithm, is_demo=True)
        prediction = StudyPrediction(
            head=head,
            labels=labels,
            probabilities=study_probs,
            abnormality_score=score,
            images=predictions,
            algorithm=algorithm,
            normal=normal,
            scored_images=len(predictions),
        )
        # A few numbers per scored image while its pixels and probabilities are at hand.
        inputs = tuple(
            image_inputs(
                image,
                a.sources[s.source].dataset,
                p.probabilities,
                predictor.abnormality_score(head, p.probabilities),
            )
            for image, s, p in zip(a.images, a.scored, predictions, strict=True)
        )
        return replace(
            a,
            forward=forward,
            prediction=prediction,
            inputs=inputs,
            decision=decide(self.settings.triage, labels, study_probs, score),
            timings_ms=a.timed(
                model_ms=ms_since(t0), forward_ms=predictor.timings_ms.get("model", 0.0)
            ),
        )

    def localise(self, a: Analysis) -> Analysis:
        """Grad-CAM heat maps for the reported findings whose maps may be shown (the
        ``[worker] heat_maps`` policy over the model's localisation evidence), and for the
        others a note that says why they have none."""
        prediction, _ = a.predicted()
        assert a.forward is not None
        t0 = time.perf_counter()
        policy = self.settings.worker.heat_maps
        artifact = a.predictor.artifact
        allowed = artifact.heatmap_labels(a.rule.head, policy)
        evidence = artifact.localisation(a.rule.head)
        for name in prediction.positive:
            if name not in allowed:
                prediction.heatmap_notes[name] = (
                    'heat maps are turned off ([worker] heat_maps = "none")'
                    if policy == "none"
                    else evidence[name].reason
                )
            elif not evidence[name].shown:
                prediction.heatmap_caveats[name] = (
                    'drawn because [worker] heat_maps = "all"; the model\'s own evaluation '
                    f"gives no localisation evidence: {evidence[name].reason}"
                )
        if allowed & set(prediction.positive):
            a.predictor.add_heatmaps(prediction.images, a.forward, only=allowed)
        return self._per_source(
            replace(
                a,
                timings_ms=a.timed(gradcam_ms=ms_since(t0)),
                shadow_images=tuple(
                    (a.sources[s.source].sop_instance_uid, image)
                    for s, image in zip(a.scored, a.images, strict=True)
                )
                if a.shadow is not None
                else (),
            )
        )

    @staticmethod
    def _per_source(a: Analysis) -> Analysis:
        """One image per source for the results: of a multi-frame object, the frame whose
        own abnormality score is highest (its probabilities, heat maps and display image;
        the SR says which frame). The study's probabilities already count every frame."""
        prediction, _ = a.predicted()
        if len(a.scored) == len(a.sources):
            return a
        best: dict[int, int] = {}
        for i, scored in enumerate(a.scored):
            score = a.predictor.abnormality_score(
                prediction.head, prediction.images[i].probabilities
            )
            j = best.get(scored.source)
            if j is None or score > a.predictor.abnormality_score(
                prediction.head, prediction.images[j].probabilities
            ):
                best[scored.source] = i
        keep = [best[s] for s in range(len(a.sources))]
        prediction.images = [prediction.images[i] for i in keep]
        return replace(
            a,
            images=tuple(a.images[i] for i in keep),
            scored=tuple(a.scored[i] for i in keep),
        )

    def shadow(self, a: Analysis) -> Analysis:
        """The candidate's verdict on the images the live model scored, stored and never
        sent; it runs after the live report left, and whatever happens here leaves the live
        analysis as it was."""
        if a.shadow is None or not a.shadow_images:
            return a
        t0 = time.perf_counter()
        try:
            record = self._shadow_record(a, a.shadow)
            with self.database.session() as session:
                stored = record_shadow(session, replace(record, model_ms=ms_since(t0)))
            log.info(
                "worker.shadow_scored",
                study_id=a.lease.study_id,
                rule=a.rule.name,
                model=record.model_name,
                version=record.model_version,
                abnormality_score=round(record.abnormality_score, 4),
                priority=record.priority,
                recorded=stored,
                ms=round(ms_since(t0), 1),
            )
        except Exception as exc:  # noqa: BLE001 - a candidate never fails the live analysis
            log.warning(
                "worker.shadow_failed",
                study_id=a.lease.study_id,
                rule=a.rule.name,
                model=a.shadow.artifact.name,
                error=f"{type(exc).__name__}: {exc}",
            )
        return replace(a, shadow_images=())

    def _shadow_record(self, a: Analysis, candidate: Predictor) -> ShadowRecord:
        head, artifact = a.rule.head, candidate.artifact
        predictions, _forward = candidate.predict_deferred(
            [image for _uid, image in a.shadow_images],
            head=head,
            sop_instance_uids=[uid for uid, _image in a.shadow_images],
        )
        labels, normal = artifact.labels(head), artifact.head(head).normal_labels
        probabilities = study_probabilities(predictions, normal)
        said = StudyPrediction(
            head=head,
            labels=labels,
            probabilities=probabilities,
            abnormality_score=candidate.abnormality_score(head, probabilities),
            images=predictions,
            algorithm=artifact.algorithm,
            normal=normal,
            scored_images=len(predictions),
        )
        decision = decide(self.settings.triage, labels, probabilities, said.abnormality_score)
        # Named as results and feedback name models (the algorithm's name and version,
        # what the SR says), so the monitor pairs a shadow row with the live result.
        live = a.predictor.artifact.algorithm
        return ShadowRecord(
            study_ref=study_ref(a.study_uid),
            generation=a.lease.generation,
            rule=a.rule.name,
            model_name=said.algorithm.name,
            model_version=said.algorithm.version,
            head=head,
            live_model_name=live.name,
            live_model_version=live.version,
            probabilities=probabilities,
            thresholds={spec.name: spec.threshold for spec in labels},
            positive=said.positive,
            abnormality_score=said.abnormality_score,
            priority=decision.priority.value,
            model_ms=0.0,
        )

    @staticmethod
    def park(a: Analysis) -> Analysis:
        """What phase 2 needs, kept small while it waits: no backbone features, display
        images at overlay size (a quarter of a 2048 x 2048 image's memory) and heat maps at
        most ``PARKED_MAP_SIDE`` wide."""
        prediction, _ = a.predicted()
        for image in prediction.images:
            image.heatmaps = {
                name: _shrink(m, PARKED_MAP_SIDE) for name, m in image.heatmaps.items()
            }
        return replace(
            a,
            forward=None,
            shadow_images=(),
            images=tuple(fit_display(img, MAX_SIDE) for img in a.images),
        )

    @staticmethod
    def held_bytes(a: Analysis) -> int:
        """The image memory an analysis holds while its phase 2 waits."""
        maps = sum(
            m.nbytes
            for img in (a.prediction.images if a.prediction else [])
            for m in img.heatmaps.values()
        )
        return maps + sum(img.nbytes for img in a.images)


def _image_key(sop_instance_uid: str, frame: int | None) -> str:
    """How logs and problems name a scored image: the UID, with ``#frame`` for a frame."""
    return sop_instance_uid if frame is None else f"{sop_instance_uid}#{frame}"


def _shrink(heatmap: np.ndarray, max_side: int) -> np.ndarray:
    rows, columns = heatmap.shape
    if max(rows, columns) <= max_side:
        return heatmap
    scale = max_side / max(rows, columns)
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    return np.asarray(
        Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F").resize(
            size, Image.Resampling.BILINEAR
        ),
        dtype=np.float32,
    )
