"""Triage: from the model's findings to a reading priority, and why.

The policy lives in ``[triage]`` of the config and every decision carries a sentence that
the worklist shows ("why is this study here?"):

* STAT: a configured critical finding is present (probability at or above its threshold);
* HIGH: the abnormality score is at or above ``high_score``;
* ROUTINE: everything else that was analysed;
* NOT_ANALYSED: waiting for, failed or not routed to analysis - listed with the reason, in
  the ROUTINE band by arrival, never hidden below it.

Ageing: an unread ROUTINE (or not analysed) study climbs one rank per
``ageing_minutes_per_step`` minutes of waiting, up to HIGH, so nothing waits for ever;
a study no rule routes (never analysed, and never to be) is listed, never raised. A
radiologist's manual override wins over all of this.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ddn_node.config import TriageSettings
from ddn_node.model.types import LabelSpec
from ddn_node.store import lifecycle
from ddn_node.store.engine import Database
from ddn_node.vocabulary import RANK, Priority


@dataclass(frozen=True)
class TriageDecision:
    priority: Priority
    rank: int
    reason: str


def decide(
    policy: TriageSettings,
    labels: Sequence[LabelSpec],
    probabilities: Mapping[str, float],
    score: float,
) -> TriageDecision:
    critical = {name.lower() for name in policy.critical_findings}
    hits = [
        f"{spec.name} {probabilities[spec.name]:.2f} >= {spec.threshold:.2f}"
        for spec in labels
        if spec.name.lower() in critical
        and spec.name in probabilities
        and probabilities[spec.name] >= spec.threshold
    ]
    if hits:
        return TriageDecision(
            Priority.STAT, RANK[Priority.STAT], "critical finding: " + "; ".join(hits)
        )
    if score >= policy.high_score:
        return TriageDecision(
            Priority.HIGH,
            RANK[Priority.HIGH],
            f"abnormality score {score:.2f} >= {policy.high_score:.2f}",
        )
    return TriageDecision(
        Priority.ROUTINE,
        RANK[Priority.ROUTINE],
        f"abnormality score {score:.2f} < {policy.high_score:.2f}, no critical finding",
    )


def apply_ageing(database: Database, policy: TriageSettings, now: dt.datetime | None = None) -> int:
    """Raise the rank of unread routine studies that have waited long enough; returns how many."""
    if policy.ageing_minutes_per_step <= 0:
        return 0
    with database.session() as session:
        return lifecycle.raise_by_ageing(session, policy.ageing_minutes_per_step, now)
