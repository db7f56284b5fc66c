"""The monitor: figures on a constructed feedback set whose answers were worked out by hand
(sensitivity, PPV, AUC and their intervals, the precision of STAT, the triage effect
against arrival order), the same report from ``ddn-node monitor`` with its plots, and the
admin page (403 for a radiologist)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import tomli_w
from sqlalchemy import update
from typer.testing import CliRunner
from web_helpers import FAST_HASHER, PASSWORD, USER, ClientFactory, login
from worklist_factory import MODEL_NAME, MODEL_VERSION, add_study, analyse

from ddn_node.cli.main import app
from ddn_node.pipeline.monitor import auc_delong, build_report, wilson
from ddn_node.pipeline.monitor_plots import roc_points, time_to_read_png
from ddn_node.store.engine import Database
from ddn_node.store.feedback import record_feedback
from ddn_node.store.models import Result, Study, WorklistEvent
from ddn_node.vocabulary import Verdict

T0 = dt.datetime(2027, 2, 1, 8, 0, tzinfo=dt.UTC)
H = dt.timedelta(hours=1)
NEXT_VERSION = "2027.01.15-next"
AGREE, DISAGREE = Verdict.AGREE, Verdict.DISAGREE


def review(db: Database, uid: str, at: dt.datetime, **kwargs: object) -> None:
    record_feedback(db, uid, user="dr-a", now=at, **kwargs)  # type: ignore[arg-type]


def feedback_set(db: Database) -> None:
    """Mass (threshold 0.5): present per the radiologists at 0.9, 0.8 (reported, agreed)
    and 0.4 (missed); absent at 0.7 (reported, disagreed: on the second review) and 0.3,
    0.2, 0.1 (confirmed absent). So TP 2, FP 1, FN 1, TN 3, and the AUC is 11 of 12 pairs.
    Three STAT results (Pneumothorax, critical, threshold 0.4): one confirmed, one not,
    one with a verdict on Effusion only (cannot judge its STAT). One result of another
    model version."""
    for p, verdict in ((0.9, AGREE), (0.8, AGREE), (0.4, DISAGREE), (0.7, AGREE)):
        uid = add_study(db)
        analyse(db, uid, {"Mass": p})
        review(db, uid, T0, verdicts={"Mass": verdict})
        if p == 0.7:  # a second radiologist corrects the first: the latest verdict counts
            review(db, uid, T0 + H, verdicts={"Mass": DISAGREE}, note="calcified granuloma")
    for p in (0.3, 0.2, 0.1):
        uid = add_study(db)
        analyse(db, uid, {"Mass": p})
        review(db, uid, T0, verdicts={"Mass": AGREE})
    for pneumothorax, verdicts in (
        (0.6, {"Pneumothorax": AGREE}),
        (0.5, {"Pneumothorax": DISAGREE}),
        (0.45, {"Effusion": AGREE}),
    ):
        uid = add_study(db)
        analyse(db, uid, {"Pneumothorax": pneumothorax, "Effusion": 0.6})
        review(db, uid, T0, verdicts=verdicts)
    uid = add_study(db)
    analyse(db, uid, {"Mass": 0.9})
    with db.session() as session:
        session.execute(
            update(Result)
            .where(Result.study_id == Study.id, Study.study_uid == uid)
            .values(model_version=NEXT_VERSION)
        )
    review(db, uid, T0, verdicts={"Mass": AGREE})


def test_statistics_match_hand_computed_values() -> None:
    # Wilson 2/3: centre (2/3 + z^2/6) / (1 + z^2/3), half-width z sqrt(2/27 + z^2/36) / (...)
    p = wilson(2, 3)
    assert p.value == pytest.approx(2 / 3)
    assert (p.low, p.high) == (pytest.approx(0.2077, abs=1e-4), pytest.approx(0.9385, abs=1e-4))
    one_of_two = wilson(1, 2)
    assert (one_of_two.low, one_of_two.high) == (
        pytest.approx(0.0945, abs=1e-4),
        pytest.approx(0.9055, abs=1e-4),
    )
    assert wilson(0, 0).value is None and wilson(5, 5).high == 1.0
    # DeLong: V10 = (1, 1, 3/4), V01 = (2/3, 1, 1, 1); var = 0.0208/3 + 0.0278/4 = 0.01389.
    auc = auc_delong([0.9, 0.8, 0.4], [0.7, 0.3, 0.2, 0.1])
    assert auc.value == pytest.approx(11 / 12)
    assert auc.low == pytest.approx(11 / 12 - 1.959964 * 0.0138889**0.5, abs=1e-5)
    assert auc.low == pytest.approx(0.6857, abs=1e-4) and auc.high == 1.0  # clipped
    # Ties count half; one of a class: no interval.
    tied = auc_delong([0.5], [0.5, 0.2])
    assert tied.value == pytest.approx(0.75) and tied.low is None


def test_roc_points_step_through_every_threshold(sqlite_database: Database) -> None:
    feedback_set(sqlite_database)
    (mass,) = [
        lab for lab in build_report(sqlite_database, []).models[0].labels if lab.label == "Mass"
    ]
    # Scores 0.9+ 0.8+ 0.7- 0.4+ 0.3- 0.2- 0.1-: 3 positives, 4 negatives.
    assert roc_points(mass.scored) == [
        (0.0, 0.0),
        (0.0, 1 / 3),
        (0.0, 2 / 3),
        (0.25, 2 / 3),
        (0.25, 1.0),
        (0.5, 1.0),
        (0.75, 1.0),
        (1.0, 1.0),
    ]


def test_report_per_model_version_and_label(sqlite_database: Database) -> None:
    feedback_set(sqlite_database)
    report = build_report(sqlite_database, ["Pneumothorax"])
    assert [(m.model_version, m.results_reviewed) for m in report.models] == [
        (MODEL_VERSION, 10),
        (NEXT_VERSION, 1),
    ]
    current, following = report.models
    labels = {lab.label: lab for lab in current.labels}
    assert sorted(labels) == ["Effusion", "Mass", "Pneumothorax"]
    mass = labels["Mass"]
    assert (mass.tp, mass.fp, mass.fn, mass.tn) == (2, 1, 1, 3)
    assert (mass.sensitivity.k, mass.sensitivity.n) == (2, 3)
    assert mass.sensitivity.low == pytest.approx(0.2077, abs=1e-4)
    assert (mass.ppv.k, mass.ppv.n) == (2, 3)
    assert mass.auc is not None and mass.auc.value == pytest.approx(11 / 12)
    assert (mass.auc.positives, mass.auc.negatives) == (3, 4)
    assert mass.auc.low == pytest.approx(0.6857, abs=1e-4)
    pneumothorax = labels["Pneumothorax"]
    assert (pneumothorax.tp, pneumothorax.fp) == (1, 1)
    # One of each class (0.6 present, 0.5 not): an AUC, but no interval from one of each.
    assert pneumothorax.auc is not None and pneumothorax.auc.value == 1.0
    assert pneumothorax.auc.low is None
    assert (current.stat_precision.k, current.stat_precision.n) == (1, 2)
    assert current.stat_precision.low == pytest.approx(0.0945, abs=1e-4)
    (mass_next,) = following.labels
    assert (mass_next.label, mass_next.tp, mass_next.auc) == ("Mass", 1, None)


def test_triage_effect_against_arrival_order(database: Database) -> None:
    """Routine R1 arrives at 0 h, R2 at 1 h, urgent U1 at 2 h, U2 at 3 h; read at 1, 2.5,
    3.5 and 4 h (R1, U1, U2, R2). As read: urgent waits 0.5 and 0.5 h, routine 1 and 3 h.
    In arrival order the same moments go R1, R2, U1, U2: urgent 1.5 and 1 h, routine 1
    and 1.5 h. The sums agree (5 h), the medians move: urgent 0.5 h against 1.25 h."""
    arrivals = {"R1": (0, "ROUTINE", 1), "R2": (1, "ROUTINE", 4), "U1": (2, "STAT", 2.5)}
    arrivals |= {"U2": (3, "HIGH", 3.5), "U3": (3, "STAT", None), "N": (0, "NOT_ANALYSED", 2)}
    for n, (hours, priority, read) in enumerate(arrivals.values()):
        uid = add_study(
            database, study_uid=f"1.2.3.{n}", received_ago=dt.timedelta(0), now=T0 + hours * H
        )
        with database.session() as session:
            study = session.query(Study).filter_by(study_uid=uid).one()
            study.priority = priority
            session.add(
                WorklistEvent(study_id=study.id, user=USER, action="opened", value="", at=T0)
            )
            if read is not None:
                for n, action in enumerate(("read", "unread", "read")):
                    # Read, unread, read again: the first read counts.
                    session.add(
                        WorklistEvent(
                            study_id=study.id, user=USER, action=action, value=action,
                            at=T0 + read * H + n * 5 * H,
                        )
                    )  # fmt: skip
    effect = build_report(database, ["Pneumothorax"]).triage
    assert sorted(effect.urgent.waits_s) == [1800.0, 1800.0]
    assert sorted(effect.urgent.baseline_waits_s) == [3600.0, 5400.0]
    assert sorted(effect.routine.waits_s) == [3600.0, 10800.0]
    assert sorted(effect.routine.baseline_waits_s) == [3600.0, 5400.0]
    assert (effect.urgent.median_s, effect.urgent.baseline_median_s) == (1800.0, 4500.0)
    assert (effect.routine.median_s, effect.routine.baseline_median_s) == (7200.0, 4500.0)
    assert (effect.urgent.not_read, effect.routine.not_read) == (1, 0)
    assert effect.reads_per_hour == pytest.approx(4 / 4)  # 4 reads from 0 h to 4 h
    figure = time_to_read_png(effect)
    assert figure is not None and figure.startswith(b"\x89PNG")


def test_monitor_command_prints_the_report_and_writes_plots(
    sqlite_database: Database, sqlite_url: str, tmp_path: Path
) -> None:
    feedback_set(sqlite_database)
    config = tmp_path / "node.toml"
    config.write_text(
        tomli_w.dumps(
            {"database": {"url": sqlite_url}, "node": {"spool_dir": str(tmp_path / "spool")}}
        )
    )
    runner = CliRunner()
    plots = tmp_path / "plots"
    shown = runner.invoke(
        app, ["monitor", "--config", str(config), "--plots", str(plots)], env={"COLUMNS": "200"}
    )
    assert shown.exit_code == 0, shown.output
    out = shown.output
    assert f"{MODEL_NAME} {MODEL_VERSION}: 10 results reviewed" in out
    mass = next(line for line in out.splitlines() if line.strip().startswith("Mass"))
    assert mass.split()[1:5] == ["2", "1", "1", "3"]
    assert "0.67 [0.21-0.94] (2/3)" in mass and "0.92 [0.69-1.00] (3+/4-)" in mass
    assert (
        "precision of STAT (a critical finding confirmed: Pneumothorax): 0.50 [0.09-0.91] (1/2)"
        in out
    )
    assert f"{MODEL_NAME} {NEXT_VERSION}: 1 results reviewed" in out
    names = sorted(p.name for p in plots.iterdir())
    assert names == [
        "calibration-DDN-test-model-2026.11.27-test.png",
        "calibration-DDN-test-model-2027.01.15-next.png",
        "roc-DDN-test-model-2026.11.27-test.png",  # the next version has one class: no ROC
    ]
    assert all((plots / n).read_bytes().startswith(b"\x89PNG") for n in names)

    as_json = runner.invoke(app, ["monitor", "--config", str(config), "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    mass_json = next(lab for lab in data["models"][0]["labels"] if lab["label"] == "Mass")
    assert mass_json["auc"]["value"] == pytest.approx(11 / 12)
    assert "scored" not in mass_json


def test_admin_monitor_page_and_figures(
    sqlite_database: Database, make_client: ClientFactory
) -> None:
    feedback_set(sqlite_database)
    users = [
        {"name": USER, "password_hash": FAST_HASHER.hash(PASSWORD)},
        {"name": "officer", "password_hash": FAST_HASHER.hash(PASSWORD), "role": "admin"},
    ]
    radiologist = make_client(sqlite_database, users=users)
    login(radiologist)
    for url in ("/admin/monitor", "/admin/monitor/roc.png"):
        assert radiologist.get(url).status_code == 403

    admin = make_client(sqlite_database, users=users)
    login(admin, user="officer")
    page = admin.get("/admin/monitor")
    assert page.status_code == 200
    assert "0.67 [0.21-0.94] (2/3)" in page.text and "0.50 [0.09-0.91] (1/2)" in page.text
    assert '<img src="/admin/monitor/roc.png?model=0"' in page.text
    assert "/admin/monitor/roc.png?model=1" not in page.text  # one class: nothing to draw
    roc = admin.get("/admin/monitor/roc.png?model=0")
    assert roc.status_code == 200 and roc.content.startswith(b"\x89PNG")
    assert admin.get("/admin/monitor/calibration.png?model=1").status_code == 200
    assert admin.get("/admin/monitor/roc.png?model=1").status_code == 404
    assert admin.get("/admin/monitor/time-to-read.png").status_code == 404  # nothing read
    assert admin.get("/admin/monitor/other.png").status_code == 404
