"""Hostile-input tests: the helpers beside this file (hostile_gen, hostile_oracle) are
imported by name, as pytest puts this directory on sys.path."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

# pylibjpeg-rle reports a Rust panic (caught and typed by pixels.py) on stderr, with a
# 100-line backtrace when RUST_BACKTRACE is set; the message alone is enough.
os.environ["RUST_BACKTRACE"] = "0"


@pytest.fixture(autouse=True)
def _quiet_pydicom() -> Iterator[None]:
    """pydicom logs a warning for nearly every mutated file; thousands of them would bury
    a failure report. Its errors still show."""
    logger = logging.getLogger("pydicom")
    before = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(before)
