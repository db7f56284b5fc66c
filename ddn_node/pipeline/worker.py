"""The worker: claim a completed study, analyse it, store results and queue their delivery.

One study at a time per worker thread; several workers (threads, processes, hosts) share
the queue. The result rows, the study's new priority and the delivery rows commit in one
transaction fenced by the job's lease, so a study generation is analysed and delivered
exactly once even when a worker dies half-way and another takes over its expired lease.
Result files are written (fsync + rename) before that commit; a crash in between leaves
only unreferenced files, rewritten identically by the next attempt.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import structlog
from pydicom.dataset import Dataset
from sqlalchemy import select, update

from ddn_node.config import PRIORITY_RANK, Priority, RoutingRule, Settings
from ddn_node.dicom.pixels import PixelDataError, load_display_image
from ddn_node.dicom.results import ResultObjects, SRReference, build_results
from ddn_node.dicom.spool import Spool
from ddn_node.model.artifact import ModelArtifact
from ddn_node.model.inference import Predictor
from ddn_node.model.types import StudyPrediction
from ddn_node.pipeline.notify import OutgoingMessage, StudySummary, messages_for
from ddn_node.pipeline.routing import InstanceFacts, route_study, study_instances
from ddn_node.pipeline.triage import decide
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
                    artifact, device=self.settings.worker.device, threads=self.settings.worker.torch_threads
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


class Worker:
    def __init__(
        self,
        settings: Settings,
        database: Database,
        spool: Spool,
        models: ModelRegistry,
        owner: str,
        on_results: Callable[[], None] | None = None,
    ):
        self.settings = settings
        self.database = database
        self.spool = spool
        self.models = models
        self.owner = owner
        self.on_results = on_results

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
        log.info("worker.stopped", owner=self.owner)

    def run_once(self) -> bool:
        """Claim and process one job; False when the queue had nothing claimable."""
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
        try:
            self.process(job_id, study_id, generation)
        except AnalysisError as exc:
            self._failed(job_id, study_id, generation, attempts, str(exc), exc.permanent)
        except Exception as exc:  # noqa: BLE001 - a model or library error must not stop the queue
            log.exception("worker.unexpected_error", study_id=study_id)
            self._failed(job_id, study_id, generation, attempts, f"{type(exc).__name__}: {exc}", False)
        finally:
            stop_renewing.set()
        return True

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
        predictions = predictor.predict(images, head=rule.head, sop_instance_uids=uids, heatmaps=True)
        t_model = time.perf_counter()

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
        predecessor = self._predecessor(study_id)
        study_uid = str(sources[0].dataset.StudyInstanceUID)
        objects = build_results(
            [s.dataset for s in sources],
            prediction,
            decision.priority.value,
            {s.sop_instance_uid: img for s, img in zip(sources, images, strict=True)},
            predecessor=predecessor,
            # A retried job rebuilds the same UIDs, so a PACS that got the first attempt's
            # objects keeps one copy of each.
            uid_seed=f"ddn-node:{study_uid}:generation:{generation}",
        )
        files = self._write_results(study_uid, objects)
        overlays = self._overlay_files(objects, files)
        t_results = time.perf_counter()
        timings = {
            "decode_ms": (t_decode - t0) * 1000,
            "model_ms": (t_model - t_decode) * 1000,
            "forward_ms": predictor.timings_ms.get("model", 0.0),
            "gradcam_ms": predictor.timings_ms.get("gradcam", 0.0),
            "results_ms": (t_results - t_model) * 1000,
            "total_ms": (t_results - t0) * 1000,
        }
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
                unreadable=len(problems),
                score=round(score, 4),
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

    def _predecessor(self, study_id: int) -> SRReference | None:
        with self.database.read() as session:
            row = session.execute(
                select(Delivery.sop_instance_uid, Delivery.path)
                .join(Result, Delivery.result_id == Result.id)
                .where(Result.study_id == study_id, Delivery.kind == "sr")
                .order_by(Result.generation.desc())
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

    def _write_results(self, study_uid: str, objects: ResultObjects) -> list[tuple[str, Dataset, str]]:
        """(kind, dataset, relpath) for every object, durably on disk."""
        out = []
        for kind, datasets in (("sr", [objects.sr]), ("pm", objects.parametric_maps), ("sc", objects.overlays)):
            for ds in datasets:
                relpath = self.spool.result_relpath(study_uid, str(ds.SOPInstanceUID))
                buffer = BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                self.spool.write_bytes(relpath, buffer.getvalue())
                out.append((kind, ds, relpath))
        return out

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
            for destination in self.settings.destinations:
                for kind, ds, relpath in files:
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
