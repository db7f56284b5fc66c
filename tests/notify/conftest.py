"""Fixtures for the adapter tests: a study summary and local receivers that stop by themselves."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support.notify import BASE, HTTPReceiver, MLLPListener, Responder, SummaryFactory

from ddn_node.notify import StudySummary


@pytest.fixture
def make_summary() -> SummaryFactory:
    def factory(**overrides: Any) -> StudySummary:
        return StudySummary(**{**BASE, **overrides})

    return factory


@pytest.fixture
def mllp_listener() -> Iterator[Callable[[Responder], MLLPListener]]:
    started: list[MLLPListener] = []

    def factory(respond: Responder) -> MLLPListener:
        listener = MLLPListener(respond)
        started.append(listener)
        return listener

    yield factory
    for listener in started:
        listener.stop()


@pytest.fixture
def http_receiver() -> Iterator[Callable[..., HTTPReceiver]]:
    started: list[HTTPReceiver] = []

    def factory(**kwargs: Any) -> HTTPReceiver:
        receiver = HTTPReceiver(**kwargs)
        started.append(receiver)
        return receiver

    yield factory
    for receiver in started:
        receiver.stop()
