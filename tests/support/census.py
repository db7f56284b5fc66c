"""The decode census: for every transfer syntax the node offers, its real files in
../shared/data/dicom and whether the node's own pixel pipeline decodes each.

Offered syntaxes with no real file get a sample made here by an encoder that is not the
decoder under test, from a real uncompressed image: DCMTK ``dcmcjpeg`` for JPEG lossless
process 14 (4.57), OpenJPH ``ojph_compress`` for High-Throughput JPEG 2000 (decoded by
OpenJPEG through pylibjpeg). Used by tests/model/test_decode_census.py and printed by
tests/model/decode_census.py.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from ddn_node.dicom import isolated
from ddn_node.dicom.pixels import NoPixelData, PixelDataError, load_display_image
from ddn_node.dicom.syntaxes import supported_transfer_syntaxes

# A real uncompressed image the samples are made from: WG04 MR1, 512x512, 16-bit signed
# (values 0..4000), the same slice as the real MR1 files of every other syntax.
SOURCE = "mri_brain_wg04/wg04__MR1_UNC.dcm"

JPEG_LOSSLESS_14 = "1.2.840.10008.1.2.4.57"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K = "1.2.840.10008.1.2.4.203"
# The lossy HTJ2K sample's quantisation step: about 2 grey levels of 4000 mean error.
HTJ2K_QSTEP = "0.0001"


@dataclass
class Sample:
    path: Path
    produced_by: str = ""  # empty for a real file; else the encoder that made it
    source: Path | None = None  # the uncompressed image a produced sample was made from
    error: str = ""  # why the node could not decode it ("" when it did)
    error_type: type[Exception] | None = None


@dataclass
class Row:
    syntax: str
    offered: bool
    samples: list[Sample] = field(default_factory=list)

    @property
    def real(self) -> list[Sample]:
        return [s for s in self.samples if not s.produced_by]

    @property
    def produced(self) -> list[Sample]:
        return [s for s in self.samples if s.produced_by]

    @property
    def decoded(self) -> int:
        return sum(1 for s in self.samples if not s.error)


def real_files(dicom_dir: Path) -> dict[str, list[Path]]:
    """Real files with Pixel Data, by the transfer syntax of their file meta."""
    out: dict[str, list[Path]] = {}
    for path in sorted(dicom_dir.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=False)
        except Exception:  # noqa: BLE001 - an unreadable file is not a sample of any syntax
            continue
        if "PixelData" not in ds:
            continue
        meta = getattr(ds, "file_meta", None)
        ts = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
        out.setdefault(ts or "(no file meta)", []).append(path)
    return out


def _wrap(source: pydicom.Dataset, syntax: str, frame: bytes, path: Path) -> Path:
    ds = source.copy()
    ds.file_meta = source.file_meta.copy()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def _dcmcjpeg_lossless(source: Path, out: Path) -> Path:
    path = out / "dcmcjpeg_process14.dcm"
    # +el: lossless process 14 with a predictor of the codec's choice, i.e. 4.57, not 4.70.
    subprocess.run(["dcmcjpeg", "+el", str(source), str(path)], check=True, capture_output=True)
    return path


def _ojph(source: Path, out: Path, name: str, options: list[str]) -> Path:
    ds = pydicom.dcmread(source)
    arr = ds.pixel_array
    raw, j2c = out / f"{name}.raw", out / f"{name}.j2c"
    signed = int(ds.PixelRepresentation) == 1
    arr.astype("<i2" if signed else "<u2").tofile(raw)
    subprocess.run(
        [
            "ojph_compress",
            "-i",
            str(raw),
            "-o",
            str(j2c),
            "-dims",
            f"{{{arr.shape[1]},{arr.shape[0]}}}",
            "-num_comps",
            "1",
            "-signed",
            "true" if signed else "false",
            "-bit_depth",
            str(int(ds.BitsStored)),
            "-downsamp",
            "{1,1}",
            *options,
        ],
        check=True,
        capture_output=True,
    )
    syntax = {"htj2k_lossless": HTJ2K_LOSSLESS, "htj2k_rpcl": HTJ2K_RPCL, "htj2k": HTJ2K}[name]
    return _wrap(ds, syntax, j2c.read_bytes(), out / f"ojph_{name}.dcm")


# syntax -> (encoder command that must be installed, how to make the sample)
PRODUCERS: dict[str, tuple[str, Callable[[Path, Path], Path]]] = {
    JPEG_LOSSLESS_14: ("dcmcjpeg", _dcmcjpeg_lossless),
    HTJ2K_LOSSLESS: (
        "ojph_compress",
        lambda s, o: _ojph(s, o, "htj2k_lossless", ["-reversible", "true", "-prog_order", "LRCP"]),
    ),
    HTJ2K_RPCL: (
        "ojph_compress",
        # OpenJPH 0.9 writes no TLM marker; the RPCL progression is what a decoder meets.
        lambda s, o: _ojph(s, o, "htj2k_rpcl", ["-reversible", "true", "-prog_order", "RPCL"]),
    ),
    HTJ2K: ("ojph_compress", lambda s, o: _ojph(s, o, "htj2k", ["-qstep", HTJ2K_QSTEP])),
}


def produce(syntax: str, dicom_dir: Path, out: Path) -> Sample:
    """A sample of ``syntax`` made from :data:`SOURCE`; raises when its encoder is missing."""
    tool, make = PRODUCERS[syntax]
    if shutil.which(tool) is None:
        raise FileNotFoundError(f"{tool} not installed (deploy/bootstrap.sh installs it)")
    source = dicom_dir / SOURCE
    path = make(source, out)
    assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    return Sample(path, produced_by=tool, source=source)


def _decode(sample: Sample) -> Sample:
    try:
        load_display_image(sample.path)
    except NoPixelData as e:  # pragma: no cover - real_files keeps only files with pixels
        sample.error, sample.error_type = str(e), type(e)
    except PixelDataError as e:
        sample.error, sample.error_type = str(e)[:300], type(e)
    return sample


@contextmanager
def in_process_only() -> Iterator[None]:
    """The node as it was before the isolated decoder: no out-of-process fallback (what
    it offers is taken first: it offered 4.51 then as well)."""
    supported_transfer_syntaxes()
    saved = dict(isolated.COMMANDS)
    isolated.COMMANDS.clear()
    try:
        yield
    finally:
        isolated.COMMANDS.update(saved)


def census(dicom_dir: Path, work: Path) -> list[Row]:
    """One row per offered syntax (then per syntax of a real file that is not offered)."""
    offered = list(supported_transfer_syntaxes())
    files = real_files(dicom_dir)
    rows = []
    for syntax in offered + sorted(set(files) - set(offered)):
        row = Row(syntax, syntax in offered, [Sample(p) for p in files.get(syntax, [])])
        if row.offered and not row.samples and syntax in PRODUCERS:
            row.samples.append(produce(syntax, dicom_dir, work))
        for sample in row.samples:
            _decode(sample)
        rows.append(row)
    return rows


def table(rows: list[Row], before: list[Row] | None = None) -> str:
    """The census as a Markdown table."""
    prev = {r.syntax: r for r in before or []}
    head = "| syntax | name | offered | real files | produced | decoded before | decoded now |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        name = UID(r.syntax).name if r.syntax.startswith("1.") else r.syntax
        produced = ", ".join(s.produced_by for s in r.produced) or "-"
        was = prev.get(r.syntax)
        total = len(r.samples)
        lines.append(
            f"| {r.syntax} | {name} | {'yes' if r.offered else 'no'} | {len(r.real)} | "
            f"{produced} | {f'{was.decoded}/{len(was.samples)}' if was else '-'} | "
            f"{r.decoded}/{total} |"
        )
    return "\n".join(lines)


def raw_pixels(path: Path) -> np.ndarray:
    """The stored values as pydicom's in-process decoders give them (no display pipeline)."""
    return np.asarray(pydicom.dcmread(path).pixel_array)
