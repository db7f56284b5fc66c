"""Shared fixtures. Real data comes from ../shared/data (or $DDN_DATA); tests that need it
skip with a clear reason when it is absent, so the suite still passes elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DDN_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real test data (NIH images, real DICOM files)."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set DDN_DATA)")
    return SHARED_DATA
