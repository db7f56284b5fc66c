"""A candidate model against the live one on the same reviewed studies: the paired DeLong
difference on a case worked out by hand, the comparison ``ddn-node monitor`` prints and
``/admin/monitor`` shows, and the ``/admin/models`` page where an admin promotes the
candidate or rolls it back (a radiologist gets 403; every change is audited)."""

from __future__ import annotations

import datetime as dt
import html
import math
from pathlib import Path

import pytest
import tomli_w
from sqlalchemy import select
from typer.testing import CliRunner
from web_helpers import FAST_HASHER, PASSWORD, USER, ClientFactory, csrf_of, login
from worklist_factory import MODEL_NAME, MODEL_VERSION, add_study, analyse

from ddn_node.cli.main import app
from ddn_node.pipeline.monitor import auc_delong, auc_difference_delong, build_report
from ddn_node.store.assignments import set_shadow
from ddn_node.store.audit import AuditEventName
from ddn_node.store.engine import Database
from ddn_node.store.feedback import record_feedback, study_ref
from ddn_node.store.models import AuditEvent, Feedback
from ddn_node.store.shadow import ShadowRecord, record_shadow
from ddn_node.vocabulary import Verdict

T0 = dt.datetime(2027, 2, 1, 8, 0, tzinfo=dt.UTC)
CANDIDATE = "2027.02.01-candidate"
AGREE, DISAGREE = Verdict.AGREE, Verdict.DISAGREE


def test_paired_delong_difference_by_hand() -> None:
    # Model 1: positives 0.9, 0.6; negatives 0.5, 0.7 -> components v10 (1, 0.5), v01 (1,
    # 0.5), AUC 0.75. Model 2 ranks every pair right: AUC 1, constant components. So the
    # difference is 0.25 with variance var(1, 0.5)/2 + var(1, 0.5)/2 = 0.0625 + 0.0625.
    d = auc_difference_delong(([0.9, 0.6], [0.5, 0.7]), ([0.8, 0.7], [0.3, 0.6]))
    assert d.value == pytest.approx(0.25)
    half = 1.959963984540054 * math.sqrt(0.125)
    assert d.low == pytest.approx(0.25 - half) and d.high == pytest.approx(0.25 + half)
    # The same model twice: no difference, and no doubt about it.
    same = auc_difference_delong(([0.9, 0.6], [0.5, 0.7]), ([0.9, 0.6], [0.5, 0.7]))
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    # Pairing: a candidate that moves every score a little is judged on the same cases, so
    # its interval is far narrower than the two AUCs' own intervals side by side.
    pos, neg = [0.9, 0.8, 0.6, 0.55, 0.4], [0.7, 0.5, 0.3, 0.2, 0.1, 0.35]
    moved = ([p + 0.02 for p in pos], [n - 0.01 for n in neg])
    paired = auc_difference_delong((pos, neg), moved)
    first, second = auc_delong(pos, neg), auc_delong(*moved)
    assert paired.value == pytest.approx(second.value - first.value)
    assert paired.low is not None and paired.high is not None
    assert first.low is not None and first.high is not None
    assert paired.high - paired.low < 0.5 * (first.high - first.low)


