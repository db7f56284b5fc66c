"""Small synthetic chest radiograph studies for demos and tests (``ddn-node sample-studies``).

The images are procedurally drawn phantoms (body outline, lung fields, heart, spine, ribs,
sometimes a nodule-like blob), not patient data, so the repository can ship them. Headers
are realistic: CR and DX, MONOCHROME1 and MONOCHROME2, 12 bits stored, VOI window, PA, AP
and lateral views, one JPEG 2000 lossless study, a two-image PA + lateral study. UIDs and
pixels are derived from fixed seeds, so running the generator again gives the same files.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")


@dataclass(frozen=True)
class SampleImage:
    view: str  # PA, AP, LL
    nodule: bool = False


@dataclass(frozen=True)
class SampleStudy:
    key: str
    patient_name: str
    patient_id: str
    sex: str
    birth_date: str
    modality: str  # CR or DX
    photometric: str
    compressed: bool
    images: tuple[SampleImage, ...]
    description: str


SAMPLE_STUDIES: tuple[SampleStudy, ...] = (
    SampleStudy(
        "demo01",
        "DEMO^ALPHA",
        "DEMO0001",
        "F",
        "19580312",
        "CR",
        "MONOCHROME1",
        False,
        (SampleImage("PA", nodule=True),),
        "CHEST PA",
    ),
    SampleStudy(
        "demo02",
        "DEMO^BRAVO",
        "DEMO0002",
        "M",
        "19711105",
        "DX",
        "MONOCHROME2",
        False,
        (SampleImage("PA"), SampleImage("LL")),
        "CHEST PA AND LATERAL",
    ),
    SampleStudy(
        "demo03",
        "DEMO^CHARLIE",
        "DEMO0003",
        "M",
        "19490122",
        "DX",
        "MONOCHROME2",
        True,
        (SampleImage("AP", nodule=True),),
        "CHEST AP PORTABLE",
    ),
    SampleStudy(
        "demo04",
        "DEMO^DELTA",
        "DEMO0004",
        "F",
        "19890630",
        "CR",
        "MONOCHROME2",
        False,
        (SampleImage("PA"),),
        "CHEST PA",
    ),
)


def _uid(*parts: str) -> UID:
    return generate_uid(entropy_srcs=["ddn-node-samples", *parts])


def phantom(size: int, seed: int, view: str, nodule: bool) -> np.ndarray:
    """A chest-like attenuation map in [0, 1] (1 = dense), ``size`` x ``size``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.zeros((size, size), np.float32)
    lateral = view in ("LL", "RL", "LATERAL")
    body = ((x - 0.5) / (0.33 if lateral else 0.44)) ** 2 + ((y - 0.55) / 0.5) ** 2 < 1
    img[body] = 0.55
    if lateral:
        lung = ((x - 0.5) / 0.22) ** 2 + ((y - 0.45) / 0.3) ** 2 < 1
        img[lung] = 0.25
        heart = ((x - 0.42) / 0.12) ** 2 + ((y - 0.6) / 0.13) ** 2 < 1
        img[heart] = 0.6
        spine = (x > 0.7) & (x < 0.8) & body
        img[spine] = 0.85
    else:
        for cx in (0.32, 0.68):
            lung = ((x - cx) / 0.15) ** 2 + ((y - 0.45) / 0.3) ** 2 < 1
            img[lung] = 0.2
        heart = ((x - 0.55) / 0.13) ** 2 + ((y - 0.62) / 0.12) ** 2 < 1
        img[heart] = 0.62
        spine = (np.abs(x - 0.5) < 0.035) & body
        img[spine] = np.maximum(img[spine], 0.8)
        for k in range(8):  # ribs: bright arcs across each lung
            yy = 0.2 + k * 0.075
            for side in (-1, 1):
                arc = np.abs(y - (yy + 0.06 * ((x - 0.5) * side * 2) ** 2)) < 0.008
                arc &= (np.abs(x - 0.5) > 0.05) & (np.abs(x - 0.5) < 0.42) & body
                img[arc] = np.maximum(img[arc], 0.5)
        clav = (np.abs(y - 0.17 - 0.1 * np.abs(x - 0.5)) < 0.01) & (np.abs(x - 0.5) < 0.3)
        img[clav] = 0.75
    if nodule:
        cx, cy, r = rng.uniform(0.28, 0.4), rng.uniform(0.35, 0.55), rng.uniform(0.025, 0.04)
        blob = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2)))
        img = np.maximum(img, 0.7 * blob * body)
    # Scatter blur and quantum noise, as a detector would record them.
    kernel = np.outer(*(2 * [np.hanning(9) / np.hanning(9).sum()]))
    padded = np.pad(img, 4, mode="edge")
    blurred = np.zeros_like(img)
    for dy in range(9):
        for dx in range(9):
            blurred += kernel[dy, dx] * padded[dy : dy + size, dx : dx + size]
    blurred += rng.normal(0, 0.012, blurred.shape).astype(np.float32)
    return np.clip(blurred, 0, 1)


