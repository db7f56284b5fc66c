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

A candidate model in shadow (``ddn-node model shadow``, store/shadow.py) is compared with
the live model it ran beside, on the same reviewed study generations: the verdicts on the
live result are the truth for both, and each label's AUC difference (candidate - live)
has the paired DeLong interval (DeLong et al. 1988, the covariance of the two models'
structural components on the same cases), far narrower than two unpaired intervals.

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
from ddn_node.store.shadow import ShadowRecord, shadow_results
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
class AucDifference:
    """One model's AUC minus another's on the same cases, with the paired DeLong 95 %
    interval (the two are correlated: the same studies, the same truth)."""

    value: float
    low: float | None
    high: float | None


def auc_difference_delong(
    first: tuple[Sequence[float], Sequence[float]],
    second: tuple[Sequence[float], Sequence[float]],
    z: float = Z95,
) -> AucDifference:
    """AUC(second) - AUC(first); each is (scores of the positives, of the negatives), in
    the same case order for both models."""
    (p1, n1), (p2, n2) = first, second
    m, n = len(p1), len(n1)
    if m == 0 or n == 0 or (m, n) != (len(p2), len(n2)):
        raise ValueError("paired AUCs need the same cases, of both classes, for both models")

    def components(pos: Sequence[float], neg: Sequence[float]) -> tuple[list[float], list[float]]:
        return (
            [sum(_psi(x, y) for y in neg) / n for x in pos],
            [sum(_psi(x, y) for x in pos) / m for y in neg],
        )

    v10a, v01a = components(p1, n1)
    v10b, v01b = components(p2, n2)
    value = sum(v10b) / m - sum(v10a) / m
    if m < 2 or n < 2:
        return AucDifference(value, None, None)
    variance = (
        statistics.variance(v10a)
        + statistics.variance(v10b)
        - 2 * statistics.covariance(v10a, v10b)
    ) / m + (
        statistics.variance(v01a)
        + statistics.variance(v01b)
        - 2 * statistics.covariance(v01a, v01b)
    ) / n
    half = z * math.sqrt(max(variance, 0.0))
    return AucDifference(value, max(-1.0, value - half), min(1.0, value + half))


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
class LabelComparison:
    """One label on the reviewed cases both models scored."""

    label: str
    live: LabelPerformance
    candidate: LabelPerformance
    auc_difference: AucDifference | None  # candidate - live; None without both classes


@dataclass
class ShadowComparison:
    """A candidate (shadow) model against the live model it ran beside, on the same
    studies, judged by the radiologists' verdicts on the live results."""

    live_name: str
    live_version: str
    candidate_name: str
    candidate_version: str
    head: str
    scored: int  # study generations the candidate scored
    reviewed: int  # of those, how many have a verdict on the live result
    priority_changed: int  # reviewed cases where the candidate's priority would differ
    labels: list[LabelComparison]
    live_stat_precision: Proportion
    candidate_stat_precision: Proportion

    @property
    def key(self) -> str:
        return f"{self.candidate_name} {self.candidate_version} vs {self.live_name} {self.live_version}"


@dataclass
class MonitorReport:
    generated_at: dt.datetime
    models: list[ModelPerformance]
    triage: TriageEffect
    critical_findings: list[str]
    shadows: list[ShadowComparison] = field(default_factory=list)


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


def _stat_precision(
    cases: Iterable[tuple[str, dict[str, Scored]]], critical: set[str]
) -> Proportion:
    """Of the cases ranked STAT (priority, verdicts by label) with a verdict on a critical
    finding, the share where the radiologist says one is present."""
    n = k = 0
    for priority, verdicts in cases:
        if priority != Priority.STAT.value:
            continue
        answers = [s.truth for label, s in verdicts.items() if label.lower() in critical]
        if answers:  # a verdict on a critical finding: the STAT can be judged
            n += 1
            k += any(answers)
    return wilson(k, n)


CaseKey = tuple[str, int, str, str]  # study_ref, generation, model name, version


