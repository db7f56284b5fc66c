"""``ddn-node bench volume``: how much the node sends back into the PACS, per study.

Real chest radiographs go through a real PACS: N public NIH ChestX-ray14 images (CC0, from
``../shared/data/nih/originals_1024``) wrapped as 12-bit DX studies of one image each, plus
the real chest CR files of ``../shared/data/dicom/chest_xray_real``, are uploaded to a local
Orthanc, which pushes them to the node; the node returns its results to Orthanc. Counted
in Orthanc afterwards, per study: the result objects (SR, Parametric Map, Secondary
Capture) and their bytes against the bytes the node received, for each heat-map policy
(``evidence``, the default, and ``all``, the most an operator can ask for).

Targets (issue 13): at most two result objects per analysed image plus one SR per study,
and result bytes at most 1.5x the bytes received. The figures measured before (the same
kind of run, 63 studies): 961 result objects, about 7 PM + 7 SC per radiograph, 17.5x.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from ddn_node.bench.common import (
    DX_STORAGE,
    Proc,
    ddn_node_cmd,
    free_port,
    header,
    median,
    port_open,
    wait_until,
)
from ddn_node.demo.orthanc import LocalOrthanc, orthanc_available
from ddn_node.store.engine import make_database
from ddn_node.store.models import Delivery, Study
from ddn_node.vocabulary import DeliveryState, StudyState

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("DDN_DATA", REPO.parent / "shared" / "data"))
RESULT_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",
    "1.2.840.10008.5.1.4.1.1.30": "pm",
    "1.2.840.10008.5.1.4.1.1.7": "sc",
}


@dataclass(frozen=True)
class Volume:
    policy: str
    studies: int
    images: int
    objects: Counter[str]
    objects_per_image_max: int  # PM + SC of the worst image
    ratios: list[float]  # result bytes / received bytes, per study


def nih_dx(png: Path, index: int) -> Dataset:
    """One NIH radiograph (8-bit PNG) as a 12-bit DX For Presentation study of one image."""
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 16  # 8 -> 12 bits
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = f"NIH^{png.stem}", f"NIH{index:04d}"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20261201", "120000", f"V{index:05d}"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PatientOrientation, ds.ImagerPixelSpacing = ["L", "F"], [0.143, 0.143]
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return ds


def inputs(folder: Path, n: int) -> list[Path]:
    """N wrapped NIH images and the real chest CR/DX files, written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, png in enumerate(sorted((DATA / "nih" / "originals_1024").glob("*.png"))[:n]):
        path = folder / f"nih-{i:03d}.dcm"
        nih_dx(png, i).save_as(path, enforce_file_format=True)
        out.append(path)
    for real in sorted((DATA / "dicom" / "chest_xray_real").glob("*.dcm")):
        ds = pydicom.dcmread(real, stop_before_pixels=True)
        if str(ds.get("Modality", "")) in ("CR", "DX"):
            out.append(real)
    return out


def _config(work: Path, port: int, pacs_port: int, model: Path, policy: str) -> Path:
    path = work / "node.toml"
    path.write_text(
        "demo = true\n"
        f'[node]\nport = {port}\nhost = "127.0.0.1"\nspool_dir = "{work / "spool"}"\ndisk_reserve_mb = 64\n'
        '[[peers]]\nae_title = "ORTHANC"\nhosts = ["127.0.0.1"]\nquiet_period_s = 1.0\n'
        f'[database]\nurl = "sqlite:///{work / "node.db"}"\n'
        "[completion]\nsweep_interval_s = 0.5\n"
        f'[worker]\npoll_interval_s = 0.2\nheat_maps = "{policy}"\n'
        f'[[routing]]\nname = "cxr"\nmodel = "{model}"\nhead = "cxr"\nmodalities = ["CR", "DX"]\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
        "[delivery]\nsweep_interval_s = 0.5\n[web]\nenabled = false\n"
        '[logging]\nlevel = "WARNING"\n'
    )
    return path


def _settled(db_url: str, studies: int) -> bool:
    """Every study analysed or failed, and nothing left to deliver."""
    db = make_database(db_url)
    try:
        with db.read() as s:
            done = s.scalar(
                select(func.count())
                .select_from(Study)
                .where(
                    Study.state.in_([StudyState.ANALYSED, StudyState.FAILED, StudyState.NOT_ROUTED])
                )
            )
            waiting = s.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING]))
            )
    finally:
        db.dispose()
    return (done or 0) >= studies and not waiting


