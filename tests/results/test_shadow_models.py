"""Shadow and swap through a running node (``ddn-node serve``, SCP + worker) with Orthanc as
the PACS, on both databases, driven by the commands an ML engineer types:

1. ``ddn-node model shadow``: the candidate scores the same study after the live report;
   the PACS receives the live model's SR only, and the candidate's verdict is stored
   under the study's sha256 with the live model's name beside it. Its probabilities are
   what the candidate says of the same image run on its own.
2. ``ddn-node model promote``: the same node process (no restart) reports the next study
   with the candidate: its SR in the PACS names the candidate's version, the result row
   too, and the candidate's weights were loaded once (as the shadow).
3. ``ddn-node model rollback``: the next study is the first model's again.
4. A candidate whose weights are damaged after it was put in shadow: the live analysis
   goes on and is delivered; the failure is logged, nothing is stored for the candidate.

Every change is in the audit trail under the engineer's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from results.conftest import worker_config
from sqlalchemy import select
from support.artifacts import make_test_artifact
from support.dicomgen import make_cr, raw_association, store_file
from support.net import wait_for
from support.orthanc import Orthanc
from support.sr_reader import read_sr
from typer.testing import CliRunner
from typer.testing import Result as CliResult

from ddn_node.cli.main import app
from ddn_node.dicom.pixels import load_display_image
from ddn_node.model.artifact import ModelArtifact
from ddn_node.model.inference import Predictor
from ddn_node.pipeline.monitor import build_report
from ddn_node.store.audit import AuditEventName
from ddn_node.store.engine import make_database
from ddn_node.store.feedback import record_feedback, study_ref
from ddn_node.store.models import AuditEvent, Delivery, Result, ShadowResult, Study
from ddn_node.vocabulary import Verdict

RULE = "chest-xray"


def _rows(db_url: str, study_uid: str) -> tuple[Result | None, list[ShadowResult], list[Delivery]]:
    db = make_database(db_url)
    try:
        with db.read() as s:
            study_id = s.scalars(select(Study.id).where(Study.study_uid == study_uid)).first()
            if study_id is None:
                return None, [], []
            result = s.scalars(select(Result).where(Result.study_id == study_id)).first()
            shadows = list(
                s.scalars(
                    select(ShadowResult).where(ShadowResult.study_ref == study_ref(study_uid))
                )
            )
            deliveries = list(s.scalars(select(Delivery).where(Delivery.study_id == study_id)))
            s.expunge_all()
            return result, shadows, deliveries
    finally:
        db.dispose()


def _audit(db_url: str) -> list[tuple[str, str, dict[str, Any]]]:
    db = make_database(db_url)
    try:
        with db.read() as s:
            rows = s.scalars(
                select(AuditEvent).where(AuditEvent.event.like("model.%")).order_by(AuditEvent.id)
            )
            return [(r.event, r.actor, dict(r.detail or {})) for r in rows]
    finally:
        db.dispose()


class _Sender:
    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp, self.port, self.sent = tmp, port, 0

    def study(self) -> tuple[str, Path]:
        """A new one-image CR study, stored at the node; its UID and its file."""
        self.sent += 1
        uid = generate_uid()
        path = self.tmp / f"study{self.sent}.dcm"
        make_cr(uid, seed=self.sent, patient_id=f"PID-SHADOW-{self.sent}").save_as(
            path, enforce_file_format=True
        )
        with raw_association(self.port) as assoc:
            assert store_file(assoc, path) == 0
        return uid, path


def _command(node: Any, *args: str) -> CliResult:
    """``ddn-node ARGS --config <the node's>``, run in this process: the same code as the
    command, without an interpreter loading torch for each (half a minute of the suite)."""
    return CliRunner().invoke(app, [*args, "--config", str(node.config_path)])


def _delivered(db_url: str, uid: str) -> Result:
    def done() -> Result | None:
        result, _shadows, deliveries = _rows(db_url, uid)
        if result is None or result.completed_at is None or not deliveries:
            return None
        return result if all(d.state == "sent" for d in deliveries) else None

    return wait_for(done, 180, f"study {uid} analysed and delivered")


def _pacs_sr_version(pacs: Orthanc, uid: str) -> list[str | None]:
    return [read_sr(d).algorithm_version for d in pacs.instance_datasets(uid) if d.Modality == "SR"]


def test_shadow_promote_and_rollback_in_a_running_node(
    make_node, db_url: str, pacs: Orthanc, tmp_path: Path
) -> None:
    live_dir = make_test_artifact(tmp_path / "live", threshold=0.5, seed=0, version="1.0-live")
    cand_dir = make_test_artifact(
        tmp_path / "candidate", threshold=0.5, seed=1, version="2.0-candidate"
    )
    node = make_node(db_url, roles=("scp", "worker"), **worker_config(live_dir, pacs))
    with node:
        pid = node.proc.pid if node.proc else None
        send = _Sender(tmp_path, node.port)
        put = _command(node, "model", "shadow", RULE, str(cand_dir), "--by", "ml-engineer")
        assert put.exit_code == 0, put.stderr
        assert "live ddn-test 1.0-live; shadow ddn-test 2.0-candidate" in put.stdout

        # 1. Shadow: stored, never sent.
        uid1, file1 = send.study()
        result1 = _delivered(db_url, uid1)
        assert result1.model_version == "1.0-live"
        shadows = wait_for(lambda: _rows(db_url, uid1)[1], 60, "the candidate's verdict")
        (shadow,) = shadows
        assert (shadow.model_version, shadow.live_model_version) == ("2.0-candidate", "1.0-live")
        assert shadow.rule == RULE and shadow.generation == 1
        assert shadow.probabilities != result1.probabilities  # another model, other weights
        on_its_own = Predictor(ModelArtifact.load(cand_dir), threads=1).predict(
            [load_display_image(pydicom.dcmread(file1))], head="cxr", heatmaps=False
        )[0]
        for label, p in on_its_own.probabilities.items():
            assert abs(shadow.probabilities[label] - p) < 1e-4, label  # ONNX trunk vs torch
        assert set(shadow.positive) == {
            lab for lab, p in shadow.probabilities.items() if p >= shadow.thresholds[lab]
        }
        _r, _s, deliveries = _rows(db_url, uid1)
        assert {d.result_id for d in deliveries} == {result1.id}
        assert _pacs_sr_version(pacs, uid1) == ["1.0-live"]
        # A radiologist's verdict on the live result is what both are judged by.
        db = make_database(db_url)
        try:
            record_feedback(db, uid1, user="dr-a", verdicts={"Effusion": Verdict.AGREE})
            (compared,) = build_report(db, []).shadows
        finally:
            db.dispose()
        assert (compared.scored, compared.reviewed) == (1, 1)
        assert (compared.live_name, compared.candidate_name) == ("DDN test model",) * 2
        assert [lab.label for lab in compared.labels] == ["Effusion"]

        # 2. Promotion, in the same process.
        promoted = _command(
            node,
            "model",
            "promote",
            RULE,
            "--by",
            "ml-engineer",
            "--expect-version",
            "2.0-candidate",
        )
        assert promoted.exit_code == 0, promoted.stderr
        assert "live ddn-test 2.0-candidate; shadow none" in promoted.stdout
        status = _command(node, "model", "status")
        assert "promoted" in status.stderr + status.stdout
        uid2, _ = send.study()
        result2 = _delivered(db_url, uid2)
        assert result2.model_version == "2.0-candidate"
        assert _pacs_sr_version(pacs, uid2) == ["2.0-candidate"]
        assert _rows(db_url, uid2)[1] == []  # nothing shadows it now
        loads = [e for e in node.events() if e.get("event") == "worker.model_loaded"]
        assert [e["version"] for e in loads] == ["1.0-live", "2.0-candidate"]

        # 3. Rollback.
        back = _command(node, "model", "rollback", RULE, "--by", "ml-engineer")
        assert back.exit_code == 0, back.stderr
        assert "live ddn-test 1.0-live" in back.stdout
        uid3, _ = send.study()
        assert _delivered(db_url, uid3).model_version == "1.0-live"
        assert _pacs_sr_version(pacs, uid3) == ["1.0-live"]

        # 4. A candidate that breaks after it was checked never touches the live result.
        broken = make_test_artifact(tmp_path / "broken", seed=2, version="3.0-broken")
        assert (
            _command(node, "model", "shadow", RULE, str(broken), "--by", "ml-engineer").exit_code
            == 0
        )
        weights = broken / "weights.safetensors"
        weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
        uid4, _ = send.study()
        assert _delivered(db_url, uid4).model_version == "1.0-live"
        assert _rows(db_url, uid4)[1] == []
        failed = [e for e in node.events() if e.get("event") == "worker.shadow_failed"]
        assert failed and "sha256" in failed[0]["error"]
        assert node.proc is not None and node.proc.pid == pid  # never restarted

    events = _audit(db_url)
    assert [(e, actor) for e, actor, _d in events] == [
        (AuditEventName.MODEL_SHADOW, "ml-engineer"),
        (AuditEventName.MODEL_PROMOTED, "ml-engineer"),
        (AuditEventName.MODEL_ROLLED_BACK, "ml-engineer"),
        (AuditEventName.MODEL_SHADOW, "ml-engineer"),
    ]
    assert events[1][2]["model"] == "ddn-test 2.0-candidate"
    assert events[1][2]["replaced"] == str(live_dir)


def test_shadow_refuses_what_cannot_be_compared(make_node, sqlite_url: str, tmp_path: Path) -> None:
    """The checks a candidate passes before it runs: each refusal exits 2 and says why,
    and the rule is left as it was."""
    live_dir = make_test_artifact(tmp_path / "live", version="1.0-live")
    node = make_node(
        sqlite_url,
        roles=("scp",),
        routing=[{"name": RULE, "model": str(live_dir), "head": "cxr"}],
    )
    same = make_test_artifact(tmp_path / "same", seed=5, version="1.0-live")
    cases = {
        "no routing rule 'nope'": ("nope", str(live_dir)),
        "not a loadable model artifact": (RULE, str(tmp_path / "missing")),
        "with other weights: give it its own version": (RULE, str(same)),
        "is ddn-test 1.0-live itself": (RULE, str(live_dir)),
    }
    with node:
        for expected, (rule, folder) in cases.items():
            refused = _command(node, "model", "shadow", rule, folder, "--by", "me")
            assert refused.exit_code == 2, (expected, refused.stdout)
            assert expected in " ".join(refused.stderr.split()), refused.stderr
        nothing = _command(node, "model", "promote", RULE, "--by", "me")
        assert nothing.exit_code == 2 and "no shadow model to promote" in nothing.stderr
        back = _command(node, "model", "rollback", RULE, "--by", "me")
        assert back.exit_code == 2 and "nothing to roll back" in back.stderr
        status = _command(node, "model", "status")
        assert status.exit_code == 0 and "1.0-live" in status.stdout + status.stderr
    assert _audit(sqlite_url) == []
