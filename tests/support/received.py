"""A CR instance stored the way the SCP stores it (spool commit, then its row), its study
completed: for the tests that drive the worker in process."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ddn_node.config import Settings
from ddn_node.dicom.spool import Spool
from ddn_node.pipeline.completion import CompletionTracker
from ddn_node.store.ingest import InstanceRecord, record_instance
from ddn_node.store.models import utcnow
from support.dicomgen import make_cr


def receive_cr(
    settings: Settings,
    database: Any,
    spool: Spool,
    study_uid: str,
    *,
    size: int = 96,
    seed: int = 3,
) -> int:
    """One CR instance stored and its study completed; returns the study id."""
    ds = make_cr(study_uid, size=size, seed=seed)
    tmp = spool.incoming / "x.part"
    ds.save_as(tmp, enforce_file_format=True)
    stored = spool.commit(tmp, spool.instance_relpath(study_uid, str(ds.SOPInstanceUID)))
    outcome = record_instance(
        database,
        InstanceRecord(
            study_uid=study_uid,
            series_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            path=stored.relpath,
            size=stored.size,
            sha256=stored.sha256,
            modality="CR",
            body_part="CHEST",
            view_position="PA",
            rows=size,
            columns=size,
        ),
        quiet_period_s=0,
        force_complete_s=60,
        now=utcnow() - dt.timedelta(seconds=2),  # its quiet period is over
    )
    assert CompletionTracker(settings, database).complete(outcome.study_id) is not None
    return outcome.study_id