def measure(files: list[Path], model: Path, policy: str, work: Path) -> Volume:
    """One run: every file through Orthanc and the node, results counted in Orthanc."""
    node_port = free_port()
    pacs = LocalOrthanc(work / "orthanc", free_port(), free_port(), node_port)
    pacs.start()
    config = _config(work, node_port, pacs.dicom_port, model.resolve(), policy)
    node = Proc([*ddn_node_cmd(), "serve", "--config", str(config)], work / "node.log").start()
    try:
        wait_until(lambda: port_open(node_port), 120, "the node")
        sources: dict[str, int] = {}
        study_ids = []
        for path in files:
            uploaded = pacs.upload(path)
            sources[uploaded["ID"]] = path.stat().st_size
            study_ids.append(uploaded["ParentStudy"])
        study_ids = sorted(set(study_ids))
        pacs.send_to_node(study_ids)
        db_url = f"sqlite:///{work / 'node.db'}"
        wait_until(
            lambda: _settled(db_url, len(study_ids)), 60 * 60, "every study analysed and delivered"
        )
        return _count(pacs, policy, study_ids, sources)
    finally:
        node.stop()
        pacs.stop()


def _count(
    pacs: LocalOrthanc, policy: str, study_ids: list[str], sources: dict[str, int]
) -> Volume:
    objects: Counter[str] = Counter()
    ratios: list[float] = []
    per_image: list[int] = []
    images = 0
    for study in study_ids:
        received = result_bytes = 0
        per_source: Counter[str] = Counter()
        for instance in pacs.study_instances(study):
            if instance["ID"] in sources:
                received += sources[instance["ID"]]
                images += 1
                continue
            tags = pacs.get(f"/instances/{instance['ID']}/simplified-tags")
            kind = RESULT_CLASSES.get(str(tags.get("SOPClassUID", "")), "other")
            objects[kind] += 1
            result_bytes += int(pacs.get(f"/instances/{instance['ID']}/attachments/dicom/size"))
            if kind in ("pm", "sc"):
                per_source[_source_of(tags)] += 1
        per_image.extend(per_source.values() or [0])
        ratios.append(result_bytes / max(1, received))
    return Volume(policy, len(study_ids), images, objects, max(per_image or [0]), ratios)


def _source_of(tags: dict[str, object]) -> str:
    for keyword in ("SourceImageSequence", "ReferencedImageSequence"):
        seq = tags.get(keyword)
        if isinstance(seq, list) and seq and isinstance(seq[0], dict):
            return str(seq[0].get("ReferencedSOPInstanceUID", ""))
    return "?"


def run(n_images: int = 60, model: Path = Path("models/ddn-cxr")) -> list[Volume]:
    header("result volume: objects and bytes returned per study", "ddn-node bench volume")
    if not orthanc_available():
        print("  (skipped: Orthanc not installed)")
        return []
    if not (DATA / "nih" / "originals_1024").is_dir() or not (model / "manifest.json").is_file():
        print(f"  (skipped: needs {DATA / 'nih' / 'originals_1024'} and a model at {model})")
        return []
    out = []
    with tempfile.TemporaryDirectory(prefix="ddn-bench-volume-") as tmp:
        files = inputs(Path(tmp) / "in", n_images)
        for policy in ("evidence", "all"):
            work = Path(tmp) / policy
            work.mkdir()
            out.append(measure(files, model, policy, work))
    _print(out)
    return out


def _print(volumes: list[Volume]) -> None:
    print(
        "before (issue 13, 63 studies): 961 result objects (15.3 per study), 17.5x the received bytes"
    )
    for v in volumes:
        per_study = sum(v.objects.values()) / max(1, v.studies)
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(v.objects.items()))
        print(
            f"heat_maps={v.policy:8} {v.studies} studies, {v.images} images: {sum(v.objects.values())} objects "
            f"({kinds}; {per_study:.2f} per study), at most {v.objects_per_image_max} PM+SC per image; "
            f"result/received bytes median {median(v.ratios):.2f}x, max {max(v.ratios or [0]):.2f}x"
            f" (targets: <= 2 per image + 1 SR, <= 1.5x)"
        )
