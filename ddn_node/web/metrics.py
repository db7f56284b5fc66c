"""Prometheus metrics, computed from the database when Prometheus scrapes.

The SCP, the worker and the web part may run in separate processes (or hosts) sharing one
database, so in-process counters in the web process would only see the web process. The
collector below asks the database instead, which every role writes: the figures are the
same whichever process answers the scrape. A few aggregate queries per scrape, using the
existing indexes; they cost tens of milliseconds at 100,000 studies.

Counts of rows are exposed as gauges, not counters: retention purges rows, and a counter
that goes down would read as a process restart to ``rate()``.

The web process's own request latency is a plain in-process histogram (it is about this
process). Everything lives in a per-app registry on ``app.state``, never the global one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError

from ddn_node.pipeline.worklist import EFFECTIVE_PRIORITY, NOT_READ
from ddn_node.store.engine import Database
from ddn_node.store.models import Delivery, DriftState, Instance, Job, Result, Study, utcnow
from ddn_node.vocabulary import DeliveryState, JobState

log = structlog.get_logger("ddn_node.web")

LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _histogram(
    name: str, doc: str, row: Any, buckets: tuple[float, ...] = LATENCY_BUCKETS_S
) -> HistogramMetricFamily:
    # row = (count <= b for each bucket..., total count, sum of seconds)
    counts = [int(v or 0) for v in row[: len(buckets)]]
    total, total_sum = int(row[len(buckets)] or 0), float(row[len(buckets) + 1] or 0.0)
    pairs = [(repr(b), c) for b, c in zip(buckets, counts, strict=True)] + [("+Inf", total)]
    return HistogramMetricFamily(name, doc, buckets=pairs, sum_value=total_sum)


def _bucket_columns(seconds: Any, buckets: tuple[float, ...] = LATENCY_BUCKETS_S) -> list[Any]:
    return [
        *(func.sum(case((seconds <= b, 1), else_=0)) for b in buckets),
        func.count(seconds),
        func.sum(seconds),
    ]


class DatabaseCollector(Collector):
    def __init__(self, database: Database):
        self.database = database

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        try:
            metrics = list(self._collect())
        except SQLAlchemyError as exc:
            log.error("web.metrics_failed", error=repr(exc))
            up = GaugeMetricFamily("ddn_database_up", "1 when the database answered this scrape")
            up.add_metric([], 0)
            yield up
            return
        yield from metrics
        up = GaugeMetricFamily("ddn_database_up", "1 when the database answered this scrape")
        up.add_metric([], 1)
        yield up
        took = GaugeMetricFamily(
            "ddn_metrics_scrape_seconds", "time the database queries of this scrape took"
        )
        took.add_metric([], time.perf_counter() - started)
        yield took

    def _collect(self) -> Iterator[Metric]:
        now = utcnow()
        with self.database.read() as session:
            instances = session.execute(select(func.count()).select_from(Instance)).scalar_one()
            g = GaugeMetricFamily(
                "ddn_instances_received", "DICOM instances received and kept (retention lowers it)"
            )
            g.add_metric([], instances)
            yield g

            g = GaugeMetricFamily("ddn_studies", "studies by state", labels=["state"])
            for state, n in session.execute(
                select(Study.state, func.count()).group_by(Study.state)
            ):
                g.add_metric([state], n)
            yield g

            g = GaugeMetricFamily(
                "ddn_studies_analysed",
                "analyses kept (one per study generation), by priority",
                labels=["priority"],
            )
            for priority, n in session.execute(
                select(Result.priority, func.count()).group_by(Result.priority)
            ):
                g.add_metric([priority], n)
            yield g

            g = GaugeMetricFamily(
                "ddn_queue_depth", "analysis jobs waiting or running", labels=["state"]
            )
            depth = dict(
                session.execute(
                    select(Job.state, func.count())
                    .where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
                    .group_by(Job.state)
                ).all()
            )
            for state in (JobState.QUEUED, JobState.RUNNING):
                g.add_metric([state.value], depth.get(state.value, 0))
            yield g

            model_s = Result.timings_ms["model_ms"].as_float() / 1000.0
            total_s = Result.timings_ms["total_ms"].as_float() / 1000.0
            row = session.execute(
                select(*_bucket_columns(model_s), *_bucket_columns(total_s))
            ).one()
            n = len(LATENCY_BUCKETS_S) + 2
            yield _histogram(
                "ddn_inference_seconds",
                "model time per study (forward + Grad-CAM), results.timings_ms.model_ms",
                row[:n],
            )
            yield _histogram(
                "ddn_analysis_seconds",
                "whole analysis per study (decode to results), timings_ms.total_ms",
                row[n:],
            )

            g = GaugeMetricFamily(
                "ddn_deliveries", "outgoing result objects by state", labels=["state"]
            )
            states = dict(
                session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
            )
            for state in DeliveryState:
                g.add_metric([state.value], states.get(state.value, 0))
            yield g
            failing = session.execute(
                select(func.count())
                .select_from(Delivery)
                .where(
                    Delivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING]),
                    Delivery.last_error != "",
                )
            ).scalar_one()
            g = GaugeMetricFamily(
                "ddn_delivery_failures",
                "deliveries that failed: given up (state failed) or failed and retrying with back-off",
                labels=["kind"],
            )
            g.add_metric(["given_up"], states.get(DeliveryState.FAILED.value, 0))
            g.add_metric(["retrying"], failing)
            yield g

            unread = GaugeMetricFamily(
                "ddn_worklist_unread",
                "studies not yet read, by effective priority",
                labels=["priority"],
            )
            oldest = GaugeMetricFamily(
                "ddn_worklist_oldest_unread_seconds",
                "how long the oldest unread study has waited",
                labels=["priority"],
            )
            for priority, n, first in session.execute(
                select(EFFECTIVE_PRIORITY, func.count(), func.min(Study.first_received_at))
                .where(NOT_READ)
                .group_by(EFFECTIVE_PRIORITY)
            ):
                unread.add_metric([priority], n)
                if first is not None:
                    # min() keeps the column type, so this is the UTC-aware datetime.
                    oldest.add_metric([priority], max(0.0, (now - first).total_seconds()))
            yield unread
            yield oldest

            yield from _drift_metrics(list(session.scalars(select(DriftState))))


def _drift_metrics(states: list[DriftState]) -> Iterator[Metric]:
    """The drift monitor's latest figures per model version, head and feature."""
    names = ["model", "version", "head", "feature"]
    psi = GaugeMetricFamily(
        "ddn_drift_psi", "population stability index against the validation set", labels=names
    )
    ks = GaugeMetricFamily(
        "ddn_drift_ks", "Kolmogorov-Smirnov statistic against the validation set", labels=names
    )
    alarm = GaugeMetricFamily(
        "ddn_drift_alarm", "1 while a feature is in drift alarm", labels=names
    )
    n = GaugeMetricFamily("ddn_drift_window_images", "images in the drift window", labels=names[:3])
    windows: dict[tuple[str, str, str], int] = {}
    for s in states:
        key = [s.model_name, s.model_version, s.head, s.feature]
        psi.add_metric(key, s.psi)
        if s.ks is not None:
            ks.add_metric(key, s.ks)
        alarm.add_metric(key, 1 if s.alarmed else 0)
        windows[(s.model_name, s.model_version, s.head)] = s.n
    for key3, images in windows.items():
        n.add_metric(list(key3), images)
    yield psi
    yield ks
    yield alarm
    yield n


class WebMetrics:
    """The registry behind ``GET /metrics`` for one app."""

    def __init__(self, database: Database):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DatabaseCollector(database))
        self.requests = Histogram(
            "ddn_web_request_seconds",
            "web requests handled by this process, by part",
            ["part"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
