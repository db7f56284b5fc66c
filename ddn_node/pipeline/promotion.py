"""Shadow and swap: put a candidate model beside a routing rule's live one, promote it, roll
it back. ``ddn-node model ...`` and ``/admin/models`` both call these.

The decisions live in the database (store/assignments.py) and every worker reads them at
the start of each job, so nothing here talks to a running node: the next study each worker
claims runs what was decided. A candidate is checked when it is put in shadow (it loads,
weights verified; it has the rule's head and shares labels with the live model; it has its
own version), so that what the monitor compares is what a promotion makes live.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddn_node.config import RoutingRule, Settings
from ddn_node.model.identity import manifest_name
from ddn_node.store import assignments
from ddn_node.store.assignments import Assignment, AssignmentRefused
from ddn_node.store.engine import Database


class PromotionError(ValueError):
    """The change cannot be made; the message says why (the CLI exits 2, the page shows it)."""


@dataclass(frozen=True)
class ModelRef:
    """An artifact folder and who it says it is (read from its manifest, weights unread)."""

    path: Path
    name: str
    version: str
    is_demo: bool
    problem: str = ""  # the manifest could not be read

    @property
    def label(self) -> str:
        return (
            f"{self.name} {self.version}" if not self.problem else f"{self.path} ({self.problem})"
        )


@dataclass(frozen=True)
class RuleModels:
    rule: str
    head: str
    configured: Path
    live: ModelRef
    shadow: ModelRef | None
    promoted: bool
    previous: ModelRef | None
    assignment: Assignment


def model_ref(path: Path) -> ModelRef:
    try:
        name, version, is_demo = manifest_name(path)
    except ValueError as exc:
        return ModelRef(path, "", "", False, problem=str(exc))
    return ModelRef(path, name, version, is_demo)


def _rule(settings: Settings, name: str) -> RoutingRule:
    for rule in settings.routing:
        if rule.name == name:
            return rule
    known = ", ".join(r.name for r in settings.routing) or "none"
    raise PromotionError(f"no routing rule {name!r} (configured: {known})")


def _models(rule: RoutingRule, assigned: Assignment) -> RuleModels:
    return RuleModels(
        rule=rule.name,
        head=rule.head,
        configured=rule.model,
        live=model_ref(assigned.live),
        shadow=None if assigned.shadow is None else model_ref(assigned.shadow),
        promoted=assigned.promoted,
        previous=None if assigned.previous is None else model_ref(assigned.previous),
        assignment=assigned,
    )


def status(settings: Settings, database: Database) -> list[RuleModels]:
    """Per routing rule: the live model (configured or promoted) and its shadow."""
    with database.read() as session:
        return [
            _models(rule, assignments.assignment(session, rule.name, rule.model))
            for rule in settings.routing
        ]


def start_shadow(
    settings: Settings,
    database: Database,
    rule_name: str,
    candidate: Path,
    *,
    by: str,
    host: str = "",
) -> RuleModels:
    """Put ``candidate`` beside the rule's live model (replacing any earlier candidate)."""
    # Here, not at the top: loading weights needs torch, which the web part does not
    # import for the pages that only promote or roll back.
    from ddn_node.model.artifact import ArtifactError, ModelArtifact
    from ddn_node.pipeline.registry import AnalysisError, check_candidate

    rule = _rule(settings, rule_name)
    path = candidate.resolve()
    with database.read() as session:
        live_path = assignments.assignment(session, rule.name, rule.model).live
    try:
        live = ModelArtifact.load(live_path)
        checked = check_candidate(rule, live, path)
    except (AnalysisError, ArtifactError) as exc:
        raise PromotionError(str(exc)) from exc
    with database.session() as session:
        assigned = assignments.set_shadow(
            session,
            rule.name,
            rule.model,
            path,
            by=by,
            host=host,
            model=f"{checked.name} {checked.version}",
        )
    return _models(rule, assigned)


def stop_shadow(
    settings: Settings, database: Database, rule_name: str, *, by: str, host: str = ""
) -> RuleModels:
    rule = _rule(settings, rule_name)
    with database.session() as session:
        if assignments.assignment(session, rule.name, rule.model).shadow is None:
            raise PromotionError(f"routing rule {rule.name!r} has no shadow model")
        assigned = assignments.set_shadow(session, rule.name, rule.model, None, by=by, host=host)
    return _models(rule, assigned)


def promote(
    settings: Settings,
    database: Database,
    rule_name: str,
    *,
    by: str,
    host: str = "",
    expect_version: str | None = None,
) -> RuleModels:
    """The rule's candidate becomes live at the next study. ``expect_version``: refuse
    unless the candidate's folder still holds that version (what the monitor compared)."""
    rule = _rule(settings, rule_name)
    with database.session() as session:
        shadow = assignments.assignment(session, rule.name, rule.model).shadow
        if shadow is None:
            raise PromotionError(f"routing rule {rule.name!r} has no shadow model to promote")
        ref = model_ref(shadow)
        if ref.problem:
            raise PromotionError(f"the candidate can no longer be read: {ref.problem}")
        if expect_version is not None and ref.version != expect_version:
            raise PromotionError(
                f"the candidate at {shadow} is now {ref.label}, not version {expect_version}"
            )
        try:
            assigned = assignments.promote(
                session, rule.name, rule.model, by=by, host=host, model=ref.label
            )
        except AssignmentRefused as exc:
            raise PromotionError(str(exc)) from exc
    return _models(rule, assigned)


def rollback(
    settings: Settings, database: Database, rule_name: str, *, by: str, host: str = ""
) -> RuleModels:
    rule = _rule(settings, rule_name)
    try:
        with database.session() as session:
            assigned = assignments.rollback(session, rule.name, rule.model, by=by, host=host)
    except AssignmentRefused as exc:
        raise PromotionError(str(exc)) from exc
    return _models(rule, assigned)
