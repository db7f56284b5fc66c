"""Synthetic instances and raw senders for tests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
)

from ddn_node.dicom.headers import dataset_offset


def make_cr(
    study_uid: str,
    *,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    size: int = 64,
    seed: int = 0,
    patient_name: str = "TEST^PATIENT",
    patient_id: str = "PID-TEST-1",
    accession: str = "ACC-TEST-1",
    view: str = "PA",
    modality: str = "CR",
    body_part: str = "CHEST",
) -> Dataset:
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = (
        ComputedRadiographyImageStorage
        if modality == "CR"
        else DigitalXRayImageStorageForPresentation
    )
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.AccessionNumber = accession
    ds.StudyDate = "20261127"
    ds.StudyTime = "101500"
    ds.StudyDescription = "CHEST TEST"
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    return ds


def to_file_bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dataset_sha256(path: Path) -> str:
    """sha256 of the data set part of a Part 10 file (what goes on the wire)."""
    data = path.read_bytes()
    return hashlib.sha256(data[dataset_offset(path) :]).hexdigest()


@contextmanager
def raw_association(
    port: int,
    calling: str = "TESTSCU",
    called: str = "DDN_NODE",
    contexts: list[tuple[str, str]] | None = None,
    timeout: float = 30,
) -> Iterator[Association]:
    """An association whose C-STOREs send file bytes as they are (no decode / re-encode)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntax in contexts or [
        (ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    ]:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield assoc
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        if assoc.is_established:
            assoc.release()


def store_file(assoc: Association, path: Path) -> int | None:
    status = assoc.send_c_store(path)
    return int(status.Status) if "Status" in status else None
