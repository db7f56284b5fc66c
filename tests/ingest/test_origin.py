"""Results that come back with a study never start an analysis: the SCP tells source images
from the node's own results and from other algorithms' (dicom/origin.py), and only a new
source image that a routing rule selects re-opens a completed study.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select
from support.artifacts import make_test_artifact
from support.dicomgen import make_cr

from ddn_node.config import RoutingRule, Settings
from ddn_node.dicom.headers import header_from_dataset, read_header
from ddn_node.dicom.origin import classify
from ddn_node.dicom.results import build_results
from ddn_node.model.identity import manifest_device_uid
from ddn_node.pipeline.completion import CompletionTracker
from ddn_node.pipeline.routing import selects
from ddn_node.store.engine import make_database
from ddn_node.store.ingest import InstanceRecord, record_instance
from ddn_node.store.migrate import upgrade
from ddn_node.store.models import Instance, Job, Study, utcnow
from ddn_node.vocabulary import InstanceOrigin, StudyState

DX = "1.2.840.10008.5.1.4.1.1.1.1"


def _header(**attrs: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = DX
    ds.Modality = "DX"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _contributor(device_uid: str = "", purpose: tuple[str, str] | None = None) -> Dataset:
    item = Dataset()
    item.Manufacturer = "someone"
    if device_uid:
        item.DeviceUID = device_uid
    if purpose is not None:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = purpose[0], purpose[1], "x"
        item.PurposeOfReferenceCodeSequence = [code]
    return item


@pytest.mark.parametrize(
    ("attrs", "origin"),
    [
        ({}, InstanceOrigin.SOURCE),
        (
            {"ImageType": ["DERIVED", "PRIMARY"]},
            InstanceOrigin.SOURCE,
        ),  # processed for presentation
        ({"ManufacturerModelName": "ddn-node"}, InstanceOrigin.OWN),
        ({"ContributingEquipmentSequence": [_contributor("2.25.42")]}, InstanceOrigin.OWN),
        ({"ContributingEquipmentSequence": [_contributor("2.25.7")]}, InstanceOrigin.SOURCE),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.34"}, InstanceOrigin.OTHER),  # 3D SR
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.59"}, InstanceOrigin.OTHER),  # key objects
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.66.4"}, InstanceOrigin.OTHER),  # segmentation
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.30"}, InstanceOrigin.OTHER),  # parametric map
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.11.1"}, InstanceOrigin.OTHER),  # GSPS
        ({"ImageType": ["DERIVED", "SECONDARY"]}, InstanceOrigin.OTHER),
        (
            # A digitised film converted at a workstation is still a source image (the
            # public chest X-ray sets are such captures); a capture of results says
            # DERIVED\SECONDARY or names its processing equipment.
            {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "ConversionType": "WSD"},
            InstanceOrigin.SOURCE,
        ),
        (
            {
                "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7",
                "ConversionType": "WSD",
                "ImageType": ["DERIVED", "SECONDARY"],
            },
            InstanceOrigin.OTHER,
        ),
        (
            {"ContributingEquipmentSequence": [_contributor(purpose=("Newcode1", "99IHE"))]},
            InstanceOrigin.OTHER,
        ),
        (
            {"ContributingEquipmentSequence": [_contributor(purpose=("109102", "DCM"))]},
            InstanceOrigin.OTHER,
        ),
    ],
)
def test_classify(attrs: dict[str, object], origin: InstanceOrigin) -> None:
    assert classify(header_from_dataset(_header(**attrs)), own_device_uids={"2.25.42"}) is origin


def test_the_nodes_own_objects_are_recognised_from_their_files(tmp_path: Path) -> None:
    """Every object the node builds, as the PACS would send it back: read from the file by
    the SCP's own header reader, with the model's Device UID taken from its manifest."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dicom_results"))
    from results_factories import display_for, prediction_for, synthetic_source

    source = synthetic_source()
    results = build_results(
        [source],
        prediction_for([source], [{"Pneumothorax": 0.9, "Effusion": 0.6, "Nodule": 0.1}]),
        "STAT",
        display_for([source]),
        uid_seed="origin",
    )
    model = make_test_artifact(tmp_path / "model")
    devices = {manifest_device_uid(model) or ""}
    assert results.parametric_maps and results.overlays
    for kind, ds in results.all():
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert classify(read_header(path), devices) is InstanceOrigin.OWN, kind
    source_path = tmp_path / "source.dcm"
    make_cr("1.2.3.4", size=32, seed=1).save_as(source_path, enforce_file_format=True)
    assert classify(read_header(source_path), devices) is InstanceOrigin.SOURCE