def build_sample(study: SampleStudy, index: int, size: int = 512) -> list[Dataset]:  # noqa: PLR0915 - a template of attribute assignments
    """The datasets of one sample study (not yet written)."""
    study_uid = _uid(study.key, "study")
    when = dt.datetime(2026, 11, 2, 8, 30) + dt.timedelta(minutes=17 * index)
    sop_class = CR_STORAGE if study.modality == "CR" else DX_PRESENTATION_STORAGE
    out = []
    for number, image in enumerate(study.images, start=1):
        series_uid = _uid(study.key, "series", str(number))
        sop_uid = _uid(study.key, "image", str(number))
        density = phantom(size, seed=1000 * index + number, view=image.view, nodule=image.nodule)
        stored = np.round(density * 4095).astype(np.uint16)  # 12 bits stored
        if study.photometric == "MONOCHROME1":
            stored = (4095 - stored).astype(np.uint16)

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "DDN_SAMPLES"

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientName = study.patient_name
        ds.PatientID = study.patient_id
        ds.PatientBirthDate = study.birth_date
        ds.PatientSex = study.sex
        ds.AccessionNumber = f"ACC{index + 1:05d}"
        ds.StudyID = f"S{index + 1:04d}"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
        ds.StudyDescription = study.description
        ds.SeriesDescription = f"CHEST {image.view}"
        ds.ReferringPhysicianName = "REFERRER^DEMO"
        ds.Modality = study.modality
        ds.Manufacturer = "ddn-node sample generator"
        ds.InstitutionName = "Demo Hospital"
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = image.view
        ds.PatientOrientation = ["P", "F"] if image.view != "LL" else ["A", "F"]
        ds.SeriesNumber = number
        ds.InstanceNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = study.photometric
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelSpacing = ds.ImagerPixelSpacing = [0.7, 0.7]
        ds.WindowCenter = 2048
        ds.WindowWidth = 4096
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "INVERSE" if study.photometric == "MONOCHROME1" else "IDENTITY"
        if study.modality == "DX":
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.ImageLaterality = "U"
            ds.DetectorType = "SCINTILLATOR"
            ds.BurnedInAnnotation = "NO"
            ds.AnatomicRegionSequence = [_code("51185008", "SCT", "Thoracic structure")]
            ds.ViewCodeSequence = [
                _code(
                    {"PA": "399348003", "AP": "399182000", "LL": "399173006"}[image.view],
                    "SCT",
                    {"PA": "postero-anterior", "AP": "antero-posterior", "LL": "left lateral"}[
                        image.view
                    ],
                )
            ]
            ds.ViewCodeSequence[0].ViewModifierCodeSequence = []
            ds.DistanceSourceToDetector = 1800
            ds.KVP = 120
            ds.ExposureTime = 10
            ds.PatientOrientation = ["P", "F"] if image.view != "LL" else ["A", "F"]
            ds.AcquisitionDate = ds.StudyDate
            ds.AcquisitionTime = ds.StudyTime
            ds.PixelIntensityRelationship = "LIN"
            ds.PixelIntensityRelationshipSign = 1
            ds.LossyImageCompression = "00"
            ds.PositionerType = "NONE"
            ds.AcquisitionContextSequence = []
        ds.PixelData = stored.tobytes()
        if study.compressed:
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        out.append(ds)
    return out


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def write_samples(out_dir: Path, size: int = 512) -> list[Path]:
    """Write every sample study under ``out_dir/<key>/``; returns the files written."""
    written = []
    for index, study in enumerate(SAMPLE_STUDIES):
        folder = out_dir / study.key
        folder.mkdir(parents=True, exist_ok=True)
        for ds in build_sample(study, index, size):
            view = ds.ViewPosition
            path = folder / f"{study.key}_{view}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
    return written
