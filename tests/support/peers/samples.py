"""Tiny DICOM instances of the result SOP classes, for transport tests with peers.

These are *transport* fixtures: enough of the header for every peer to read the SOP class
and instance and for a store to succeed (patient / study / series identification, a
minimal SR content tree, a few pixels), not complete IODs. Conformance of the node's real
output is checked elsewhere (dciodvfy, DicomSRValidator).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
COMPUTED_RADIOGRAPHY = "1.2.840.10008.5.1.4.1.1.1"
DIGITAL_XRAY_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"

SR_CLASSES = {
    BASIC_TEXT_SR,
    ENHANCED_SR,
    COMPREHENSIVE_SR,
    COMPREHENSIVE_3D_SR,
    KEY_OBJECT_SELECTION,
}

KIND_TO_CLASS = {
    "sc": SECONDARY_CAPTURE,
    "basic-sr": BASIC_TEXT_SR,
    "enhanced-sr": ENHANCED_SR,
    "comprehensive-sr": COMPREHENSIVE_SR,
    "3d-sr": COMPREHENSIVE_3D_SR,
    "pm": PARAMETRIC_MAP,
}


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def make_instance(
    sop_class_uid: str, *, study_uid: str | None = None, sop_uid: str | None = None
) -> Dataset:
    """A small dataset of ``sop_class_uid`` (SC, any SR class, Parametric Map)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "PEER^TEST"
    ds.PatientID = "PEER-TEST-1"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = "20261201"
    ds.StudyTime = "120000"
    ds.ContentDate = "20261201"
    ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.Manufacturer = "ddn-node tests"

    if sop_class_uid in SR_CLASSES:
        ds.Modality = "KO" if sop_class_uid == KEY_OBJECT_SELECTION else "SR"
        ds.ValueType = "CONTAINER"
        ds.ContinuityOfContent = "SEPARATE"
        ds.CompletionFlag = "COMPLETE"
        ds.VerificationFlag = "UNVERIFIED"
        ds.ConceptNameCodeSequence = Sequence(
            [_code("126000", "DCM", "Imaging Measurement Report")]
        )
        text = Dataset()
        text.RelationshipType = "CONTAINS"
        text.ValueType = "TEXT"
        text.ConceptNameCodeSequence = Sequence([_code("121106", "DCM", "Comment")])
        text.TextValue = "peer harness test object"
        ds.ContentSequence = Sequence([text])
    elif sop_class_uid == PARAMETRIC_MAP:
        ds.Modality = "OT"
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = 8
        ds.NumberOfFrames = 1
        ds.BitsAllocated = 32
        ds.FloatPixelData = np.linspace(0.0, 1.0, 64, dtype=np.float32).tobytes()
    else:
        ds.Modality = "OT"
        ds.ConversionType = "WSD"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    return ds


def write_instance(
    sop_class_uid: str, folder: Path, name: str | None = None, **kwargs: str
) -> Path:
    """Write :func:`make_instance` to ``folder/name`` (default: a name from the SOP class)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = make_instance(sop_class_uid, **kwargs)
    path = folder / (name or f"{sop_class_uid}-{ds.SOPInstanceUID[-8:]}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path
