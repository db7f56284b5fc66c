"""Fixtures of the result-builder tests: the external validators, skipped when absent."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from results_factories import dciodvfy


@pytest.fixture(scope="session")
def dicom3tools() -> Callable[[Path], tuple[list[str], list[str]]]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    return dciodvfy


@pytest.fixture(scope="session")
def dsrdump() -> Callable[[Path], str]:
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (DCMTK) is not installed")

    def run(path: Path) -> str:
        out = subprocess.run(
            ["dsrdump", "-Ph", str(path)], capture_output=True, timeout=60, check=False
        )
        assert out.returncode == 0, out.stderr.decode("latin-1")
        return out.stdout.decode("latin-1")

    return run