def comparison_set(db: Database) -> list[str]:
    """Mass (threshold 0.5 for both models). Truth per the radiologists: present, present
    (missed by the live model), absent (the live model's false positive), absent, absent.
    Live 0.9 / 0.4 / 0.7 / 0.2 / 0.1: TP 1, FN 1, FP 1, TN 2, AUC (1 + 2/3) / 2 = 5/6.
    Candidate 0.8 / 0.7 / 0.3 / 0.6 / 0.1: TP 2, FP 1, TN 2, AUC 1. A sixth study the
    candidate scored has no review. The candidate would rank the first study STAT."""
    cases = [
        (0.9, AGREE, 0.8),
        (0.4, DISAGREE, 0.7),
        (0.7, DISAGREE, 0.3),
        (0.2, AGREE, 0.6),
        (0.1, AGREE, 0.1),
        (0.3, None, 0.2),
    ]
    uids = []
    for live, verdict, candidate in cases:
        uid = add_study(db)
        uids.append(uid)
        analyse(db, uid, {"Mass": live})
        if verdict is not None:
            record_feedback(db, uid, user="dr-a", now=T0, verdicts={"Mass": verdict})
        with db.session() as session:
            record_shadow(
                session,
                ShadowRecord(
                    study_ref=study_ref(uid),
                    generation=1,
                    rule="cxr",
                    model_name=MODEL_NAME,
                    model_version=CANDIDATE,
                    head="cxr",
                    live_model_name=MODEL_NAME,
                    live_model_version=MODEL_VERSION,
                    probabilities={"Mass": candidate, "Effusion": 0.01},
                    thresholds={"Mass": 0.5, "Effusion": 0.5},
                    positive=["Mass"] if candidate >= 0.5 else [],
                    abnormality_score=candidate,
                    priority="STAT" if uid == uids[0] else "ROUTINE",
                    model_ms=12.0,
                ),
            )
    return uids


def test_monitor_compares_the_candidate_on_the_same_reviewed_studies(
    database: Database,
) -> None:
    comparison_set(database)
    with database.read() as session:
        live_priorities = list(session.scalars(select(Feedback.priority).order_by(Feedback.id)))
    report = build_report(database, ["Pneumothorax"])
    (shadow,) = report.shadows
    assert (shadow.candidate_version, shadow.live_version) == (CANDIDATE, MODEL_VERSION)
    assert (shadow.scored, shadow.reviewed) == (6, 5)
    expected_changes = sum(
        p != ("STAT" if i == 0 else "ROUTINE") for i, p in enumerate(live_priorities)
    )
    assert shadow.priority_changed == expected_changes
    (mass,) = shadow.labels  # Effusion has no verdict: it counts for nothing
    assert (mass.live.tp, mass.live.fn, mass.live.fp, mass.live.tn) == (1, 1, 1, 2)
    assert (mass.candidate.tp, mass.candidate.fn, mass.candidate.fp, mass.candidate.tn) == (
        2,
        0,
        1,
        2,
    )
    assert mass.live.auc is not None and mass.live.auc.value == pytest.approx(5 / 6)
    assert mass.candidate.auc is not None and mass.candidate.auc.value == pytest.approx(1.0)
    assert mass.auc_difference is not None
    assert mass.auc_difference.value == pytest.approx(1 / 6)
    # Five cases: the interval holds 0, and the page and command say what that means.
    assert mass.auc_difference.low is not None and mass.auc_difference.low < 0


def test_monitor_command_and_page_show_the_comparison(
    sqlite_database: Database, sqlite_url: str, tmp_path: Path, make_client: ClientFactory
) -> None:
    comparison_set(sqlite_database)
    config = tmp_path / "node.toml"
    config.write_text(
        tomli_w.dumps(
            {"database": {"url": sqlite_url}, "node": {"spool_dir": str(tmp_path / "spool")}}
        )
    )
    shown = CliRunner().invoke(app, ["monitor", "--config", str(config)], env={"COLUMNS": "240"})
    assert shown.exit_code == 0, shown.output
    out = " ".join(shown.output.split())
    assert (
        f"Shadow: candidate {MODEL_NAME} {CANDIDATE} vs live {MODEL_NAME} {MODEL_VERSION} "
        "(cxr): scored 6 studies, 5 reviewed" in out
    )
    mass = next(
        line
        for line in shown.output.splitlines()
        if line.strip().startswith("Mass") and "+0.17" in line
    )
    assert "0.50 [0.09-0.91] (1/2)" in mass and "1.00 [0.34-1.00] (2/2)" in mass
    assert "0.83" in mass and "1.00" in mass

    users = [{"name": "officer", "password_hash": FAST_HASHER.hash(PASSWORD), "role": "admin"}]
    admin = make_client(sqlite_database, users=users)
    login(admin, user="officer")
    page = admin.get("/admin/monitor")
    assert page.status_code == 200
    assert f"candidate {MODEL_NAME} {CANDIDATE} vs live" in html.unescape(page.text)
    assert "+0.17 [" in page.text and "scored 6 studies" in page.text
    assert '<img src="/admin/monitor/shadow.png?model=0"' in page.text
    figure = admin.get("/admin/monitor/shadow.png?model=0")
    assert figure.status_code == 200 and figure.content.startswith(b"\x89PNG")
    assert admin.get("/admin/monitor/shadow.png?model=1").status_code == 404
    plots = tmp_path / "plots"
    written = CliRunner().invoke(app, ["monitor", "--config", str(config), "--plots", str(plots)])
    assert written.exit_code == 0, written.output
    shadow_plot = plots / f"shadow-DDN-test-model-{CANDIDATE}-vs-DDN-test-model-{MODEL_VERSION}.png"
    assert shadow_plot.read_bytes().startswith(b"\x89PNG"), sorted(plots.iterdir())


