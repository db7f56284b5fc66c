"""Which model head analyses which images: the routing rule table from the config.

A rule matches an instance when every non-empty list in the rule contains the instance's
value (an empty string in a list matches a missing attribute) and its ``match`` table
(any DICOM keyword or ``CallingAE`` -> globs or ``re:`` expressions, as mercure's rules
route on any tag) holds and its ``exclude`` table does not. The first rule that matches
any instance of a study routes the study. Of the instances it matches, the rule then
*selects* what is scored:

1. no localiser and no secondary image (``skip_image_types`` over the Image Type);
2. the preferred views when the study has any (``prefer_views``: a frontal CXR head
   scores the PA/AP views, not the lateral beside them);
3. at most ``max_images`` images, thinned evenly over the study's series order so that a
   long MR series is read end to end, not its first slices only. Every frame of a
   multi-frame object is an image; the instances are capped here, the frames when they
   are decoded (pipeline/analysis.py, :func:`spread`).

Results that come back with a study (the node's own, other algorithms', see
dicom/origin.py) are never routed, and only a source image that a rule selects re-opens a
completed study (:func:`selects`, which the SCP asks).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TypeVar

import pydicom
import structlog
from pydicom.datadict import tag_for_keyword
from sqlalchemy import select
from sqlalchemy.orm import Session

from ddn_node.config import RoutingRule
from ddn_node.store.ingest import InstanceRecord
from ddn_node.store.models import Instance, Series
from ddn_node.vocabulary import InstanceOrigin

log = structlog.get_logger("ddn_node.routing")

T = TypeVar("T")

CALLING_AE = "CallingAE"


@dataclass(frozen=True)
class InstanceFacts:
    instance_id: int
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    body_part: str
    view_position: str
    origin: str = InstanceOrigin.SOURCE
    image_type: str = ""
    frames: int = 1
    # Attributes a rule's match / exclude table reads, by keyword (CallingAE included);
    # what is not here is read from the instance's header by ``lookup`` when a rule asks.
    attributes: Mapping[str, str] = field(default_factory=dict)


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
            Instance.image_type,
            Instance.frames,
            Instance.path,
            Instance.calling_ae,
            Instance.station_name,
            Instance.institution_name,
            Series.series_description,
        )
        .join(Series, Instance.series_id == Series.id)
        .where(Instance.study_id == study_id)
        .order_by(Series.series_number, Instance.instance_number, Instance.id)
    ).all()
    return [
        StoredInstance(
            InstanceFacts(
                *row[:9],
                attributes=_known_attributes(
                    calling_ae=row[10],
                    station_name=row[11],
                    institution_name=row[12],
                    series_description=row[13],
                    modality=row[3],
                    body_part=row[4],
                    view_position=row[5],
                    image_type=row[7],
                    sop_class_uid=row[2],
                ),
            ),
            row[9],
        )
        for row in rows
    ]


def _known_attributes(
    *,
    calling_ae: str,
    station_name: str,
    institution_name: str,
    series_description: str,
    modality: str,
    body_part: str,
    view_position: str,
    image_type: str,
    sop_class_uid: str,
) -> dict[str, str]:
    """The attributes the database keeps, under the keywords a rule names them by."""
    return {
        CALLING_AE: calling_ae,
        "StationName": station_name,
        "InstitutionName": institution_name,
        "SeriesDescription": series_description,
        "Modality": modality,
        "BodyPartExamined": body_part,
        "ViewPosition": view_position,
        "ImageType": image_type,
        "SOPClassUID": sop_class_uid,
    }


# Reads the named attributes of one instance from its stored header (completion passes
# one bound to the spool); None: the rule sees them as missing.
Lookup = Callable[[InstanceFacts, Sequence[str]], Mapping[str, str]]


def header_lookup(path_of: Callable[[InstanceFacts], str]) -> Lookup:
    """A :data:`Lookup` that reads the attributes from the instance's file (header only)."""

    def lookup(facts: InstanceFacts, keywords: Sequence[str]) -> Mapping[str, str]:
        tags = [tag for tag in (tag_for_keyword(k) for k in keywords) if tag is not None]
        try:
            ds = pydicom.dcmread(
                path_of(facts), stop_before_pixels=True, specific_tags=tags, force=True
            )
        except (OSError, ValueError, EOFError) as exc:
            # The file went (retention) or will not parse: the rule sees the attributes as
            # missing, and the analysis says what it could not read.
            log.warning(
                "routing.header_unreadable", sop_instance_uid=facts.sop_instance_uid, error=str(exc)
            )
            return {}
        out = {}
        for keyword in keywords:
            value = ds.get(keyword)
            if value is None:
                continue
            if isinstance(value, pydicom.multival.MultiValue):
                out[keyword] = "\\".join(str(v) for v in value)
            else:
                out[keyword] = str(value).strip()
        return out

    return lookup


@dataclass(frozen=True)
class Route:
    rule: RoutingRule
    instances: list[InstanceFacts]


def _in(values: Sequence[str], value: str) -> bool:
    return not values or value.strip().upper() in {v.upper() for v in values}


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    if pattern.startswith("re:"):
        return re.compile(pattern[3:], re.IGNORECASE)
    return re.compile(fnmatch.translate(pattern), re.IGNORECASE)