def _record(ds: Dataset, origin: InstanceOrigin, view: str = "PA") -> InstanceRecord:
    return InstanceRecord(
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"x/{ds.SOPInstanceUID}.dcm",
        size=1,
        sha256=str(ds.SOPInstanceUID)[-16:],
        modality="CR",
        body_part="CHEST",
        view_position=view,
        origin=origin,
    )


def test_only_a_selected_source_image_reopens_a_completed_study(
    tmp_path: Path, db_url: str
) -> None:
    settings = Settings.model_validate(
        {
            "routing": [
                {
                    "name": "cxr",
                    "model": str(tmp_path),
                    "head": "cxr",
                    "modalities": ["CR"],
                    "views": ["PA", "AP"],
                }
            ]
        }
    )
    rules: list[RoutingRule] = settings.routing
    database = make_database(db_url)
    upgrade(database)
    try:
        first = make_cr("1.2.826.0.1.3680043.10.1.77", size=16, seed=1)
        then = utcnow() - dt.timedelta(seconds=60)

        def store(ds: Dataset, origin: InstanceOrigin, view: str = "PA") -> bool:
            record = _record(ds, origin, view)
            return record_instance(
                database,
                record,
                quiet_period_s=1,
                force_complete_s=60,
                now=then,
                may_reopen=selects(rules, record),
            ).reopened

        assert not store(first, InstanceOrigin.SOURCE)
        done = CompletionTracker(settings, database).sweep()
        assert [d.generation for d in done] == [1]

        result = make_cr(str(first.StudyInstanceUID), size=16, seed=2)
        assert not store(result, InstanceOrigin.OWN)  # the node's SR coming back
        other = make_cr(str(first.StudyInstanceUID), size=16, seed=3)
        assert not store(other, InstanceOrigin.OTHER)  # another AI's object
        lateral = make_cr(str(first.StudyInstanceUID), size=16, seed=4)
        assert not store(lateral, InstanceOrigin.SOURCE, view="LL")  # no rule scores a lateral
        with database.read() as s:
            study = s.scalars(select(Study)).one()
            assert study.state == StudyState.QUEUED and study.generation == 1
            assert len(s.scalars(select(Job)).all()) == 1
            origins = sorted(i.origin for i in s.scalars(select(Instance)))
            assert origins == ["other", "own", "source", "source"]

        late = make_cr(str(first.StudyInstanceUID), size=16, seed=5)
        assert store(late, InstanceOrigin.SOURCE)  # a new frontal image: analysed again
        with database.read() as s:
            assert s.scalars(select(Study)).one().state == StudyState.RECEIVING
    finally:
        database.dispose()


def test_results_are_never_routed(tmp_path: Path, sqlite_url: str) -> None:
    """A study whose only instances are results (say, an SR sent before its images) is
    listed, not analysed."""
    database = make_database(sqlite_url)
    upgrade(database)
    settings = Settings.model_validate(
        {"routing": [{"name": "cxr", "model": str(tmp_path), "head": "cxr", "modalities": ["CR"]}]}
    )
    try:
        ds = make_cr("1.2.826.0.1.3680043.10.1.78", size=16, seed=1)
        record_instance(
            database,
            _record(ds, InstanceOrigin.OTHER),
            quiet_period_s=1,
            force_complete_s=60,
            now=utcnow() - dt.timedelta(seconds=60),
        )
        (done,) = CompletionTracker(settings, database).sweep()
        assert done.routed_to is None
        with database.read() as s:
            assert s.scalars(select(Study)).one().state == StudyState.NOT_ROUTED
    finally:
        database.dispose()