USERS = [
    {"name": USER, "password_hash": FAST_HASHER.hash(PASSWORD)},
    {"name": "officer", "password_hash": FAST_HASHER.hash(PASSWORD), "role": "admin"},
]


def test_admin_models_page_promotes_and_rolls_back(
    database: Database, make_client: ClientFactory, tmp_path: Path
) -> None:
    from support.artifacts import make_test_artifact

    live = make_test_artifact(tmp_path / "live", version="1.0-live")
    candidate = make_test_artifact(tmp_path / "candidate", seed=1, version="2.0-candidate")
    with database.session() as session:
        set_shadow(session, "cxr", live, candidate, by="ml-engineer")
    radiologist = make_client(database, live, users=USERS)
    login(radiologist)
    assert radiologist.get("/admin/models").status_code == 403
    admin = make_client(database, live, users=USERS)
    login(admin, user="officer")
    page = admin.get("/admin/models")
    assert page.status_code == 200
    assert "ddn-test 1.0-live" in page.text and "ddn-test 2.0-candidate" in page.text
    token = csrf_of(page.text)
    no_csrf = admin.post("/admin/models/promote", data={"rule": "cxr"})
    assert no_csrf.status_code == 403
    stale = admin.post(
        "/admin/models/promote",
        data={"rule": "cxr", "expect_version": "9.9", "csrf_token": token},
    )
    assert stale.status_code == 409 and "not version 9.9" in stale.text
    done = admin.post(
        "/admin/models/promote",
        data={"rule": "cxr", "expect_version": "2.0-candidate", "csrf_token": token},
    )
    assert done.status_code == 303
    row = admin.get("/admin/models").text
    live_cell = row.split('class="live">', 1)[1].split("<", 1)[0]
    assert live_cell.strip() == "ddn-test 2.0-candidate"
    assert "Roll back to ddn-test 1.0-live" in row
    again = admin.post("/admin/models/promote", data={"rule": "cxr", "csrf_token": token})
    assert again.status_code == 409 and "no shadow model to promote" in again.text
    back = admin.post("/admin/models/rollback", data={"rule": "cxr", "csrf_token": token})
    assert back.status_code == 303
    after = admin.get("/admin/models").text
    assert after.split('class="live">', 1)[1].split("<", 1)[0].strip() == "ddn-test 1.0-live"
    with database.read() as session:
        events = [
            (e.event, e.actor)
            for e in session.scalars(
                select(AuditEvent).where(AuditEvent.event.like("model.%")).order_by(AuditEvent.id)
            )
        ]
    assert events == [
        (AuditEventName.MODEL_SHADOW, "ml-engineer"),
        (AuditEventName.MODEL_PROMOTED, "officer"),
        (AuditEventName.MODEL_ROLLED_BACK, "officer"),
    ]