def pattern_matches(pattern: str, value: str) -> bool:
    """A glob matches the whole value; an ``re:`` expression is searched in it."""
    compiled = _compiled(pattern)
    value = value.strip()
    return bool(compiled.search(value) if pattern.startswith("re:") else compiled.match(value))


@cache
def _warn_unknown(keyword: str) -> None:
    log.warning("routing.unknown_keyword", keyword=keyword)


def _attributes(
    rule: RoutingRule, facts: InstanceFacts, lookup: Lookup | None
) -> Mapping[str, str]:
    wanted = [k for k in (*rule.match, *rule.exclude) if k not in facts.attributes]
    for keyword in wanted:
        if keyword != CALLING_AE and tag_for_keyword(keyword) is None:
            _warn_unknown(keyword)
    readable = [k for k in wanted if k != CALLING_AE and tag_for_keyword(k) is not None]
    if not readable or lookup is None:
        return facts.attributes
    return {**facts.attributes, **lookup(facts, readable)}


def rule_matches(
    rule: RoutingRule, facts: InstanceFacts, lookup: Lookup | None = None, lenient: bool = False
) -> bool:
    """Whether the rule matches the instance; ``lenient``: an entry on an attribute that
    neither the facts nor ``lookup`` give is not evaluated (else it reads as missing)."""
    if not (
        _in(rule.modalities, facts.modality)
        and _in(rule.body_parts, facts.body_part)
        and _in(rule.views, facts.view_position)
        and (not rule.sop_classes or facts.sop_class_uid in rule.sop_classes)
    ):
        return False
    if not (rule.match or rule.exclude):
        return True
    values = _attributes(rule, facts, lookup)
    for keyword, patterns in rule.match.items():
        if lenient and keyword not in values:
            continue
        if not any(pattern_matches(p, values.get(keyword, "")) for p in patterns):
            return False
    for keyword, patterns in rule.exclude.items():
        if lenient and keyword not in values:
            continue
        if any(pattern_matches(p, values.get(keyword, "")) for p in patterns):
            return False
    return True


def image_type_skipped(rule: RoutingRule, image_type: str) -> bool:
    """Whether an Image Type (values joined by backslashes) is one the rule never scores."""
    values = [v.strip().upper() for v in image_type.split("\\")]
    for entry in rule.skip_image_types:
        parts = [p.strip().upper() for p in entry.split("\\")]
        if len(parts) == 1:
            if parts[0] in values:
                return True
        elif len(values) >= len(parts) and all(
            p in ("*", v) for p, v in zip(parts, values, strict=False)
        ):
            return True
    return False


def spread(items: Sequence[T], limit: int) -> list[T]:
    """At most ``limit`` of ``items``, evenly spaced, the first and last included.

    Slices of one series in order: the thinned set still covers the volume from end to
    end, where the first ``limit`` would read one end of it. 0: all of them.
    """
    n = len(items)
    if limit <= 0 or n <= limit:
        return list(items)
    if limit == 1:
        return [items[(n - 1) // 2]]
    return [items[round(i * (n - 1) / (limit - 1))] for i in range(limit)]


def select_images(rule: RoutingRule, matched: Sequence[InstanceFacts]) -> list[InstanceFacts]:
    """What the rule scores of the instances it matched (see the module docstring)."""
    kept = [f for f in matched if not image_type_skipped(rule, f.image_type)]
    if rule.prefer_views:
        preferred = [f for f in kept if _in(rule.prefer_views, f.view_position)]
        kept = preferred or kept
    return spread(kept, rule.max_images)


def route_study(
    rules: Sequence[RoutingRule],
    instances: Sequence[InstanceFacts],
    lookup: Lookup | None = None,
) -> Route | None:
    sources = [facts for facts in instances if facts.origin == InstanceOrigin.SOURCE]
    for rule in rules:
        matched = [facts for facts in sources if rule_matches(rule, facts, lookup)]
        selected = select_images(rule, matched)
        if selected:
            return Route(rule, selected)
    return None


def record_facts(record: InstanceRecord) -> InstanceFacts:
    return InstanceFacts(
        0,
        record.sop_instance_uid,
        record.sop_class_uid,
        record.modality,
        record.body_part,
        record.view_position,
        record.origin,
        record.image_type,
        record.frames,
        _known_attributes(
            calling_ae=record.calling_ae,
            station_name=record.station_name,
            institution_name=record.institution_name,
            series_description=record.series_description,
            modality=record.modality,
            body_part=record.body_part,
            view_position=record.view_position,
            image_type=record.image_type,
            sop_class_uid=record.sop_class_uid,
        ),
    )


def selects(rules: Sequence[RoutingRule], record: InstanceRecord) -> bool:
    """Whether a received instance is a source image that some routing rule would score:
    the only kind that re-opens a completed study.

    The SCP has the indexed attributes only: a ``match`` / ``exclude`` entry on a keyword
    the database does not keep is not evaluated here. Such an instance may re-open a study
    that completion then routes as before, which costs an analysis, never a missed image.
    """
    if record.origin != InstanceOrigin.SOURCE:
        return False
    facts = record_facts(record)
    return any(
        rule_matches(rule, facts, lenient=True) and not image_type_skipped(rule, facts.image_type)
        for rule in rules
    )
