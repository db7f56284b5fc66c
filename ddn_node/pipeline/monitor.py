"""How well the node works here: the model against the radiologists, triage against arrival.

``ddn-node monitor`` and ``/admin/monitor`` show what :func:`build_report` computes.

Performance, per model version and label, from the feedback (store/feedback.py). For each
result and label the latest verdict counts (a radiologist may change their mind; another
may correct them). The radiologist's answer is the truth: a reported finding agreed is a
true positive, disagreed a false positive; an absent label marked missed a false negative,
confirmed absent a true negative. Labels nobody gave a verdict on count for nothing.

* sensitivity TP / (TP + FN), PPV TP / (TP + FP): Wilson score intervals (95 %), which
  stay inside [0, 1] and mean something at the small counts a site starts with;
* AUC (Mann-Whitney, ties count half) where the label has both classes, with DeLong's
  variance (DeLong, DeLong & Clarke-Pearson 1988) for a normal 95 % interval, clipped to
  [0, 1]; deterministic (no resampling), and only given with two or more of each class;
* precision of STAT: of the results triage ranked STAT with a verdict on at least one of
  the critical findings (``[triage] critical_findings``), the share where the radiologist
  says one of them is present (Wilson interval).

Triage effect, from the worklist's own events: for each study that triage ranked
(STAT / HIGH: urgent; ROUTINE: routine) and that someone marked read, the time from its
arrival (first instance received) to its first *read*. The baseline is the same reading
moments handed out in arrival order: the k-th study to arrive is read at the k-th read
time. That is the wait each study would have had if the radiologists had read as many
studies at the same moments, oldest first. Every k-th read time is at or after the k-th
arrival (the k studies read by then had all arrived), so the baseline is a schedule that
could have happened; and the mean wait of all studies is the same in both (a reordering
moves wait from one study to another): the effect is the shift between the classes, read
from the medians. Studies not yet read are counted, not timed. Worklist events are
deleted with their study by retention, so this covers the studies still held.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import func, select

from ddn_node.store.engine import Database
from ddn_node.store.models import Feedback, FindingFeedback, Study, WorklistEvent
from ddn_node.vocabulary import Priority, ReadStatus, Verdict

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile
URGENT = (Priority.STAT, Priority.HIGH)


@dataclass(frozen=True)
class Proportion:
    k: int
    n: int
    value: float | None  # None when n == 0
    low: float | None
    high: float | None


def wilson(k: int, n: int, z: float = Z95) -> Proportion:
    """k of n with its Wilson score interval."""
    if n == 0:
        return Proportion(k, n, None, None, None)
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return Proportion(k, n, p, max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Auc:
    value: float
    low: float | None
    high: float | None
    positives: int
    negatives: int


def _psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def auc_delong(positives: Sequence[float], negatives: Sequence[float], z: float = Z95) -> Auc:
    """The AUC of scores of the two classes, with DeLong's 95 % interval (none for fewer
    than two of a class: its variance term is undefined)."""
    m, n = len(positives), len(negatives)
    if m == 0 or n == 0:
        raise ValueError("the AUC needs scores of both classes")
    # Structural components: per positive, the share of negatives it outranks; per
    # negative, the share of positives that outrank it. O(m n): feedback sets are small.
    v10 = [sum(_psi(x, y) for y in negatives) / n for x in positives]
    v01 = [sum(_psi(x, y) for x in positives) / m for y in negatives]
    value = sum(v10) / m
    if m < 2 or n < 2:
        return Auc(value, None, None, m, n)
    variance = statistics.variance(v10) / m + statistics.variance(v01) / n
    half = z * math.sqrt(variance)
    return Auc(value, max(0.0, value - half), min(1.0, value + half), m, n)


@dataclass(frozen=True)
class Scored:
    """One label of one reviewed result: the model's probability, the radiologist's answer."""

    probability: float
    threshold: float | None
    model_present: bool
    truth: bool


@dataclass
class LabelPerformance:
    label: str
    tp: int
    fp: int
    fn: int
    tn: int
    sensitivity: Proportion
    ppv: Proportion
    auc: Auc | None
    scored: list[Scored] = field(repr=False)


@dataclass
class ModelPerformance:
    model_name: str
    model_version: str
    results_reviewed: int
    labels: list[LabelPerformance]
    stat_precision: Proportion

    @property
    def key(self) -> str:
        return f"{self.model_name} {self.model_version}"


@dataclass(frozen=True)
class Waits:
    """Arrival-to-read times of one class of studies, in seconds."""

    n: int
    median_s: float | None
    p90_s: float | None
    baseline_median_s: float | None  # the same studies, read in arrival order
    baseline_p90_s: float | None
    not_read: int
    waits_s: list[float] = field(repr=False)
    baseline_waits_s: list[float] = field(repr=False)


@dataclass(frozen=True)
class TriageEffect:
    urgent: Waits
    routine: Waits
    reads_per_hour: float | None  # over the span from the first arrival to the last read


@dataclass
class MonitorReport:
    generated_at: dt.datetime
    models: list[ModelPerformance]
    triage: TriageEffect
    critical_findings: list[str]


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    # Linear between order statistics (numpy's default), so a median of two is their mean.
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _waits(waits: list[float], baseline: list[float], not_read: int) -> Waits:
    return Waits(
        n=len(waits),
        median_s=_quantile(waits, 0.5),
        p90_s=_quantile(waits, 0.9),
        baseline_median_s=_quantile(baseline, 0.5),
        baseline_p90_s=_quantile(baseline, 0.9),
        not_read=not_read,
        waits_s=waits,
        baseline_waits_s=baseline,
    )


@dataclass(frozen=True)
class StudyTimes:
    """What the triage effect needs of one study: its class, arrival, first read."""

    urgent: bool
    arrived: dt.datetime
    read: dt.datetime | None


def triage_effect(studies: Iterable[StudyTimes]) -> TriageEffect:
    """Waits of urgent and routine studies against the arrival-order baseline (module doc)."""
    items = list(studies)
    done = [(s, s.read) for s in items if s.read is not None]
    by_arrival = sorted(done, key=lambda pair: pair[0].arrived)
    slots = sorted(read for _, read in done)
    out: dict[bool, tuple[list[float], list[float]]] = {True: ([], []), False: ([], [])}
    # The k-th arrival takes the k-th reading moment: the arrival-order baseline.
    for (study, read), slot in zip(by_arrival, slots, strict=True):
        out[study.urgent][0].append((read - study.arrived).total_seconds())
        out[study.urgent][1].append((slot - study.arrived).total_seconds())
    rate = None
    if done:
        span_h = (slots[-1] - by_arrival[0][0].arrived).total_seconds() / 3600
        rate = len(done) / span_h if span_h > 0 else None
    return TriageEffect(
        urgent=_waits(*out[True], sum(1 for s in items if s.urgent and s.read is None)),
        routine=_waits(*out[False], sum(1 for s in items if not s.urgent and s.read is None)),
        reads_per_hour=rate,
    )


def _study_times(database: Database) -> list[StudyTimes]:
    first_read = (
        select(WorklistEvent.study_id, func.min(WorklistEvent.at).label("read_at"))
        .where(WorklistEvent.action == ReadStatus.READ.value)
        .group_by(WorklistEvent.study_id)
        .subquery()
    )
    with database.read() as session:
        rows = session.execute(
            select(Study.priority, Study.first_received_at, first_read.c.read_at)
            .outerjoin(first_read, first_read.c.study_id == Study.id)
            # Ranked by triage (its own decision, not a hand override): not analysed
            # studies were never ranked.
            .where(Study.priority.in_([p.value for p in (*URGENT, Priority.ROUTINE)]))
        ).all()
    return [StudyTimes(r.priority in URGENT, r.first_received_at, r.read_at) for r in rows]


@dataclass(frozen=True)
class _Case:
    model_name: str
    model_version: str
    priority: str


def _latest_verdicts(
    database: Database,
) -> tuple[dict[tuple[str, int, str, str], _Case], dict[tuple[str, int, str, str, str], Scored]]:
    """Per reviewed result (study_ref, generation, model): its case; per result and label:
    the latest verdict."""
    with database.read() as session:
        rows = session.execute(
            select(
                Feedback.study_ref,
                Feedback.generation,
                Feedback.model_name,
                Feedback.model_version,
                Feedback.priority,
                FindingFeedback.label,
                FindingFeedback.model_present,
                FindingFeedback.probability,
                FindingFeedback.threshold,
                FindingFeedback.verdict,
            )
            .join(FindingFeedback, FindingFeedback.feedback_id == Feedback.id)
            .order_by(Feedback.at, Feedback.id, FindingFeedback.id)
        ).all()
    cases: dict[tuple[str, int, str, str], _Case] = {}
    latest: dict[tuple[str, int, str, str, str], Scored] = {}
    for r in rows:
        case = (r.study_ref, r.generation, r.model_name, r.model_version)
        cases[case] = _Case(r.model_name, r.model_version, r.priority)
        latest[(*case, r.label)] = Scored(
            probability=r.probability,
            threshold=r.threshold,
            model_present=r.model_present,
            truth=r.model_present != (r.verdict == Verdict.DISAGREE.value),
        )
    return cases, latest


def label_performance(label: str, scored: list[Scored]) -> LabelPerformance:
    tp = sum(1 for s in scored if s.model_present and s.truth)
    fp = sum(1 for s in scored if s.model_present and not s.truth)
    fn = sum(1 for s in scored if not s.model_present and s.truth)
    tn = sum(1 for s in scored if not s.model_present and not s.truth)
    positives = [s.probability for s in scored if s.truth]
    negatives = [s.probability for s in scored if not s.truth]
    return LabelPerformance(
        label=label,
        tp=tp,
        fp=fp,
        fn=fn,
        tn=tn,
        sensitivity=wilson(tp, tp + fn),
        ppv=wilson(tp, tp + fp),
        auc=auc_delong(positives, negatives) if positives and negatives else None,
        scored=scored,
    )


def build_report(
    database: Database, critical_findings: Sequence[str], now: dt.datetime | None = None
) -> MonitorReport:
    cases, latest = _latest_verdicts(database)
    by_case: dict[tuple[str, int, str, str], dict[str, Scored]] = {}
    for (ref, generation, name, version, label), scored in latest.items():
        by_case.setdefault((ref, generation, name, version), {})[label] = scored
    critical = {name.lower() for name in critical_findings}
    models: list[ModelPerformance] = []
    for name, version in sorted({(c.model_name, c.model_version) for c in cases.values()}):
        mine = [k for k, c in cases.items() if (c.model_name, c.model_version) == (name, version)]
        per_label: dict[str, list[Scored]] = {}
        stat_n = stat_k = 0
        for case in mine:
            for label, scored in by_case[case].items():
                per_label.setdefault(label, []).append(scored)
            if cases[case].priority == Priority.STAT.value:
                answers = [s.truth for lab, s in by_case[case].items() if lab.lower() in critical]
                if answers:  # a verdict on a critical finding: the STAT can be judged
                    stat_n += 1
                    stat_k += any(answers)
        models.append(
            ModelPerformance(
                model_name=name,
                model_version=version,
                results_reviewed=len(mine),
                labels=[label_performance(lab, per_label[lab]) for lab in sorted(per_label)],
                stat_precision=wilson(stat_k, stat_n),
            )
        )
    return MonitorReport(
        generated_at=now or dt.datetime.now(dt.UTC),
        models=models,
        triage=triage_effect(_study_times(database)),
        critical_findings=list(critical_findings),
    )


# -- how people read the figures (the CLI and the admin page) -------------------------


def proportion_text(p: Proportion) -> str:
    if p.value is None or p.low is None or p.high is None:
        return f"- (0/{p.n})" if p.n == 0 else "-"
    return f"{p.value:.2f} [{p.low:.2f}-{p.high:.2f}] ({p.k}/{p.n})"


def auc_text(auc: Auc | None) -> str:
    if auc is None:
        return "- (one class only)"
    ci = "" if auc.low is None or auc.high is None else f" [{auc.low:.2f}-{auc.high:.2f}]"
    return f"{auc.value:.2f}{ci} ({auc.positives}+/{auc.negatives}-)"


def hours_text(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 3600:.1f} h"
