"""Fixtures of the result-builder tests: the external validators of
``tests/support/validators.py``, each skipping the test with the reason when its tool is
absent (see that module for what each tool checks and how its output is read)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from support import validators as V


def _tool(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    V.require(name)
    return function


@pytest.fixture(scope="session")
def dciodvfy() -> Callable[..., V.Report[V.IODMessage]]:
    return _tool("dciodvfy", V.dciodvfy)


@pytest.fixture(scope="session")
def dcentvfy() -> Callable[..., V.Report[V.EntityMessage]]:
    return _tool("dcentvfy", V.dcentvfy)


@pytest.fixture(scope="session")
def dsrdump() -> Callable[..., str]:
    return _tool("dsrdump", V.dsrdump)


@pytest.fixture(scope="session")
def dsr2html() -> Callable[..., str]:
    return _tool("dsr2html", V.dsr2html)


@pytest.fixture(scope="session")
def pixelmed_sr() -> Callable[..., V.Report[V.SRMessage]]:
    return _tool("pixelmed", V.pixelmed_sr)