def build_report(
    database: Database, critical_findings: Sequence[str], now: dt.datetime | None = None
) -> MonitorReport:
    cases, latest = _latest_verdicts(database)
    by_case: dict[CaseKey, dict[str, Scored]] = {}
    for (ref, generation, name, version, label), scored in latest.items():
        by_case.setdefault((ref, generation, name, version), {})[label] = scored
    critical = {name.lower() for name in critical_findings}
    models: list[ModelPerformance] = []
    for name, version in sorted({(c.model_name, c.model_version) for c in cases.values()}):
        mine = [k for k, c in cases.items() if (c.model_name, c.model_version) == (name, version)]
        per_label: dict[str, list[Scored]] = {}
        for case in mine:
            for label, scored in by_case[case].items():
                per_label.setdefault(label, []).append(scored)
        models.append(
            ModelPerformance(
                model_name=name,
                model_version=version,
                results_reviewed=len(mine),
                labels=[label_performance(lab, per_label[lab]) for lab in sorted(per_label)],
                stat_precision=_stat_precision(
                    ((cases[c].priority, by_case[c]) for c in mine), critical
                ),
            )
        )
    with database.read() as session:
        shadow_rows = shadow_results(session)
    return MonitorReport(
        generated_at=now or dt.datetime.now(dt.UTC),
        models=models,
        triage=triage_effect(_study_times(database)),
        critical_findings=list(critical_findings),
        shadows=compare_shadows(cases, by_case, shadow_rows, critical),
    )


def compare_shadows(
    cases: dict[CaseKey, _Case],
    by_case: dict[CaseKey, dict[str, Scored]],
    shadows: Sequence[ShadowRecord],
    critical: set[str],
) -> list[ShadowComparison]:
    """Each candidate against the live model it shadowed, on the cases both scored and a
    radiologist reviewed: the live result's verdicts are the truth for both."""
    groups: dict[tuple[str, str, str, str, str], list[ShadowRecord]] = {}
    for row in shadows:
        key = (row.live_model_name, row.live_model_version, row.model_name, row.model_version)
        groups.setdefault((*key, row.head), []).append(row)
    out: list[ShadowComparison] = []
    for (live_name, live_version, name, version, head), rows in sorted(groups.items()):
        live_by_label: dict[str, list[Scored]] = {}
        candidate_by_label: dict[str, list[Scored]] = {}
        live_stat: list[tuple[str, dict[str, Scored]]] = []
        candidate_stat: list[tuple[str, dict[str, Scored]]] = []
        reviewed = changed = 0
        for row in rows:
            case = (row.study_ref, row.generation, live_name, live_version)
            verdicts = by_case.get(case)
            if not verdicts:
                continue
            reviewed += 1
            changed += row.priority != cases[case].priority
            mine: dict[str, Scored] = {}
            for label, truth in verdicts.items():
                if label not in row.probabilities:
                    continue  # a label the candidate does not have
                live_by_label.setdefault(label, []).append(truth)
                mine[label] = Scored(
                    probability=row.probabilities[label],
                    threshold=row.thresholds.get(label),
                    model_present=label in row.positive,
                    truth=truth.truth,
                )
                candidate_by_label.setdefault(label, []).append(mine[label])
            live_stat.append((cases[case].priority, verdicts))
            candidate_stat.append((row.priority, mine))
        labels = []
        for label in sorted(live_by_label):
            live, candidate = live_by_label[label], candidate_by_label[label]
            difference = None
            if any(s.truth for s in live) and not all(s.truth for s in live):
                difference = auc_difference_delong(_classes(live), _classes(candidate))
            labels.append(
                LabelComparison(
                    label=label,
                    live=label_performance(label, live),
                    candidate=label_performance(label, candidate),
                    auc_difference=difference,
                )
            )
        out.append(
            ShadowComparison(
                live_name=live_name,
                live_version=live_version,
                candidate_name=name,
                candidate_version=version,
                head=head,
                scored=len(rows),
                reviewed=reviewed,
                priority_changed=changed,
                labels=labels,
                live_stat_precision=_stat_precision(live_stat, critical),
                candidate_stat_precision=_stat_precision(candidate_stat, critical),
            )
        )
    return out


def _classes(scored: Sequence[Scored]) -> tuple[list[float], list[float]]:
    """(probabilities of the truly present, of the truly absent), in case order."""
    return (
        [s.probability for s in scored if s.truth],
        [s.probability for s in scored if not s.truth],
    )


# -- how people read the figures (the CLI and the admin page) -------------------------


def proportion_text(p: Proportion) -> str:
    if p.value is None or p.low is None or p.high is None:
        return f"- (0/{p.n})" if p.n == 0 else "-"
    return f"{p.value:.2f} [{p.low:.2f}-{p.high:.2f}] ({p.k}/{p.n})"


def difference_text(d: AucDifference | None) -> str:
    if d is None:
        return "-"
    ci = "" if d.low is None or d.high is None else f" [{d.low:+.2f} to {d.high:+.2f}]"
    return f"{d.value:+.2f}{ci}"


def auc_text(auc: Auc | None) -> str:
    if auc is None:
        return "- (one class only)"
    ci = "" if auc.low is None or auc.high is None else f" [{auc.low:.2f}-{auc.high:.2f}]"
    return f"{auc.value:.2f}{ci} ({auc.positives}+/{auc.negatives}-)"


def hours_text(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 3600:.1f} h"
