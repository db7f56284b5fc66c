"""Image selection per routing rule (pipeline/routing.py), on the facts the database keeps:
what a rule scores of a study is what a user sees listed as analysed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from pydantic import ValidationError

from ddn_node.config import RoutingRule
from ddn_node.pipeline.routing import InstanceFacts, route_study, spread

CR = "1.2.840.10008.5.1.4.1.1.1"


def _rule(**kw: Any) -> RoutingRule:
    return RoutingRule.model_validate({"name": "r", "model": "m", "head": "h", **kw})


def _facts(
    i: int, view: str = "PA", image_type: str = "ORIGINAL\\PRIMARY", **attrs: str
) -> InstanceFacts:
    known = {"CallingAE": "CR-ED", "StationName": "ROOM1", "SeriesDescription": "CHEST", **attrs}
    return InstanceFacts(
        i, f"1.2.{i}", CR, "CR", "CHEST", view, image_type=image_type, attributes=known
    )


def _ids(
    rules: Sequence[RoutingRule], facts: Sequence[InstanceFacts], lookup: Any = None
) -> list[int]:
    route = route_study(rules, facts, lookup)
    return [] if route is None else [f.instance_id for f in route.instances]


def test_localisers_and_secondary_images_are_not_scored_derived_primary_is() -> None:
    facts = [
        _facts(1, image_type="ORIGINAL\\PRIMARY\\LOCALIZER"),
        _facts(2, image_type="DERIVED\\SECONDARY\\OTHER"),
        _facts(3, image_type="DERIVED\\PRIMARY"),
        _facts(4, image_type=""),
    ]
    assert _ids([_rule()], facts) == [3, 4]
    # A study of nothing but localisers is not routed at all (listed as not analysed).
    assert route_study([_rule()], facts[:2]) is None


def test_frontal_views_win_over_the_lateral_and_the_unlabelled() -> None:
    facts = [_facts(1, "LL"), _facts(2, "PA"), _facts(3, ""), _facts(4, "LATERAL")]
    assert _ids([_rule(prefer_views=["PA", "AP"])], facts) == [2]
    # No frontal view in the study: the others are still scored.
    assert _ids([_rule(prefer_views=["PA", "AP"])], [facts[0], facts[2]]) == [1, 3]


def test_the_cap_spreads_over_the_series_first_and_last_included() -> None:
    facts = [_facts(i) for i in range(10)]
    assert _ids([_rule(max_images=4)], facts) == [0, 3, 6, 9]
    assert spread(list(range(5)), 0) == list(range(5))
    assert spread(list(range(5)), 1) == [2]


def test_rules_route_by_any_tag_calling_ae_station_and_patterns() -> None:
    ed = _rule(name="ed", match={"CallingAE": ["CR-ED*"], "StationName": ["re:^room[0-9]$"]})
    other = _rule(name="other")
    facts = [_facts(1), _facts(2, CallingAE="CR-WARD")]
    route = route_study([ed, other], facts)
    assert (
        route is not None
        and route.rule.name == "ed"
        and [f.instance_id for f in route.instances] == [1]
    )
    assert (
        _ids(
            [_rule(exclude={"SeriesDescription": ["*LAT*"]})],
            [_facts(1, SeriesDescription="Chest LAT")],
        )
        == []
    )


def test_a_keyword_the_database_does_not_keep_is_read_from_the_header() -> None:
    asked: list[tuple[int, tuple[str, ...]]] = []

    def lookup(facts: InstanceFacts, keywords: Sequence[str]) -> Mapping[str, str]:
        asked.append((facts.instance_id, tuple(keywords)))
        return {"ProtocolName": "BRAIN ROUTINE" if facts.instance_id == 1 else "SPINE"}

    rule = _rule(match={"ProtocolName": ["*brain*"]})
    assert _ids([rule], [_facts(1), _facts(2)], lookup) == [1]
    assert asked == [(1, ("ProtocolName",)), (2, ("ProtocolName",))]


def test_a_match_table_of_non_keywords_or_bad_expressions_is_refused() -> None:
    with pytest.raises(ValidationError):
        _rule(match={"station name": ["X"]})
    with pytest.raises(ValidationError):
        _rule(match={"StationName": ["re:("]})
