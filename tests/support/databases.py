"""Throw-away databases for the tests: the same helper the benchmarks use."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ddn_node.bench.common import postgres_reachable
from ddn_node.bench.common import throwaway_database as _throwaway

__all__ = ["postgres_available", "throwaway_database"]


def postgres_available() -> bool:
    return postgres_reachable()


@contextmanager
def throwaway_database(kind: str, tmp: Path) -> Iterator[str]:
    with _throwaway(kind, tmp, prefix="ddn_test") as url:
        yield url
