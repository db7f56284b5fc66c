"""One study generation's analysis, as steps that each take the analysis and return it.

Phase 1, the report (what the radiologist needs first)::

    start -> decode -> predict -> report -> send_report -> park

Phase 2, the heat maps (slower to draw; newer studies' reports may go first)::

    draw_heat_maps -> build_heat_maps -> record

Steps that write to the database do so through ``store/`` in one transaction fenced by the
job's lease (:mod:`ddn_node.store.lifecycle`); they return None (phase 1) or False
(phase 2) when the lease was lost, and another worker's result stands. Files are written
(fsync + rename) before their rows commit; a crash in between leaves only unreferenced
files, which the next attempt rewrites identically (the UIDs derive from the study and
generation).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from io import BytesIO

import numpy as np
import pydicom
import structlog
from pydicom.dataset import Dataset

from ddn_node.config import RoutingRule, Settings
from ddn_node.dicom.pixels import PixelDataError, load_display_image
from ddn_node.dicom.results import ResultObjects, SRReference, add_heat_map_objects, build_sr_result
from ddn_node.dicom.results.overlay import fit_display
from ddn_node.dicom.spool import Spool
from ddn_node.model.inference import ForwardPass, Predictor
from ddn_node.model.types import StudyPrediction
from ddn_node.pipeline.notices import queue_messages
from ddn_node.pipeline.registry import AnalysisError, ModelRegistry
from ddn_node.pipeline.routing import StoredInstance, route_study, study_instances
from ddn_node.pipeline.triage import TriageDecision, decide
from ddn_node.store import lifecycle
from ddn_node.store import results as records
from ddn_node.store.engine import Database
from ddn_node.store.lifecycle import Lease
from ddn_node.store.models import utcnow
from ddn_node.vocabulary import ResultKind

log = structlog.get_logger("ddn_node.worker")


@dataclass(frozen=True)
class Source:
    """A scored source image: its row, and its header (the pixels are in ``images``)."""

    instance_id: int
    sop_instance_uid: str
    dataset: Dataset


@dataclass(frozen=True)
class Analysis:
    """Everything one analysis knows so far; each step returns a new one with more."""

    lease: Lease
    rule: RoutingRule
    predictor: Predictor
    routed: tuple[StoredInstance, ...]
    sources: tuple[Source, ...] = ()
    images: tuple[np.ndarray, ...] = ()
    unreadable: tuple[str, ...] = ()
    forward: ForwardPass | None = None
    prediction: StudyPrediction | None = None
    decision: TriageDecision | None = None
    objects: ResultObjects | None = None
    result_id: int | None = None
    files: tuple[tuple[ResultKind, Dataset, str], ...] = ()
    built_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    phase1_done: float = 0.0

    @property
    def study_uid(self) -> str:
        return str(self.sources[0].dataset.StudyInstanceUID)

    @property
    def uid_seed(self) -> str:
        # A retried job rebuilds the same UIDs, so a PACS that got the first attempt's
        # objects keeps one copy of each.
        return f"ddn-node:{self.study_uid}:generation:{self.lease.generation}"

    def predicted(self) -> tuple[StudyPrediction, TriageDecision, ForwardPass]:
        assert (
            self.prediction is not None and self.decision is not None and self.forward is not None
        )
        return self.prediction, self.decision, self.forward

    def timed(self, **ms: float) -> Mapping[str, float]:
        return {**self.timings_ms, **ms}


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


class AnalysisSteps:
    """The steps, bound to the node's settings, database, spool and models."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        spool: Spool,
        models: ModelRegistry,
        send_now: Callable[[int, str], object] | None = None,
        on_results: Callable[[], None] | None = None,
    ):
        self.settings = settings
        self.database = database
        self.spool = spool
        self.models = models
        # Sends one object (study id, SOP Instance UID) at once, from this thread: the SR.
        self.send_now = send_now
        # Wakes the delivery loop once results are queued.
        self.on_results = on_results

    # -- phase 1 -----------------------------------------------------------------------

    def start(self, lease: Lease) -> Analysis:
        """The route completion decided: the rule, and the instances it selected."""
        with self.database.read() as session:
            stored = study_instances(session, lease.study_id)
        if lease.route is None:
            # A job queued before routes were stored on jobs: route it now, once.
            route = route_study(self.settings.routing, [s.facts for s in stored])
            if route is None:
                raise AnalysisError("no routing rule matches this study any more", permanent=True)
            rule, wanted = route.rule, {f.instance_id for f in route.instances}
        else:
            rule, wanted = self.models.rule(lease.route.rule), set(lease.route.instance_ids)
        routed = tuple(s for s in stored if s.facts.instance_id in wanted)
        if not routed:
            raise AnalysisError("the routed instances are no longer stored", permanent=True)
        return Analysis(
            lease=lease, rule=rule, predictor=self.models.predictor(rule), routed=routed
        )

    def decode(self, a: Analysis) -> Analysis:
        t0 = time.perf_counter()
        sources: list[Source] = []
        images: list[np.ndarray] = []
        problems: list[str] = []
        for stored in a.routed:
            facts, path = stored.facts, self.spool.path(stored.path)
            try:
                # From the path, so the decoder's guards (deflate and decompression bombs)
                # see the file before anything is inflated; the results need the header only.
                image = load_display_image(path)
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except (PixelDataError, OSError, ValueError, AttributeError) as exc:
                problems.append(f"{facts.sop_instance_uid}: {exc}")
                log.warning(
                    "worker.image_unreadable",
                    sop_instance_uid=facts.sop_instance_uid,
                    error=str(exc),
                )
                continue
            images.append(image)
            sources.append(Source(facts.instance_id, facts.sop_instance_uid, header))
        if not sources:
            raise AnalysisError("no image could be decoded: " + "; ".join(problems), permanent=True)
        return replace(
            a,
            sources=tuple(sources),
            images=tuple(images),
            unreadable=tuple(problems),
            timings_ms=a.timed(decode_ms=_ms(t0)),
        )

    def predict(self, a: Analysis) -> Analysis:
        """Probabilities per image and per study, the abnormality score and the triage
        decision; the forward pass is kept for the heat maps."""
        t0 = time.perf_counter()
        predictor, head = a.predictor, a.rule.head
        uids = [s.sop_instance_uid for s in a.sources]
        predictions, forward = predictor.predict_deferred(
            list(a.images), head=head, sop_instance_uids=uids
        )
        labels = predictor.artifact.labels(head)
        study_probs = {
            spec.name: max(p.probabilities[spec.name] for p in predictions) for spec in labels
        }
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
        )
        return replace(
            a,
            forward=forward,
            prediction=prediction,
            decision=decide(self.settings.triage, labels, study_probs, score),
            timings_ms=a.timed(model_ms=_ms(t0), forward_ms=predictor.timings_ms.get("model", 0.0)),
        )

    def report(self, a: Analysis) -> Analysis | None:
        """The SR built and on disk; the result row, the SR's delivery rows and the study's
        new priority committed, fenced by the lease. None when the lease was lost.

        When an earlier attempt got this far, its SR - the one a PACS may already hold -
        is kept as it is, and only destinations added since get a delivery row.
        """
        t0 = time.perf_counter()
        prediction, decision, _ = a.predicted()
        lease = a.lease
        with self.database.read() as session:
            earlier = records.report_of_job(session, lease.job_id)
            previous = records.previous_report(session, lease.study_id, before_job=lease.job_id)
        predecessor = (
            None
            if previous is None
            else SRReference(
                previous.sop_class_uid,
                previous.sop_instance_uid,
                previous.series_instance_uid,
                previous.study_instance_uid,
            )
        )
        objects = build_sr_result(
            [s.dataset for s in a.sources],
            prediction,
            decision.priority,
            predecessor,
            uid_seed=a.uid_seed,
            now=a.built_at,
        )
        sr = objects.sr
        relpath = self.spool.result_relpath(a.study_uid, str(sr.SOPInstanceUID))
        if earlier is None or not self.spool.path(earlier.sr.path).is_file():
            self._write(relpath, sr)
        result_id = self._record_report(a, objects, relpath, earlier)
        if result_id is None:
            return None
        return replace(a, objects=objects, result_id=result_id, timings_ms=a.timed(sr_ms=_ms(t0)))

    def _record_report(
        self,
        a: Analysis,
        objects: ResultObjects,
        relpath: str,
        earlier: records.StoredReport | None,
    ) -> int | None:
        prediction, decision, _ = a.predicted()
        lease, sr = a.lease, objects.sr
        sr_uid = str(sr.SOPInstanceUID)
        now = utcnow()
        with self.database.session() as session:
            if not lifecycle.hold(session, lease):
                log.warning("worker.lease_lost", job_id=lease.job_id, study_id=lease.study_id)
                session.rollback()
                return None
            queued = records.queued_destinations(session, lease.study_id, sr_uid)
            deliveries = [
                records.OutgoingObject(name, ResultKind.SR, str(sr.SOPClassUID), sr_uid, relpath)
                for name in sorted({d.name for d in self.settings.destinations} - queued)
            ]
            if earlier is not None:
                records.add_deliveries(session, lease.study_id, earlier.result_id, deliveries, now)
                return earlier.result_id
            identity = records.ReportIdentity(
                str(sr.SOPClassUID), sr_uid, str(sr.SeriesInstanceUID), a.study_uid, relpath
            )
            algorithm = prediction.algorithm
            report = records.Report(
                model_name=algorithm.name,
                model_version=algorithm.version,
                head=prediction.head,
                probabilities=prediction.probabilities,
                positive=prediction.positive,
                thresholds={spec.name: spec.threshold for spec in prediction.labels},
                abnormality_score=prediction.abnormality_score,
                priority=decision.priority.value,
                sr=identity,
                timings_ms=a.timings_ms,
            )
            result_id = records.record_report(
                session,
                study_id=lease.study_id,
                job_id=lease.job_id,
                generation=lease.generation,
                report=report,
                deliveries=deliveries,
                now=now,
            )
            top = sorted(prediction.probabilities.items(), key=lambda kv: kv[1], reverse=True)[:3]
            # The worklist re-orders as the SR leaves, not after the heat maps.
            lifecycle.triage(
                session,
                lease,
                lifecycle.Triage(
                    abnormality_score=prediction.abnormality_score,
                    priority=decision.priority,
                    rank=decision.rank,
                    reason=decision.reason,
                    top_findings=top,
                    model_version=f"{algorithm.name} {algorithm.version}",
                ),
                now,
            )
            return result_id

    def send_report(self, a: Analysis) -> Analysis:
        """The SR to the PACS before the heat maps are drawn: sent from this thread when
        this process delivers, else left to the delivery loop (woken here)."""
        assert a.objects is not None
        t0 = time.perf_counter()
        study_id, sr_uid = a.lease.study_id, str(a.objects.sr.SOPInstanceUID)
        if self.send_now is None:
            self._wake_delivery()
        else:
            try:
                self.send_now(study_id, sr_uid)
            except Exception as exc:  # noqa: BLE001 - the delivery loop retries whatever is left
                log.warning("worker.sr_send_failed", study_id=study_id, error=repr(exc))
                self._wake_delivery()
        return replace(a, timings_ms=a.timed(sr_send_ms=_ms(t0)), phase1_done=time.perf_counter())

    @staticmethod
    def park(a: Analysis) -> Analysis:
        """What phase 2 needs, kept small while it waits: the overlays are drawn at most
        MAX_SIDE pixels wide (a quarter of a 2048 x 2048 image's memory)."""
        return replace(a, images=tuple(fit_display(img) for img in a.images))

    # -- phase 2 -----------------------------------------------------------------------

    def draw_heat_maps(self, a: Analysis) -> Analysis:
        t0 = time.perf_counter()
        prediction, _, forward = a.predicted()
        a.predictor.add_heatmaps(prediction.images, forward)
        return replace(
            a,
            timings_ms=a.timed(
                gradcam_ms=_ms(t0),
                # Phase 2 may wait while the SRs of studies that came meanwhile go first.
                deferred_ms=(t0 - a.phase1_done) * 1000,
            ),
        )

    def build_heat_maps(self, a: Analysis) -> Analysis:
        """A Parametric Map and an overlay per heat map, on disk."""
        assert a.objects is not None
        t0 = time.perf_counter()
        prediction, _, _ = a.predicted()
        objects = a.objects
        add_heat_map_objects(
            objects,
            [s.dataset for s in a.sources],
            prediction,
            {s.sop_instance_uid: img for s, img in zip(a.sources, a.images, strict=True)},
            uid_seed=a.uid_seed,
            now=a.built_at,
        )
        files: list[tuple[ResultKind, Dataset, str]] = []
        for kind, ds in [(ResultKind.PM, ds) for ds in objects.parametric_maps] + [
            (ResultKind.SC, ds) for ds in objects.overlays
        ]:
            relpath = self.spool.result_relpath(a.study_uid, str(ds.SOPInstanceUID))
            self._write(relpath, ds)
            files.append((kind, ds, relpath))
        timings = a.timed(results_ms=a.timings_ms.get("sr_ms", 0.0) + _ms(t0))
        phases = ("decode_ms", "model_ms", "sr_ms", "sr_send_ms", "gradcam_ms")
        total = sum(timings.get(k, 0.0) for k in phases) + _ms(t0)
        return replace(a, files=tuple(files), timings_ms={**timings, "total_ms": total})

    def record(self, a: Analysis) -> bool:
        """Per-image results, the heat maps' and notifications' delivery rows, and the
        study analysed, in one transaction fenced by the lease."""
        prediction, decision, _ = a.predicted()
        assert a.objects is not None and a.result_id is not None
        lease = a.lease
        prediction.timings_ms = dict(a.timings_ms)
        now = utcnow()
        messages = queue_messages(
            self.settings, self.database, self.spool, lease.study_id, prediction, decision, now
        )
        overlays = _overlay_paths(a.objects, a.files)
        images = [
            records.ImageRecord(
                instance_id=source.instance_id,
                probabilities=image.probabilities,
                overlay_paths={
                    label: path
                    for (uid, label), path in overlays.items()
                    if uid == source.sop_instance_uid
                },
            )
            for source, image in zip(a.sources, prediction.images, strict=True)
        ]
        objects = [
            records.OutgoingObject(
                dest.name, kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), relpath
            )
            for dest in self.settings.destinations
            for kind, ds, relpath in a.files
        ]
        with self.database.session() as session:
            if not lifecycle.analysed(session, lease, now):
                log.warning("worker.lease_lost", job_id=lease.job_id, study_id=lease.study_id)
                session.rollback()
                return False
            records.record_heat_maps(
                session,
                study_id=lease.study_id,
                result_id=a.result_id,
                images=images,
                deliveries=[*objects, *messages],
                timings_ms=a.timings_ms,
                now=now,
            )
        self._log_analysed(a)
        self._wake_delivery()
        return True

    # -- helpers -------------------------------------------------------------------------

    def _write(self, relpath: str, ds: Dataset) -> None:
        """One result object, durably in the spool (fsync + rename)."""
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        self.spool.write_bytes(relpath, buffer.getvalue())

    def _wake_delivery(self) -> None:
        if self.on_results is not None:
            self.on_results()

    def _log_analysed(self, a: Analysis) -> None:
        prediction, decision, _ = a.predicted()
        log.info(
            "worker.study_analysed",
            study_uid=a.study_uid,
            generation=a.lease.generation,
            head=a.rule.head,
            images=len(a.sources),
            unreadable=len(a.unreadable),
            score=round(prediction.abnormality_score, 4),
            priority=decision.priority.value,
            positive=prediction.positive,
            **{k: round(v, 1) for k, v in a.timings_ms.items()},
        )


def _overlay_paths(
    objects: ResultObjects, files: tuple[tuple[ResultKind, Dataset, str], ...]
) -> dict[tuple[str, str], str]:
    """(source SOP UID, label) -> the overlay Secondary Capture in the spool, which the
    study page renders when someone looks."""
    path_of = {str(ds.SOPInstanceUID): relpath for _kind, ds, relpath in files}
    return {
        (
            str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID),
            objects.overlay_labels[str(ds.SOPInstanceUID)],
        ): path_of[str(ds.SOPInstanceUID)]
        for ds in objects.overlays
    }
