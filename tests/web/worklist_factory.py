"""Studies for the web tests, and the worker's commit of an analysis, simulated.

``analyse`` writes what ``pipeline.worker.Worker._commit`` writes (a done job, a result,
per-image results with overlay paths, the study's triage columns) with the same triage
rules (``pipeline.triage.decide``), without a model: the web part only reads these rows.
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select, update

from ddn_node.config import TriageSettings
from ddn_node.dicom.spool import Spool
from ddn_node.model.types import Code, LabelSpec
from ddn_node.pipeline.triage import decide
from ddn_node.store.engine import Database
from ddn_node.store.models import (
    Delivery,
    ImageResult,
    Instance,
    Job,
    Result,
    Series,
    Study,
    utcnow,
)
from ddn_node.vocabulary import JobState, StudyState

MODEL_NAME = "DDN test model"
MODEL_VERSION = "2026.11.27-test"
HEAD = "cxr"
LABELS = [
    LabelSpec("Atelectasis", Code("46621007", "SCT", "Atelectasis"), 0.5),
    LabelSpec("Effusion", Code("60046008", "SCT", "Pleural effusion"), 0.5),
    LabelSpec("Mass", Code("4147007", "SCT", "Mass"), 0.5),
    LabelSpec("Pneumothorax", Code("36118008", "SCT", "Pneumothorax"), 0.4),
]
_uids = itertools.count(1)


def new_uid() -> str:
    return f"1.2.826.0.1.3680043.10.1044.99.{next(_uids)}"


def add_study(
    database: Database,
    *,
    study_uid: str | None = None,
    patient_name: str = "DOE^JANE",
    patient_id: str = "PID-1",
    accession: str = "ACC-1",
    modalities: str = "CR",
    description: str = "CHEST PA",
    received_ago: dt.timedelta = dt.timedelta(minutes=5),
    state: str = StudyState.QUEUED,
    read_status: str = "unread",
    now: dt.datetime | None = None,
) -> str:
    uid = study_uid or new_uid()
    received = (now or utcnow()) - received_ago
    with database.session() as session:
        session.add(
            Study(
                study_uid=uid,
                patient_name=patient_name,
                patient_id=patient_id,
                accession_number=accession,
                modalities=modalities,
                study_date=received.strftime("%Y%m%d"),
                study_time=received.strftime("%H%M%S"),
                study_description=description,
                state=state,
                read_status=read_status,
                first_received_at=received,
                last_received_at=received,
                num_instances=1,
            )
        )
    return uid


@dataclass(frozen=True)
class StoredImage:
    sop_instance_uid: str
    relpath: str


def add_image(
    database: Database, spool: Spool, study_uid: str, size: int = 64, seed: int = 0
) -> StoredImage:
    """A real little CR instance in the spool and its rows, as the SCP would leave them."""
    from support.dicomgen import make_cr, to_file_bytes

    ds = make_cr(study_uid, size=size, seed=seed)
    spool.prepare()
    relpath = spool.instance_relpath(study_uid, str(ds.SOPInstanceUID))
    path = spool.path(relpath)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_file_bytes(ds)
    path.write_bytes(data)
    with database.session() as session:
        study_id = session.execute(
            select(Study.id).where(Study.study_uid == study_uid)
        ).scalar_one()
        series = Series(
            study_id=study_id,
            series_uid=str(ds.SeriesInstanceUID),
            modality="CR",
            body_part="CHEST",
        )
        session.add(series)
        session.flush()
        session.add(
            Instance(
                series_id=series.id,
                study_id=study_id,
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                view_position="PA",
                rows=size,
                columns=size,
                path=relpath,
                size=len(data),
                sha256="0" * 64,
            )
        )
    return StoredImage(str(ds.SOPInstanceUID), relpath)


def write_overlay_png(spool: Spool, study_uid: str, name: str, size: int = 64) -> str:
    relpath = spool.result_relpath(study_uid, name, suffix=".png")
    path = spool.path(relpath)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((size, size, 3), dtype=np.uint8)
    rgb[..., 0] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
    out = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(out, format="PNG")
    path.write_bytes(out.getvalue())
    return relpath


def analyse(
    database: Database,
    study_uid: str,
    probabilities: dict[str, float],
    *,
    policy: TriageSettings | None = None,
    heatmap_notes: dict[str, str] | None = None,
    overlays: dict[str, dict[str, str]] | None = None,
    timings_ms: dict[str, float] | None = None,
    deliveries: list[tuple[str, str, str]] = (),  # type: ignore[assignment]
) -> None:
    """Commit an analysis of ``study_uid`` the way the worker does.

    ``overlays``: SOP Instance UID -> {label: spool-relative PNG}; ``deliveries``:
    (destination, kind, state) rows to create for the result.
    """
    policy = policy or TriageSettings()
    probs = {spec.name: probabilities.get(spec.name, 0.01) for spec in LABELS}
    score = max(probs.values())
    decision = decide(policy, LABELS, probs, score)
    now = utcnow()
    with database.session() as session:
        study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()
        generation = study.generation + 1
        job = Job(
            study_id=study.id,
            generation=generation,
            state=JobState.DONE,
            attempts=1,
            finished_at=now,
        )
        session.add(job)
        session.flush()
        result = Result(
            study_id=study.id,
            job_id=job.id,
            generation=generation,
            model_name=MODEL_NAME,
            model_version=MODEL_VERSION,
            head=HEAD,
            probabilities=probs,
            positive=[s.name for s in LABELS if probs[s.name] >= s.threshold],
            thresholds={s.name: s.threshold for s in LABELS},
            heatmap_notes=heatmap_notes or {},
            heatmap_caveats={},
            abnormality_score=score,
            priority=decision.priority.value,
            timings_ms=timings_ms or {"model_ms": 40.0, "total_ms": 120.0},
            sr_sop_instance_uid=new_uid(),
        )
        session.add(result)
        session.flush()
        instances = session.execute(
            select(Instance.id, Instance.sop_instance_uid).where(Instance.study_id == study.id)
        ).all()
        for instance_id, sop_uid in instances:
            session.add(
                ImageResult(
                    result_id=result.id,
                    instance_id=instance_id,
                    probabilities=probs,
                    overlay_paths=(overlays or {}).get(sop_uid, {}),
                )
            )
        for destination, kind, state in deliveries:
            session.add(
                Delivery(
                    study_id=study.id,
                    result_id=result.id,
                    destination=destination,
                    kind=kind,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                    sop_instance_uid=new_uid(),
                    path=f"results/{study_uid}/{kind}.dcm",
                    state=state,
                    attempts=1 if state != "failed" else 10,
                    last_status=0xA700 if state == "failed" else (0 if state == "sent" else None),
                    last_error="out of resources" if state == "failed" else "",
                    sent_at=now if state == "sent" else None,
                )
            )
        top = sorted(probs.items(), key=lambda kv: kv[1], reverse=True)[:3]
        session.execute(
            update(Study)
            .where(Study.id == study.id)
            .values(
                generation=generation,
                abnormality_score=score,
                priority=decision.priority.value,
                priority_rank=decision.rank,
                priority_reason=decision.reason,
                top_findings=[[name, round(p, 4)] for name, p in top],
                model_version=f"{MODEL_NAME} {MODEL_VERSION}",
                analysed_at=now,
                state=StudyState.ANALYSED,
                state_reason="",
            )
        )


def write_manifest(directory: Path) -> Path:
    """The JSON part of a model artifact, enough for a routing rule to name it."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": "ddn-test",
        "version": MODEL_VERSION,
        "algorithm_name": MODEL_NAME,
        "heads": {
            HEAD: {
                "activation": "sigmoid",
                "labels": [
                    {
                        "name": s.name,
                        "code": {
                            "value": s.code.value,
                            "scheme": s.code.scheme,
                            "meaning": s.code.meaning,
                        },
                        "threshold": s.threshold,
                    }
                    for s in LABELS
                ],
            }
        },
    }
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return directory
