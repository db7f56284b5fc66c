"""Which model head analyses which images: the routing rule table from the config.

A rule matches an instance when every non-empty list in the rule contains the instance's
value (an empty string in a list matches a missing attribute). The first rule that matches
any instance of a study routes the study; only the instances it matches are scored (a
lateral view is stored and listed but not scored by a frontal CXR head). Results that come
back with a study (the node's own, other algorithms', see dicom/origin.py) are never
routed, and only a source image that a rule selects re-opens a completed study
(:func:`selects`, which the SCP asks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from ddn_node.config import RoutingRule
from ddn_node.store.ingest import InstanceRecord
from ddn_node.store.models import Instance, Series
from ddn_node.vocabulary import InstanceOrigin


@dataclass(frozen=True)
class InstanceFacts:
    instance_id: int
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    body_part: str
    view_position: str
    origin: str = InstanceOrigin.SOURCE


@dataclass(frozen=True)
class StoredInstance:
    facts: InstanceFacts
    path: str  # relative to the spool


def study_instances(session: Session, study_id: int) -> list[StoredInstance]:
    """A study's instances with what routing needs, in series and instance order."""
    rows = session.execute(
        select(
            Instance.id,
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Series.modality,
            Series.body_part,
            Instance.view_position,
            Instance.origin,
            Instance.path,
        )
        .join(Series, Instance.series_id == Series.id)
        .where(Instance.study_id == study_id)
        .order_by(Series.series_number, Instance.instance_number, Instance.id)
    ).all()
    return [StoredInstance(InstanceFacts(*row[:7]), row[7]) for row in rows]


@dataclass(frozen=True)
class Route:
    rule: RoutingRule
    instances: list[InstanceFacts]


def _in(values: Sequence[str], value: str) -> bool:
    return not values or value.strip().upper() in {v.upper() for v in values}


def rule_matches(rule: RoutingRule, facts: InstanceFacts) -> bool:
    return (
        _in(rule.modalities, facts.modality)
        and _in(rule.body_parts, facts.body_part)
        and _in(rule.views, facts.view_position)
        and (not rule.sop_classes or facts.sop_class_uid in rule.sop_classes)
    )


def route_study(rules: Sequence[RoutingRule], instances: Sequence[InstanceFacts]) -> Route | None:
    sources = [facts for facts in instances if facts.origin == InstanceOrigin.SOURCE]
    for rule in rules:
        matched = [facts for facts in sources if rule_matches(rule, facts)]
        if matched:
            return Route(rule, matched)
    return None


def selects(rules: Sequence[RoutingRule], record: InstanceRecord) -> bool:
    """Whether a received instance is a source image that some routing rule would score:
    the only kind that re-opens a completed study."""
    if record.origin != InstanceOrigin.SOURCE:
        return False
    facts = InstanceFacts(
        0,
        record.sop_instance_uid,
        record.sop_class_uid,
        record.modality,
        record.body_part,
        record.view_position,
    )
    return any(rule_matches(rule, facts) for rule in rules)
