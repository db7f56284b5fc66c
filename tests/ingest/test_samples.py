"""The shipped sample studies are what the generator makes, and are valid DICOM."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pydicom
import pytest

from ddn_node.dicom.samples import write_samples


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.dcm"))
    }


def test_generator_reproduces_the_shipped_samples(tmp_path: Path, repo_root: Path) -> None:
    write_samples(tmp_path)
    assert _digest(tmp_path) == _digest(repo_root / "sample_studies")


def test_samples_cover_what_the_demo_needs(repo_root: Path) -> None:
    datasets = [pydicom.dcmread(p) for p in sorted((repo_root / "sample_studies").rglob("*.dcm"))]
    photometric = {d.PhotometricInterpretation for d in datasets}
    syntaxes = {d.file_meta.TransferSyntaxUID.name for d in datasets}
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    assert {d.Modality for d in datasets} == {"CR", "DX"}
    assert {d.BitsStored for d in datasets} == {12}
    assert "JPEG 2000 Image Compression (Lossless Only)" in syntaxes
    by_study: dict[str, set[str]] = {}
    for d in datasets:
        by_study.setdefault(d.StudyInstanceUID, set()).add(d.ViewPosition)
    assert {"PA", "LL"} in by_study.values()


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).resolve().parents[2] / "sample_studies").rglob("*.dcm")),
    ids=lambda p: p.name,
)
def test_dciodvfy_finds_no_errors(path: Path) -> None:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [
        line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")
    ]
    assert errors == []


def test_send_cli_with_progress(make_node, sqlite_url: str, repo_root: Path) -> None:
    node = make_node(sqlite_url)
    with node:
        import subprocess as sp
        import sys

        result = sp.run(
            [
                sys.executable,
                "-m",
                "ddn_node",
                "send",
                str(repo_root / "sample_studies"),
                "--to",
                f"127.0.0.1:{node.port}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=repo_root,
        )
    assert result.returncode == 0, result.stderr
    assert "5 stored, 0 not stored" in result.stderr
    assert "100%" in result.stderr  # the progress bar ran to the end
