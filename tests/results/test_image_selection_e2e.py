"""Which images a head scores, and how the study's score follows from them, through the
worker (in process, as the SCP records instances, on both databases) with real files.

- A real MR series (NEMA WG04 MR4: the original slice and its lossless and lossy JPEG 2000
  encodings, as the files come) with a real DERIVED\\SECONDARY slice of the same patient
  moved into the study: the secondary one is not scored, the three others are.
- The bundled brain_mri head's normal class (notumor) is above its threshold on these
  slices, and heat maps are asked for every label: notumor is still never "Present", has
  no heat map, and the study score is the most abnormal slice's 1 - P(notumor).
- A multi-frame Enhanced MR: the data set's only multi-frame object (Orthanc's
  Issue22-NoPixelData) is a real 24-frame header without pixel data, so its header carries
  four real MR slices as frames here, of which a rule with ``max_images = 3`` scores
  frames 1, 3 and 4 (spread evenly).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
import structlog
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from support.sr_reader import read_sr

from ddn_node.config import Settings
from ddn_node.dicom.headers import read_header
from ddn_node.dicom.pixels import load_display_image
from ddn_node.dicom.scp import _record_of
from ddn_node.dicom.spool import Spool
from ddn_node.model.artifact import ModelArtifact
from ddn_node.model.inference import Predictor
from ddn_node.pipeline.completion import CompletionTracker
from ddn_node.pipeline.registry import ModelRegistry
from ddn_node.pipeline.worker import Worker
from ddn_node.store.engine import Database, make_database
from ddn_node.store.ingest import record_instance
from ddn_node.store.migrate import upgrade
from ddn_node.store.models import Delivery, DriftObservation, Job, Result, utcnow
from ddn_node.vocabulary import InstanceOrigin

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "ddn-cxr"
WG04 = "dicom/mri_brain_wg04"
MR4_SERIES = ["wg04__MR4_UNC.dcm", "wg04__MR4_J2KR.dcm", "wg04__MR4_J2KI.dcm"]
MR4_SECONDARY = "wg04__MR4_RLE.dcm"  # DERIVED\SECONDARY\OTHER\R\IR, another study UID
ENHANCED_MR = "dicom/edge_cases/orthanc__Issue22-NoPixelData.dcm"


@dataclass
class _Node:
    settings: Settings
    database: Database
    spool: Spool

    def store(self, ds: Dataset, calling: str = "MRSCANNER") -> None:
        """One instance stored and recorded as the SCP does (its indexed header, its row)."""
        tmp = self.spool.incoming / "x.part"
        ds.save_as(tmp, enforce_file_format=True)
        uid = str(ds.SOPInstanceUID)
        stored = self.spool.commit(tmp, self.spool.instance_relpath(str(ds.StudyInstanceUID), uid))
        request = SimpleNamespace(AffectedSOPInstanceUID=uid, AffectedSOPClassUID=ds.SOPClassUID)
        record = _record_of(
            read_header(self.spool.path(stored.relpath)),
            request,  # type: ignore[arg-type]
            stored,
            calling,
            str(ds.file_meta.TransferSyntaxUID),
            InstanceOrigin.SOURCE,
        )
        record_instance(
            self.database,
            record,
            quiet_period_s=0,
            force_complete_s=60,
            now=utcnow() - dt.timedelta(seconds=2),  # its quiet period is over
        )

    def analyse(self, study_uid: str) -> tuple[list[dict[str, Any]], Result, Any]:
        """Complete the study, run the worker until it is idle; the worker's log, the
        result row and the SR it queued."""
        with self.database.read() as s:
            from ddn_node.store.models import Study

            study_id = s.scalars(select(Study.id).where(Study.study_uid == study_uid)).one()
        assert CompletionTracker(self.settings, self.database).complete(study_id) is not None
        worker = Worker(
            self.settings, self.database, self.spool, ModelRegistry(self.settings), owner="t"
        )
        with structlog.testing.capture_logs() as logs:
            while worker.run_once():
                pass
        with self.database.read() as s:
            job = s.scalars(select(Job)).one()
            assert job.state == "done", job.last_error
            result = s.scalars(select(Result)).one()
            s.expunge(result)
            sr_row = s.scalars(select(Delivery).where(Delivery.kind == "sr")).first()
            assert sr_row is not None
            sr = pydicom.dcmread(self.spool.path(sr_row.path))
        return logs, result, sr


def _settings(tmp_path: Path, db_url: str, **rule: Any) -> Settings:
    return Settings.model_validate(
        {
            "node": {"spool_dir": str(tmp_path / "spool")},
            "database": {"url": db_url},
            # Maps for every label: a normal class must still get none.
            "worker": {"torch_threads": 1, "heat_maps": "all"},
            "delivery": {"backoff_initial_s": 3600},
            "routing": [
                {
                    "name": "brain-mri",
                    "model": str(MODEL),
                    "head": "brain_mri",
                    "modalities": ["MR"],
                    **rule,
                }
            ],
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
            ],
        }
    )


@pytest.fixture
def make(tmp_path: Path, db_url: str, shared_data: Path) -> Iterator[Any]:
    if not (MODEL / "manifest.json").is_file():
        pytest.skip("the bundled model models/ddn-cxr is not there")
    made: list[Database] = []

    def factory(**rule: Any) -> _Node:
        settings = _settings(tmp_path, db_url, **rule)
        database = make_database(db_url)
        upgrade(database)
        made.append(database)
        spool = Spool(settings.node.spool_dir)
        spool.prepare()
        return _Node(settings, database, spool)

    yield factory
    for database in made:
        database.dispose()


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(ModelArtifact.load(MODEL), threads=1)


def _expected(predictor: Predictor, images: Sequence[np.ndarray]) -> dict[str, Any]:
    """What the study must say, from the model's own per-image output: findings by their
    maximum, notumor by its minimum, the score by the most abnormal image."""
    per_image = [p.probabilities for p in predictor.predict(images, "brain_mri", heatmaps=False)]
    study = {k: max(p[k] for p in per_image) for k in per_image[0]}
    study["notumor"] = min(p["notumor"] for p in per_image)
    return {
        "per_image": per_image,
        "study": study,
        "score": max(1 - p["notumor"] for p in per_image),
    }


def _selected(logs: list[dict[str, Any]]) -> list[str]:
    (event,) = [e for e in logs if e["event"] == "worker.images_selected"]
    return list(event["images"])


def _assert_normal_class_is_no_finding(result: Result, sr: Any, threshold: float) -> None:
    assert result.probabilities["notumor"] >= threshold  # the old code said "Present"
    assert "notumor" not in (result.positive or [])
    content = read_sr(sr)
    assert "notumor" not in content.positive
    assert all(not f.regions for name, f in content.findings.items() if name == "notumor")
    assert not any("notumor" in c and "heat map" in c for c in content.comments)


def test_real_mr_series_scores_primary_slices_and_the_most_abnormal_decides(
    make: Any, shared_data: Path, predictor: Predictor
) -> None:
    node = make()
    series = [pydicom.dcmread(shared_data / WG04 / name) for name in MR4_SERIES]
    secondary = pydicom.dcmread(shared_data / WG04 / MR4_SECONDARY)
    # The same patient's secondary capture of the slice, filed under the series' study.
    secondary.StudyInstanceUID = series[0].StudyInstanceUID
    for ds in [*series, secondary]:
        node.store(ds)

    logs, result, sr = node.analyse(str(series[0].StudyInstanceUID))

    # Which images: the series' three primary slices, not the secondary one.
    assert sorted(_selected(logs)) == sorted(str(ds.SOPInstanceUID) for ds in series)
    assert set(read_sr(sr).library) == {str(ds.SOPInstanceUID) for ds in series}

    want = _expected(predictor, [load_display_image(shared_data / WG04 / n) for n in MR4_SERIES])
    for label, p in want["study"].items():
        assert result.probabilities[label] == pytest.approx(p, abs=1e-5), label
    # 1 - P(notumor) of the least normal slice; "1 - max P(notumor)" (the most normal
    # slice deciding, as before) is a different number on these slices.
    assert result.abnormality_score == pytest.approx(want["score"], abs=1e-5)
    most_normal = 1 - max(p["notumor"] for p in want["per_image"])
    assert abs(result.abnormality_score - most_normal) > 1e-3
    assert read_sr(sr).abnormality_score == pytest.approx(want["score"], abs=1e-3)
    notumor = next(s for s in predictor.artifact.labels("brain_mri") if s.name == "notumor")
    _assert_normal_class_is_no_finding(result, sr, notumor.threshold)

    # The drift monitor saw each scored slice once, with what the worker scored.
    with node.database.read() as s:
        seen = s.scalars(select(DriftObservation).order_by(DriftObservation.id)).all()
    assert len(seen) == len(series)
    assert {o.head for o in seen} == {"brain_mri"}
    assert sorted(round(o.score, 4) for o in seen) == sorted(
        round(1 - p["notumor"], 4) for p in want["per_image"]
    )
    assert all(o.size == 512 and 0 <= o.intensity_mean <= 1 for o in seen)


def _multiframe(shared_data: Path, frames: Sequence[np.ndarray]) -> Dataset:
    """The real Enhanced MR header (24 frames declared, no Pixel Data) with ``frames`` as
    its pixel data: 12-bit unsigned, as its header says, the functional groups cut to fit."""
    ds = pydicom.dcmread(shared_data / ENHANCED_MR)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.NumberOfFrames = len(frames)
    ds.PerFrameFunctionalGroupsSequence = ds.PerFrameFunctionalGroupsSequence[: len(frames)]
    stack = np.stack(
        [np.round(4095 * (f - f.min()) / max(1e-6, float(f.max() - f.min()))) for f in frames]
    ).astype(np.uint16)
    ds.Rows, ds.Columns = stack.shape[1:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.add_new(0x7FE00010, "OW", stack.tobytes())
    return ds


def test_every_frame_of_a_multiframe_object_counts_and_the_cap_spreads_them(
    make: Any, shared_data: Path, predictor: Predictor
) -> None:
    node = make(max_images=3)
    raw = [
        pydicom.dcmread(shared_data / WG04 / n).pixel_array.astype(np.float32)
        for n in ("wg04__MR4_UNC.dcm", "wg04__MR1_UNC.dcm", "wg04__MR4_J2KI.dcm")
    ]
    frames = [raw[0], raw[1], raw[2], raw[0][::-1].copy()]
    multi = _multiframe(shared_data, frames)
    node.store(multi)

    logs, result, sr = node.analyse(str(multi.StudyInstanceUID))

    uid = str(multi.SOPInstanceUID)
    # Four frames, a cap of three: the first, the last and one between.
    assert _selected(logs) == [f"{uid}#1", f"{uid}#3", f"{uid}#4"]

    decoded = [load_display_image(multi, f) for f in (0, 2, 3)]
    want = _expected(predictor, decoded)
    for label, p in want["study"].items():
        assert result.probabilities[label] == pytest.approx(p, abs=1e-5), label
    assert result.abnormality_score == pytest.approx(want["score"], abs=1e-5)
    # Frame 2 (another slice, not scored) would have changed the study.
    with_frame_2 = _expected(predictor, [*decoded, load_display_image(multi, 1)])
    assert with_frame_2["study"] != pytest.approx(want["study"], abs=1e-5)

    content = read_sr(sr)
    assert content.library == (uid,)
    notumor = next(s for s in predictor.artifact.labels("brain_mri") if s.name == "notumor")
    if result.probabilities["notumor"] >= notumor.threshold:
        _assert_normal_class_is_no_finding(result, sr, notumor.threshold)
    assert "notumor" not in (result.positive or [])
