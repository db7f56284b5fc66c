"""The worker: claim a completed study, analyse it, store results and queue their delivery.

One study at a time per worker thread; several workers (threads, processes, hosts) share
the queue. The result rows, the study's new priority and the delivery rows commit in one
transaction fenced by the job's lease, so a study generation is analysed and delivered
exactly once even when a worker dies half-way and another takes over its expired lease.
Result files are written (fsync + rename) before that commit; a crash in between leaves
only unreferenced files, rewritten identically by the next attempt.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom
import structlog
from pydicom.dataset import Dataset
from sqlalchemy import select, update

from ddn_node.config import PRIORITY_RANK, Priority, RoutingRule, Settings
from ddn_node.dicom.pixels import PixelDataError, load_display_image
from ddn_node.dicom.results import ResultObjects, SRReference, add_heat_map_objects, build_sr_result
from ddn_node.dicom.results.content import make_uid
from ddn_node.dicom.results.overlay import fit_display
from ddn_node.dicom.spool import Spool
from ddn_node.model.artifact import ModelArtifact
from ddn_node.model.inference import ForwardPass, Predictor
from ddn_node.model.types import StudyPrediction
from ddn_node.pipeline.notify import OutgoingMessage, StudySummary, messages_for
from ddn_node.pipeline.routing import InstanceFacts, route_study, study_instances
from ddn_node.pipeline.triage import TriageDecision, decide
from ddn_node.store.engine import Database
from ddn_node.store.models import (
    Delivery,
    ImageResult,
    Job,
    JobState,
    Result,
    Study,
    StudyState,
    WorklistEvent,
    utcnow,
)
from ddn_node.store.queue import JOBS

log = structlog.get_logger("ddn_node.worker")


class AnalysisError(Exception):
    """A study cannot be analysed; ``permanent`` means retrying will not help."""

    def __init__(self, message: str, *, permanent: bool):
        super().__init__(message)
        self.permanent = permanent


class ModelRegistry:
    """The model artifacts the routing table names, loaded once per process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._predictors: dict[Path, Predictor] = {}
        self._lock = threading.Lock()

    def predictor(self, rule: RoutingRule) -> Predictor:
        path = rule.model.resolve()
        with self._lock:
            if path not in self._predictors:
                artifact = ModelArtifact.load(path)
                if rule.head not in artifact.heads:
                    raise AnalysisError(
                        f"model {artifact.name} has no head {rule.head!r} (routing rule {rule.name})",
                        permanent=True,
                    )
                self._predictors[path] = Predictor(
                    artifact,
                    device=self.settings.worker.device,
                    threads=self.settings.worker.torch_threads,
                    precision=self.settings.worker.precision,
                )
                log.info("worker.model_loaded", model=artifact.name, version=artifact.version, device=self.settings.worker.device)
            return self._predictors[path]

    def preload(self) -> None:
        for rule in self.settings.routing:
            self.predictor(rule)


@dataclass(frozen=True)
class _Source:
    instance_id: int
    sop_instance_uid: str
    dataset: Dataset


# How many studies' heat maps may wait while the SRs of newer studies go first, and how
# much image memory they may hold meanwhile (display images at overlay size, 4 MB each for
# a 1024 x 1024 float32 image).
MAX_DEFERRED = 64
MAX_DEFERRED_BYTES = 256 * 1024 * 1024

_T = TypeVar("_T")


@dataclass(frozen=True)
class _Claimed:
    id: int
    study_id: int
    generation: int
    attempts: int
    stop_renewing: threading.Event


@dataclass(frozen=True)
class _Analysis:
    """What phase 1 of a study's analysis leaves for phase 2."""

    job_id: int
    study_id: int
    generation: int
    rule: RoutingRule
    predictor: Predictor
    forward: ForwardPass
    prediction: StudyPrediction
    decision: TriageDecision
    sources: list[_Source]
    images: list[np.ndarray]
    objects: ResultObjects
    sr_files: list[tuple[str, Dataset, str]]
    uid_seed: str
    built_at: dt.datetime
    unreadable: int
    timings_ms: dict[str, float]
    phase1_done: float

    @property
    def study_uid(self) -> str:
        return str(self.sources[0].dataset.StudyInstanceUID)


