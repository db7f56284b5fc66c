"""The results' side of an analysis: the SR and the other objects, their files, and the
rows that record and deliver them (``pipeline/analysis.py`` holds the model's side).

Steps that write to the database do so through ``store/`` in one transaction fenced by the
job's lease (:mod:`ddn_node.store.lifecycle`); they return None (phase 1) or False
(phase 2) when the lease was lost, and another worker's result stands. Files are written
(fsync + rename) before their rows commit; a crash in between leaves only unreferenced
files, which the next attempt rewrites identically (the UIDs derive from the study and
generation).

Each destination gets the kinds it takes (``[[destinations]] kinds``): the SR's rows are
queued with the report, the Parametric Maps' and overlays' with the rest. The overlays
are made even when no destination takes them: the study page shows them.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from io import BytesIO

import pydicom
import structlog
from pydicom.dataset import Dataset

from ddn_node.config import Settings
from ddn_node.dicom.results import (
    ResultObjects,
    SeriesNumbers,
    SRReference,
    add_heat_map_objects,
    build_sr_result,
)
from ddn_node.dicom.results.content import make_uid
from ddn_node.dicom.results.rejection import Withdrawn, build_rejection_note
from ddn_node.dicom.spool import Spool
from ddn_node.pipeline.analysis import Analysis, ms_since
from ddn_node.pipeline.drift import DriftMonitor, ModelKey, record_inputs
from ddn_node.pipeline.notices import queue_messages
from ddn_node.store import lifecycle
from ddn_node.store import results as records
from ddn_node.store.engine import Database
from ddn_node.store.models import utcnow
from ddn_node.vocabulary import ResultKind

log = structlog.get_logger("ddn_node.worker")


class ReportingSteps:
    """The results' side of an analysis, bound to the node's settings, database and spool."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        spool: Spool,
        send_now: Callable[[int, str], object] | None = None,
        on_results: Callable[[], None] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ):
        self.settings = settings
        self.database = database
        self.spool = spool
        # The worker's clock: the rows written here are due at its "now".
        self.clock = clock
        # Sends one object (study id, SOP Instance UID) at once, from this thread: the SR.
        self.send_now = send_now
        # Wakes the delivery loop once results are queued.
        self.on_results = on_results
        self.drift = DriftMonitor(settings.drift, database, clock)

    def wanted(self, kind: ResultKind) -> list[str]:
        """The destinations that take ``kind`` (a rejection note: those that withdraw
        superseded results)."""
        if kind is ResultKind.KO:
            return [d.name for d in self.settings.destinations if d.withdraw_superseded]
        return [d.name for d in self.settings.destinations if kind in d.kinds]

    # -- phase 1 -----------------------------------------------------------------------

    def report(self, a: Analysis) -> Analysis | None:
        """The SR built and on disk; the result row, the SR's delivery rows and the study's
        new priority committed, fenced by the lease. None when the lease was lost.

        When an earlier attempt got this far, its SR - the one a PACS may already hold -
        is kept as it is, and only destinations added since get a delivery row.
        """
        t0 = time.perf_counter()
        prediction, decision = a.predicted()
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
        if earlier is None and a.inputs:
            self.drift.after_report(self._model_key(a), a.predictor.artifact.path)
        return replace(
            a, objects=objects, result_id=result_id, timings_ms=a.timed(sr_ms=ms_since(t0))
        )

    def _record_report(
        self,
        a: Analysis,
        objects: ResultObjects,
        relpath: str,
        earlier: records.StoredReport | None,
    ) -> int | None:
        lease, sr = a.lease, objects.sr
        sr_uid = str(sr.SOPInstanceUID)
        now = self.clock()
        with self.database.session() as session:
            if not lifecycle.hold(session, lease):
                log.warning("worker.lease_lost", job_id=lease.job_id, study_id=lease.study_id)
                session.rollback()
                return None
            queued = records.queued_destinations(session, lease.study_id, sr_uid)
            deliveries = [
                records.OutgoingObject(name, ResultKind.SR, str(sr.SOPClassUID), sr_uid, relpath)
                for name in sorted(set(self.wanted(ResultKind.SR)) - queued)
            ]
            if earlier is not None:
                records.add_deliveries(session, lease.study_id, earlier.result_id, deliveries, now)
                return earlier.result_id
            result_id = records.record_report(
                session,
                study_id=lease.study_id,
                job_id=lease.job_id,
                generation=lease.generation,
                report=self._report_of(a, sr, relpath),
                deliveries=deliveries,
                now=now,
            )
            # With the result, so a retried job records its images once.
            if self.settings.drift.enabled:
                record_inputs(session, self._model_key(a), a.inputs, now)
            # The worklist re-orders as the SR leaves, not after the other objects.
            lifecycle.triage(session, lease, self._triage_of(a), now)
            return result_id

    @staticmethod
    def _model_key(a: Analysis) -> ModelKey:
        prediction, _ = a.predicted()
        return ModelKey(prediction.algorithm.name, prediction.algorithm.version, prediction.head)

    @staticmethod
    def _report_of(a: Analysis, sr: Dataset, relpath: str) -> records.Report:
        prediction, decision = a.predicted()
        algorithm = prediction.algorithm
        return records.Report(
            model_name=algorithm.name,
            model_version=algorithm.version,
            head=prediction.head,
            probabilities=prediction.probabilities,
            positive=prediction.positive,
            thresholds={spec.name: spec.threshold for spec in prediction.labels},
            heatmap_notes=prediction.heatmap_notes,
            heatmap_caveats=prediction.heatmap_caveats,
            abnormality_score=prediction.abnormality_score,
            priority=decision.priority.value,
            sr=records.ReportIdentity(
                str(sr.SOPClassUID),
                str(sr.SOPInstanceUID),
                str(sr.SeriesInstanceUID),
                a.study_uid,
                relpath,
            ),
            timings_ms=a.timings_ms,
        )

    @staticmethod
    def _triage_of(a: Analysis) -> lifecycle.Triage:
        prediction, decision = a.predicted()
        # The worklist's top findings: a normal class ("notumor 0.97") is not one.
        findings = {k: v for k, v in prediction.probabilities.items() if k not in prediction.normal}
        top = sorted(findings.items(), key=lambda kv: kv[1], reverse=True)[:3]
        return lifecycle.Triage(
            abnormality_score=prediction.abnormality_score,
            priority=decision.priority,
            rank=decision.rank,
            reason=decision.reason,
            top_findings=top,
            model_version=f"{prediction.algorithm.name} {prediction.algorithm.version}",
        )

    def send(self, a: Analysis) -> Analysis:
        """The SR to the PACS before the other objects are built: handed to ``send_now``
        when this process delivers (the SR sender's thread, or this one), else left to the
        delivery loop (woken here)."""
        assert a.objects is not None
        t0 = time.perf_counter()
        study_id, sr_uid = a.lease.study_id, str(a.objects.sr.SOPInstanceUID)
        sending: Future[int] | None = None
        if self.send_now is None:
            self._wake_delivery()
        else:
            try:
                handed = self.send_now(study_id, sr_uid)
            except Exception as exc:  # noqa: BLE001 - the delivery loop retries whatever is left
                log.warning("worker.sr_send_failed", study_id=study_id, error=repr(exc))
                self._wake_delivery()
            else:
                sending = handed if isinstance(handed, Future) else None
        return replace(
            a,
            timings_ms=a.timed(sr_send_ms=ms_since(t0)),
            phase1_done=time.perf_counter(),
            sr_sending=sending,
        )

    def _sr_sent(self, a: Analysis) -> None:
        """Wait until the study's SR send is over, so that its heat maps, queued next, never
        reach a PACS before it. Bounded by the delivery lease: a send that hangs longer
        than that has lost its claim anyway."""
        if a.sr_sending is None:
            return
        try:
            a.sr_sending.result(timeout=self.settings.delivery.timeout_s * 4 + 60)
        except TimeoutError:
            log.warning("worker.sr_send_slow", study_id=a.lease.study_id)

    # -- phase 2 -----------------------------------------------------------------------

    def build_objects(self, a: Analysis) -> Analysis:
        """Per source image a Parametric Map and an overlay, as far as they are wanted, on
        disk."""
        assert a.objects is not None
        t0 = time.perf_counter()
        prediction, _ = a.predicted()
        kinds = [ResultKind.SC] + ([ResultKind.PM] if self.wanted(ResultKind.PM) else [])
        add_heat_map_objects(
            a.objects,
            [s.dataset for s in a.sources],
            prediction,
            {s.sop_instance_uid: img for s, img in zip(a.sources, a.images, strict=True)},
            uid_seed=a.uid_seed,
            now=a.built_at,
            kinds=kinds,
            source_bytes={s.facts.sop_instance_uid: self._size(s.path) for s in a.routed},
        )
        a.objects.rejection = self._rejection_note(a)
        files: list[tuple[ResultKind, Dataset, str]] = []
        for kind, ds in a.objects.all()[1:]:
            relpath = self.spool.result_relpath(a.study_uid, str(ds.SOPInstanceUID))
            self._write(relpath, ds)
            files.append((kind, ds, relpath))
        built = ms_since(t0)
        timings = a.timed(
            results_ms=a.timings_ms.get("sr_ms", 0.0) + built,
            # Phase 2 may wait while the SRs of studies that came meanwhile go first.
            deferred_ms=(t0 - a.phase1_done) * 1000,
        )
        phases = ("decode_ms", "model_ms", "gradcam_ms", "sr_ms", "sr_send_ms")
        total = sum(timings.get(k, 0.0) for k in phases) + built
        return replace(a, files=tuple(files), timings_ms={**timings, "total_ms": total})

    def record(self, a: Analysis) -> bool:
        """Per-image results, the objects' and notifications' delivery rows, and the study
        analysed, in one transaction fenced by the lease."""
        prediction, decision = a.predicted()
        assert a.objects is not None and a.result_id is not None
        lease = a.lease
        prediction.timings_ms = dict(a.timings_ms)
        now = self.clock()
        messages = queue_messages(
            self.settings, self.database, self.spool, lease.study_id, prediction, decision, now
        )
        objects = [
            records.OutgoingObject(name, kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), relpath)
            for kind, ds, relpath in a.files
            for name in self.wanted(kind)
        ]
        self._sr_sent(a)
        with self.database.session() as session:
            if not lifecycle.analysed(session, lease, now):
                log.warning("worker.lease_lost", job_id=lease.job_id, study_id=lease.study_id)
                session.rollback()
                return False
            records.record_heat_maps(
                session,
                study_id=lease.study_id,
                result_id=a.result_id,
                images=self._image_records(a),
                deliveries=[*objects, *messages],
                timings_ms=a.timings_ms,
                now=now,
            )
        self._log_analysed(a)
        self._wake_delivery()
        return True

    @staticmethod
    def _image_records(a: Analysis) -> list[records.ImageRecord]:
        """Each scored image's probabilities, and its overlay under every label drawn on it
        (the study page shows the overlay with those labels)."""
        prediction, _ = a.predicted()
        assert a.objects is not None
        path_of = {str(ds.SOPInstanceUID): relpath for _kind, ds, relpath in a.files}
        overlay_of: dict[str, dict[str, str]] = {}
        for sc in a.objects.overlays:
            source_uid = str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)
            labels = a.objects.shows[str(sc.SOPInstanceUID)]
            overlay_of[source_uid] = {label: path_of[str(sc.SOPInstanceUID)] for label in labels}
        return [
            records.ImageRecord(
                instance_id=source.instance_id,
                probabilities=image.probabilities,
                overlay_paths=overlay_of.get(source.sop_instance_uid, {}),
            )
            for source, image in zip(a.sources, prediction.images, strict=True)
        ]

    # -- helpers -------------------------------------------------------------------------

    def _rejection_note(self, a: Analysis) -> Dataset | None:
        """The IOCM rejection note of what this analysis supersedes, when a destination
        withdraws superseded results (dicom/results/rejection.py)."""
        assert a.objects is not None
        if a.lease.generation < 2 or not self.wanted(ResultKind.KO):
            return None
        with self.database.read() as session:
            old = records.superseded_objects(
                session, a.lease.study_id, before_generation=a.lease.generation
            )
        withdrawn = []
        for obj in old:
            try:
                header = pydicom.dcmread(self.spool.path(obj.path), stop_before_pixels=True)
            except (OSError, ValueError) as exc:  # a purged file: nothing to reference it by
                log.warning(
                    "worker.withdraw_unreadable",
                    sop_instance_uid=obj.sop_instance_uid,
                    error=str(exc),
                )
                continue
            withdrawn.append(
                Withdrawn(obj.sop_class_uid, obj.sop_instance_uid, str(header.SeriesInstanceUID))
            )
        if not withdrawn:
            return None
        prediction, _ = a.predicted()
        return build_rejection_note(
            a.sources[0].dataset,
            withdrawn,
            superseded_by=str(a.objects.sr.SOPInstanceUID),
            algorithm=prediction.algorithm,
            series_instance_uid=make_uid(a.uid_seed, "ko-series"),
            sop_instance_uid=make_uid(a.uid_seed, "ko"),
            series_number=SeriesNumbers().rejection,
            now=a.built_at,
        )

    def _size(self, relpath: str) -> int:
        try:
            return self.spool.path(relpath).stat().st_size
        except OSError:
            return 0

    def _write(self, relpath: str, ds: Dataset) -> None:
        """One result object, durably in the spool (fsync + rename)."""
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        self.spool.write_bytes(relpath, buffer.getvalue())

    def _wake_delivery(self) -> None:
        if self.on_results is not None:
            self.on_results()

    def _log_analysed(self, a: Analysis) -> None:
        prediction, decision = a.predicted()
        assert a.objects is not None
        log.info(
            "worker.study_analysed",
            study_uid=a.study_uid,
            generation=a.lease.generation,
            head=a.rule.head,
            images=len(a.sources),
            scored_images=prediction.scored_images,
            unreadable=len(a.unreadable),
            score=round(prediction.abnormality_score, 4),
            priority=decision.priority.value,
            positive=prediction.positive,
            heat_maps=sorted({n for img in prediction.images for n in img.heatmaps}),
            objects=1 + len(a.files),
            **{k: round(v, 1) for k, v in a.timings_ms.items()},
        )