class Worker:
    def __init__(
        self,
        settings: Settings,
        database: Database,
        spool: Spool,
        models: ModelRegistry,
        owner: str,
        on_results: Callable[[], None] | None = None,
        send_now: Callable[[int, str], object] | None = None,
    ):
        self.settings = settings
        self.database = database
        self.spool = spool
        self.models = models
        self.owner = owner
        # Wakes the delivery loop once results are queued.
        self.on_results = on_results
        # Sends one object (study id, SOP Instance UID) at once, from this thread: the SR.
        self.send_now = send_now
        # Studies whose SR is out and whose heat maps wait (their leases kept renewed).
        self._deferred: deque[tuple[_Claimed, _Analysis]] = deque()

    # -- the loop ---------------------------------------------------------------------

    def run(self, stop: threading.Event, wakeup: threading.Event) -> None:
        log.info("worker.started", owner=self.owner)
        while not stop.is_set():
            try:
                worked = self.run_once()
            except Exception as exc:  # noqa: BLE001 - the loop must survive a database restart
                log.error("worker.loop_error", error=repr(exc))
                worked = False
                stop.wait(1.0)
            if not worked:
                wakeup.wait(self.settings.worker.poll_interval_s)
                wakeup.clear()
        self._release_deferred()
        log.info("worker.stopped", owner=self.owner)

    def run_once(self) -> bool:
        """One step: the SR of a newly claimed study before the heat maps of an earlier
        one (up to ``MAX_DEFERRED`` waiting); False when there was nothing to do."""
        if self._may_defer() and self._start_next():
            return True
        if self._deferred:
            self._finish_deferred()
            return True
        return False

    def _start_next(self) -> bool:
        """Claim a job and run its phase 1; phase 2 waits in ``_deferred``. False when the
        queue had nothing claimable."""
        lease_s = self.settings.queue.lease_s
        with self.database.session() as session:
            job = JOBS.claim(session, self.owner, lease_s)
            if job is None:
                return False
            job_id, study_id, generation, attempts = job.id, job.study_id, job.generation, job.attempts
            session.execute(
                update(Study)
                .where(Study.id == study_id, Study.generation == generation)
                .values(state=StudyState.ANALYSING, state_reason=f"attempt {attempts}")
            )
        if attempts > self.settings.queue.max_attempts:
            self._give_up(job_id, study_id, generation, f"gave up after {attempts - 1} attempts (worker lost each time)")
            return True
        stop_renewing = threading.Event()
        renewer = threading.Thread(
            target=self._renew_lease, args=(job_id, stop_renewing), name=f"lease-{job_id}", daemon=True
        )
        renewer.start()
        claimed = _Claimed(job_id, study_id, generation, attempts, stop_renewing)
        analysis = self._guarded(claimed, lambda: self.begin(job_id, study_id, generation))
        if analysis is None:
            stop_renewing.set()
        else:
            self._deferred.append((claimed, analysis))
        return True

    def _finish_deferred(self) -> None:
        job, analysis = self._deferred.popleft()
        try:
            self._guarded(job, lambda: self.finish(analysis))
        finally:
            job.stop_renewing.set()

    def _release_deferred(self) -> None:
        """On shutdown: the studies whose heat maps still wait go back to the queue at
        once (their SR is out, so the next claim only draws the maps), instead of waiting
        for their leases to expire."""
        released = 0
        while self._deferred:
            job, _analysis = self._deferred.popleft()
            job.stop_renewing.set()
            try:
                with self.database.session() as session:
                    released += JOBS.release(session, job.id, self.owner)
            except Exception as exc:  # noqa: BLE001 - the lease expires instead
                log.warning("worker.release_failed", job_id=job.id, error=repr(exc))
        if released:
            log.info("worker.released_deferred", jobs=released)

    def _may_defer(self) -> bool:
        """Room for one more study's phase 2 to wait: by count and by image memory."""
        held = sum(img.nbytes for _job, a in self._deferred for img in a.images)
        return len(self._deferred) < MAX_DEFERRED and held < MAX_DEFERRED_BYTES

    def _guarded(self, job: _Claimed, step: Callable[[], _T]) -> _T | None:
        """Run one phase of a job; a failure is recorded against the job (retry or give up)."""
        try:
            return step()
        except AnalysisError as exc:
            self._failed(job.id, job.study_id, job.generation, job.attempts, str(exc), exc.permanent)
        except Exception as exc:
            log.exception("worker.unexpected_error", study_id=job.study_id)
            self._failed(
                job.id, job.study_id, job.generation, job.attempts, f"{type(exc).__name__}: {exc}", False
            )
        return None

    def _renew_lease(self, job_id: int, stop: threading.Event) -> None:
        lease_s = self.settings.queue.lease_s
        while not stop.wait(lease_s / 3):
            try:
                with self.database.session() as session:
                    if not JOBS.renew(session, job_id, self.owner, lease_s):
                        return
            except Exception as exc:  # noqa: BLE001 - keep trying; the lease is long
                log.warning("worker.lease_renew_failed", job_id=job_id, error=repr(exc))

    # -- one study --------------------------------------------------------------------

    def _sources(self, study_id: int) -> tuple[RoutingRule, list[InstanceFacts], dict[int, str]]:
        with self.database.read() as session:
            stored = study_instances(session, study_id)
        route = route_study(self.settings.routing, [s.facts for s in stored])
        if route is None:
            raise AnalysisError("no routing rule matches this study any more", permanent=True)
        return route.rule, route.instances, {s.facts.instance_id: s.path for s in stored}

    def process(self, job_id: int, study_id: int, generation: int) -> None:
        """Analyse one study: both phases, one after the other."""
        analysis = self.begin(job_id, study_id, generation)
        if analysis is not None:
            self.finish(analysis)

    def begin(self, job_id: int, study_id: int, generation: int) -> _Analysis | None:
        """Phase 1 (decode, model, SR queued and sent); returns what :meth:`finish` needs
        for phase 2, or None when the job's lease was lost."""
        t0 = time.perf_counter()
        rule, routed, paths = self._sources(study_id)
        predictor = self.models.predictor(rule)
        sources: list[_Source] = []
        images: list[np.ndarray] = []
        problems: list[str] = []
        for facts in routed:
            path = self.spool.path(paths[facts.instance_id])
            try:
                # From the path, so the decoder's guards (deflate and decompression bombs)
                # see the file before anything is inflated; the results need the header only.
                image = load_display_image(path)
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                images.append(image)
                sources.append(_Source(facts.instance_id, facts.sop_instance_uid, ds))
            except (PixelDataError, OSError, ValueError, AttributeError) as exc:
                problems.append(f"{facts.sop_instance_uid}: {exc}")
                log.warning("worker.image_unreadable", sop_instance_uid=facts.sop_instance_uid, error=str(exc))
        if not sources:
            raise AnalysisError("no image could be decoded: " + "; ".join(problems), permanent=True)
        t_decode = time.perf_counter()

        uids = [s.sop_instance_uid for s in sources]
        predictions, forward = predictor.predict_deferred(images, head=rule.head, sop_instance_uids=uids)
        t_model = time.perf_counter()
        forward_ms = predictor.timings_ms.get("model", 0.0)

        artifact = predictor.artifact
        labels = artifact.labels(rule.head)
        study_probs = {
            spec.name: max(p.probabilities[spec.name] for p in predictions) for spec in labels
        }
        score = predictor.abnormality_score(rule.head, study_probs)
        decision = decide(self.settings.triage, labels, study_probs, score)
        algorithm = artifact.algorithm
        if self.settings.demo and not algorithm.is_demo:
            algorithm = replace(algorithm, is_demo=True)
        prediction = StudyPrediction(
            head=rule.head,
            labels=labels,
            probabilities=study_probs,
            abnormality_score=score,
            images=predictions,
            algorithm=algorithm,
        )
        study_uid = str(sources[0].dataset.StudyInstanceUID)
        # A retried job rebuilds the same UIDs, so a PACS that got the first attempt's
        # objects keeps one copy of each.
        uid_seed = f"ddn-node:{study_uid}:generation:{generation}"
        built_at = dt.datetime.now(dt.UTC)
        source_headers = [s.dataset for s in sources]
        sr_uid = make_uid(uid_seed, "sr")
        # Phase 1: the SR (findings, score, priority) leaves for the PACS as soon as it is
        # built; the heat maps, which take longer to draw, follow in phase 2.
        objects = build_sr_result(
            source_headers,
            prediction,
            decision.priority.value,
            self._predecessor(study_id, exclude=sr_uid),
            uid_seed=uid_seed,
            now=built_at,
        )
        sr_files = self._queue_sr(job_id, study_id, study_uid, objects, prediction, decision, generation)
        if sr_files is None:
            return None
        t_sr = time.perf_counter()
        self._send_sr(study_id, str(objects.sr.SOPInstanceUID))
        t_sent = time.perf_counter()
        # The overlays are drawn at most MAX_SIDE pixels wide: keep the display images at
        # that size while phase 2 waits (a quarter of a 2048 x 2048 image's memory).
        images = [fit_display(img) for img in images]
        return _Analysis(
            job_id=job_id,
            study_id=study_id,
            generation=generation,
            rule=rule,
            predictor=predictor,
            forward=forward,
            prediction=prediction,
            decision=decision,
            sources=sources,
            images=images,
            objects=objects,
            sr_files=sr_files,
            uid_seed=uid_seed,
            built_at=built_at,
            unreadable=len(problems),
            timings_ms={
                "decode_ms": (t_decode - t0) * 1000,
                "model_ms": (t_model - t_decode) * 1000,
                "forward_ms": forward_ms,
                "sr_ms": (t_sr - t_model) * 1000,
                "sr_send_ms": (t_sent - t_sr) * 1000,
            },
            phase1_done=t_sent,
        )

    def finish(self, a: _Analysis) -> None:
        """Phase 2: heat maps, then the result, its deliveries and the study's new state in
        one transaction fenced by the job's lease."""
        t2 = time.perf_counter()
        a.predictor.add_heatmaps(a.prediction.images, a.forward)
        t_cam = time.perf_counter()
        study_uid, uid_seed, built_at = a.study_uid, a.uid_seed, a.built_at
        job_id, study_id, generation, rule = a.job_id, a.study_id, a.generation, a.rule
        objects, sources, images, prediction, decision = a.objects, a.sources, a.images, a.prediction, a.decision
        add_heat_map_objects(
            objects,
            [src.dataset for src in sources],
            prediction,
            {s.sop_instance_uid: img for s, img in zip(sources, images, strict=True)},
            uid_seed=uid_seed,
            now=built_at,
        )
        files = a.sr_files + self._write_results(
            study_uid,
            [("pm", ds) for ds in objects.parametric_maps] + [("sc", ds) for ds in objects.overlays],
        )
        overlays = self._overlay_files(objects, files)
        t_results = time.perf_counter()
        timings = dict(a.timings_ms)
        busy = {
            "gradcam_ms": (t_cam - t2) * 1000,
            # Building result objects: the SR (phase 1) and the heat-map objects (phase 2).
            "results_ms": timings["sr_ms"] + (t_results - t_cam) * 1000,
            # Phase 2 may wait while the SRs of studies that came meanwhile go first.
            "deferred_ms": (t2 - a.phase1_done) * 1000,
        }
        timings.update(busy)
        timings["total_ms"] = sum(
            timings[k] for k in ("decode_ms", "model_ms", "sr_ms", "sr_send_ms", "gradcam_ms")
        ) + (t_results - t_cam) * 1000
        prediction.timings_ms = timings
        now = utcnow()
        messages = self._notifications(study_id, prediction, decision, now)
        committed = self._commit(
            job_id, study_id, generation, rule, prediction, decision, objects, files, overlays, sources, messages, now
        )
        if committed:
            log.info(
                "worker.study_analysed",
                study_uid=study_uid,
                generation=generation,
                head=rule.head,
                images=len(sources),
                unreadable=a.unreadable,
                score=round(prediction.abnormality_score, 4),
                priority=decision.priority.value,
                positive=prediction.positive,
                **{k: round(v, 1) for k, v in timings.items()},
            )
            if self.on_results is not None:
                self.on_results()

    def _notifications(
        self, study_id: int, prediction: StudyPrediction, decision, now  # type: ignore[no-untyped-def]
    ) -> list[tuple[OutgoingMessage, str, str]]:
        """Messages for the enabled adapters, durably on disk: (message, id, relpath)."""
        adapters = self.settings.adapters
        if not (adapters.hl7.enabled or adapters.fhir.enabled or adapters.webhook.enabled):
            return []
        with self.database.read() as session:
            study = session.get(Study, study_id)
            assert study is not None
            summary = StudySummary(
                study_uid=study.study_uid,
                accession_number=study.accession_number,
                patient_id=study.patient_id,
                patient_name=study.patient_name,
                patient_birth_date=study.patient_birth_date,
                patient_sex=study.patient_sex,
                study_date=study.study_date,
                study_time=study.study_time,
                modalities=study.modalities,
                study_description=study.study_description,
                priority=decision.priority.value,
                priority_reason=decision.reason,
                abnormality_score=prediction.abnormality_score,
                findings=[
                    (name, p, name in prediction.positive)
                    for name, p in sorted(prediction.probabilities.items(), key=lambda kv: kv[1], reverse=True)
                ],
                model_name=prediction.algorithm.name,
                model_version=prediction.algorithm.version,
                is_demo=prediction.algorithm.is_demo,
                analysed_at=now,
            )
        out = []
        for message in messages_for(adapters, summary):
            relpath = self.spool.result_relpath(
                summary.study_uid, f"{message.kind}-{summary.notification_id}", suffix=".msg"
            )
            self.spool.write_bytes(relpath, message.payload)
            out.append((message, summary.notification_id, relpath))
        return out

    def _predecessor(self, study_id: int, exclude: str) -> SRReference | None:
        """The study's latest SR before this analysis (``exclude``: this analysis's own SR,
        queued already when a job is retried after its first phase)."""
        with self.database.read() as session:
            row = session.execute(
                select(Delivery.sop_instance_uid, Delivery.path)
                .where(
                    Delivery.study_id == study_id,
                    Delivery.kind == "sr",
                    Delivery.sop_instance_uid != exclude,
                )
                .order_by(Delivery.id.desc())
                .limit(1)
            ).first()
        if row is None:
            return None
        ds = pydicom.dcmread(self.spool.path(row[1]), stop_before_pixels=True)
        return SRReference(
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
        )

    def _write_results(self, study_uid: str, objects: list[tuple[str, Dataset]]) -> list[tuple[str, Dataset, str]]:
        """(kind, dataset, relpath) for every object, durably on disk."""
        out = []
        for kind, ds in objects:
            relpath = self.spool.result_relpath(study_uid, str(ds.SOPInstanceUID))
            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            self.spool.write_bytes(relpath, buffer.getvalue())
            out.append((kind, ds, relpath))
        return out

    def _send_sr(self, study_id: int, sr_uid: str) -> None:
        """The SR to the PACS before the heat maps are drawn: sent from this thread when
        this process delivers, else left to the delivery loop (woken here)."""
        if self.send_now is None:
            if self.on_results is not None:
                self.on_results()
            return
        try:
            self.send_now(study_id, sr_uid)
        except Exception as exc:  # noqa: BLE001 - the delivery loop retries whatever is left
            log.warning("worker.sr_send_failed", study_id=study_id, error=repr(exc))
            if self.on_results is not None:
                self.on_results()

    def _queue_sr(
        self,
        job_id: int,
        study_id: int,
        study_uid: str,
        objects: ResultObjects,
        prediction: StudyPrediction,
        decision: TriageDecision,
        generation: int,
    ) -> list[tuple[str, Dataset, str]] | None:
        """Phase 1: the SR on disk, its delivery rows and the study's new priority
        committed, fenced by the job's lease; None when the lease was lost. The rows have
        no result yet (phase 2 links them). When an earlier attempt got this far, its SR -
        the one a PACS may already hold - is kept as it is."""
        sr = objects.sr
        sr_uid = str(sr.SOPInstanceUID)
        relpath = self.spool.result_relpath(study_uid, sr_uid)
        wanted = {d.name for d in self.settings.destinations}
        with self.database.read() as session:
            queued = set(
                session.scalars(
                    select(Delivery.destination).where(
                        Delivery.study_id == study_id, Delivery.sop_instance_uid == sr_uid
                    )
                )
            )
        if queued and self.spool.path(relpath).is_file():
            if wanted <= queued:
                return [("sr", sr, relpath)]
        else:
            self._write_results(study_uid, [("sr", sr)])
        now = utcnow()
        with self.database.session() as session:
            if not JOBS.renew(session, job_id, self.owner, self.settings.queue.lease_s):
                log.warning("worker.lease_lost", job_id=job_id, study_id=study_id)
                session.rollback()
                return None
            for name in sorted(wanted - queued):
                session.add(
                    Delivery(
                        study_id=study_id,
                        result_id=None,
                        destination=name,
                        kind="sr",
                        sop_class_uid=str(sr.SOPClassUID),
                        sop_instance_uid=sr_uid,
                        path=relpath,
                        not_before=now,
                    )
                )
            if not queued:
                # The worklist re-orders as the SR leaves, not after the heat maps.
                self._triage_study(session, study_id, generation, prediction, decision, now)
        return [("sr", sr, relpath)]

    def _triage_study(
        self,
        session,  # type: ignore[no-untyped-def]
        study_id: int,
        generation: int,
        prediction: StudyPrediction,
        decision: TriageDecision,
        now: dt.datetime,
    ) -> None:
        top = sorted(prediction.probabilities.items(), key=lambda kv: kv[1], reverse=True)[:3]
        session.execute(
            update(Study)
            .where(Study.id == study_id)
            .values(
                abnormality_score=prediction.abnormality_score,
                priority=decision.priority.value,
                priority_rank=decision.rank,
                priority_reason=decision.reason,
                top_findings=[[name, round(p, 4)] for name, p in top],
                model_version=f"{prediction.algorithm.name} {prediction.algorithm.version}",
                analysed_at=now,
                # New results are new reading: a study read before (a re-opened one, or
                # one read before its analysis) goes back on the unread list.
                read_status="unread",
            )
        )
        if generation > 1 or self._was_read(session, study_id):
            session.add(
                WorklistEvent(
                    study_id=study_id,
                    user="ddn-node",
                    action="unread",
                    value=f"new results (analysis {generation})",
                    at=now,
                )
            )


    @staticmethod
    def _overlay_files(
        objects: ResultObjects, files: list[tuple[str, Dataset, str]]
    ) -> dict[tuple[str, str], str]:
        """(source SOP UID, label) -> the overlay Secondary Capture in the spool, which the
        study page renders when someone looks."""
        path_of = {str(ds.SOPInstanceUID): relpath for _kind, ds, relpath in files}
        return {
            (str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID), objects.overlay_labels[str(ds.SOPInstanceUID)]): path_of[
                str(ds.SOPInstanceUID)
            ]
            for ds in objects.overlays
        }

    def _commit(
        self,
        job_id: int,
        study_id: int,
        generation: int,
        rule: RoutingRule,
        prediction: StudyPrediction,
        decision,  # type: ignore[no-untyped-def]
        objects: ResultObjects,
        files: list[tuple[str, Dataset, str]],
        overlays: dict[tuple[str, str], str],
        sources: list[_Source],
        messages: list[tuple[OutgoingMessage, str, str]],
        now,  # type: ignore[no-untyped-def]
    ) -> bool:
        with self.database.session() as session:
            if not JOBS.finish(session, job_id, self.owner, JobState.DONE, finished_at=now, last_error=""):
                log.warning("worker.lease_lost", job_id=job_id, study_id=study_id)
                session.rollback()
                return False
            result = Result(
                study_id=study_id,
                job_id=job_id,
                generation=generation,
                model_name=prediction.algorithm.name,
                model_version=prediction.algorithm.version,
                head=rule.head,
                probabilities=prediction.probabilities,
                positive=prediction.positive,
                abnormality_score=prediction.abnormality_score,
                priority=decision.priority.value,
                timings_ms=prediction.timings_ms,
                sr_sop_instance_uid=str(objects.sr.SOPInstanceUID),
            )
            session.add(result)
            session.flush()
            for source, image in zip(sources, prediction.images, strict=True):
                session.add(
                    ImageResult(
                        result_id=result.id,
                        instance_id=source.instance_id,
                        probabilities=image.probabilities,
                        overlay_paths={
                            label: path for (uid, label), path in overlays.items() if uid == source.sop_instance_uid
                        },
                    )
                )
            session.execute(
                update(Delivery)
                .where(
                    Delivery.study_id == study_id,
                    Delivery.sop_instance_uid == str(objects.sr.SOPInstanceUID),
                    Delivery.result_id.is_(None),
                )
                .values(result_id=result.id)
            )
            for destination in self.settings.destinations:
                for kind, ds, relpath in files:
                    if kind == "sr":
                        continue  # queued in phase 1
                    session.add(
                        Delivery(
                            study_id=study_id,
                            result_id=result.id,
                            destination=destination.name,
                            kind=kind,
                            sop_class_uid=str(ds.SOPClassUID),
                            sop_instance_uid=str(ds.SOPInstanceUID),
                            path=relpath,
                            not_before=now,
                        )
                    )
            for message, message_id, relpath in messages:
                session.add(
                    Delivery(
                        study_id=study_id,
                        result_id=result.id,
                        destination=f"adapter:{message.kind}",
                        kind=message.kind,
                        sop_class_uid="",
                        sop_instance_uid=message_id,
                        path=relpath,
                        not_before=now,
                    )
                )
            # Only the generation that is still current moves the study to 'analysed'; if
            # a late instance re-opened it meanwhile, it stays 'receiving'.
            session.execute(
                update(Study)
                .where(
                    Study.id == study_id,
                    Study.generation == generation,
                    Study.state == StudyState.ANALYSING,
                )
                .values(state=StudyState.ANALYSED, state_reason="")
            )
        return True

    @staticmethod
    def _was_read(session, study_id: int) -> bool:  # type: ignore[no-untyped-def]
        return bool(
            session.scalar(select(WorklistEvent.id).where(WorklistEvent.study_id == study_id).limit(1))
        )

    def _failed(
        self, job_id: int, study_id: int, generation: int, attempts: int, reason: str, permanent: bool
    ) -> None:
        max_attempts = self.settings.queue.max_attempts
        if permanent or attempts >= max_attempts:
            self._give_up(job_id, study_id, generation, reason)
            return
        with self.database.session() as session:
            JOBS.retry_later(session, job_id, self.owner, self.settings.queue.retry_delay_s, last_error=reason)
            session.execute(
                update(Study)
                .where(Study.id == study_id, Study.generation == generation, Study.state == StudyState.ANALYSING)
                .values(state=StudyState.QUEUED, state_reason=f"retrying after: {reason}"[:2000])
            )
        log.warning("worker.study_retry", study_id=study_id, attempt=attempts, error=reason)

    def _give_up(self, job_id: int, study_id: int, generation: int, reason: str) -> None:
        with self.database.session() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    state=JobState.FAILED,
                    last_error=reason,
                    finished_at=utcnow(),
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
            session.execute(
                update(Study)
                .where(Study.id == study_id, Study.generation == generation)
                .values(
                    state=StudyState.FAILED,
                    state_reason=reason[:2000],
                    priority=Priority.NOT_ANALYSED.value,
                    priority_rank=PRIORITY_RANK[Priority.NOT_ANALYSED],
                    priority_reason=f"analysis failed: {reason}"[:2000],
                )
            )
        log.error("worker.study_failed", study_id=study_id, generation=generation, error=reason)
