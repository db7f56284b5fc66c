"""Drift: PSI and KS on distributions with answers worked out by hand, then the monitor
against the bundled model's real reference (models/ddn-cxr/drift_reference.json): a
window drawn from the validation distribution raises nothing; inverted images (intensity
mean and spread halved) with shifted scores raise one audit event per feature crossing, shown in /metrics and on
/admin/drift, and feeding more of them raises no second one."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import pytest
from lxml import etree  # noqa: F401 - the audit message is validated in tests/ops
from sqlalchemy import select
from web_helpers import FAST_HASHER, PASSWORD, ClientFactory, api_headers, login

from ddn_node.config import DriftSettings
from ddn_node.model.drift_reference import DriftReference, load_reference
from ddn_node.pipeline.audit_export import audit_message
from ddn_node.pipeline.drift import (
    ImageInputs,
    ModelKey,
    check,
    image_inputs,
    ks_statistic,
    psi,
    record_inputs,
)
from ddn_node.store.audit import AuditEventName
from ddn_node.store.engine import Database
from ddn_node.store.models import AuditEvent

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "ddn-cxr"
KEY = ModelKey("DDN chest X-ray", "2026.11.27-ddn-cxr", "cxr")
NOW = dt.datetime(2027, 3, 1, 9, 0, tzinfo=dt.UTC)
SETTINGS = DriftSettings(window=120, min_images=100)


def test_psi_matches_hand_computed_values() -> None:
    assert psi([1, 1, 1, 1], [5, 5, 5, 5]) == pytest.approx(0.0)
    # 50/50 against 90/10: 0.4 ln(0.9/0.5) + (-0.4) ln(0.1/0.5)
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(
        0.4 * math.log(1.8) + 0.4 * math.log(5), rel=1e-9
    )
    # Symmetric in the two distributions, and an empty bin is floored, not infinite.
    assert psi([0.9, 0.1], [0.5, 0.5]) == pytest.approx(psi([0.5, 0.5], [0.9, 0.1]))
    assert math.isfinite(psi([0.5, 0.5], [1.0, 0.0]))


def test_ks_matches_hand_computed_values_and_scipy() -> None:
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_statistic([1, 2, 3], [4, 5, 6]) == 1.0  # disjoint
    assert ks_statistic([1, 2, 3], [2, 3, 4]) == pytest.approx(1 / 3)  # F_a(1) - F_b(1)
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 137), rng.normal(0.3, 1.2, 91)
    assert ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic)


def reference() -> DriftReference:
    ref = load_reference(MODEL_DIR)
    assert ref is not None, "models/ddn-cxr/drift_reference.json is missing"
    assert ref.provenance["split"] == "val" and ref.provenance["n_images"] == 144
    return ref


def like_reference(ref: DriftReference, n: int, seed: int) -> list[ImageInputs]:
    """Images drawn from the validation distribution (resampled validation images)."""
    rng = np.random.default_rng(seed)
    labels = [f[2:] for f in ref.numeric if f.startswith("p:")]
    views = [v for v, c in ref.categorical["view"].items() for _ in range(c)]
    picks = rng.integers(0, len(ref.numeric["score"]), n)
    return [
        ImageInputs(
            intensity_mean=ref.numeric["intensity_mean"][i],
            intensity_std=ref.numeric["intensity_std"][i],
            size=int(ref.numeric["size"][i]),
            manufacturer="",
            view=views[int(rng.integers(0, len(views)))],
            score=ref.numeric["score"][i],
            probabilities={lab: ref.numeric[f"p:{lab}"][i] for lab in labels},
        )
        for i in picks
    ]


def rescaled(images: list[ImageInputs]) -> list[ImageInputs]:
    """The same images at half the intensity (a windowing that maps white to mid-grey):
    mean and spread halve; the model, off its inputs, scores them all near 0.9."""
    return [
        ImageInputs(
            intensity_mean=i.intensity_mean / 2,
            intensity_std=i.intensity_std / 2,
            size=i.size,
            manufacturer="Other Vendor",
            view=i.view,
            score=0.9,
            probabilities=dict.fromkeys(i.probabilities, 0.9),
        )
        for i in images
    ]


def feed(db: Database, ref: DriftReference, images: list[ImageInputs]) -> list[str]:
    raised: list[str] = []
    for i, image in enumerate(images):
        with db.session() as session:
            record_inputs(session, KEY, [image], NOW)
        with db.session() as session:
            raised += check(session, KEY, ref, SETTINGS, NOW + dt.timedelta(minutes=i)).raised
    return raised


def drift_audits(db: Database) -> list[AuditEvent]:
    with db.read() as session:
        return list(
            session.scalars(
                select(AuditEvent).where(AuditEvent.event == AuditEventName.DRIFT_ALARM)
            )
        )


def test_image_inputs_reads_pixels_and_header() -> None:
    from pydicom.dataset import Dataset

    header = Dataset()
    header.Rows, header.Columns = 2048, 2500
    header.Manufacturer, header.ViewPosition = "ACME", "PA"
    image = np.zeros((64, 64), dtype=np.float32)
    image[:, :32] = 1.0
    got = image_inputs(image, header, {"Mass": 0.2}, 0.2)
    assert (got.intensity_mean, got.intensity_std) == (pytest.approx(0.5), pytest.approx(0.5))
    assert (got.size, got.manufacturer, got.view) == (2500, "ACME", "PA")


def test_images_like_the_reference_raise_no_alarm(sqlite_database: Database) -> None:
    ref = reference()
    assert feed(sqlite_database, ref, like_reference(ref, 120, seed=1)) == []
    assert drift_audits(sqlite_database) == []


def test_rescaled_images_raise_one_alarm_shown_in_metrics_and_page(
    sqlite_database: Database, make_client: ClientFactory
) -> None:
    ref = reference()
    db = sqlite_database
    normal = like_reference(ref, 100, seed=2)
    assert feed(db, ref, normal) == []
    raised = feed(db, ref, rescaled(like_reference(ref, 60, seed=3)))
    assert "intensity_mean" in raised and "score" in raised
    assert len(raised) == len(set(raised))  # each feature crossed once
    events = drift_audits(db)
    audited = [f for e in events for f in e.detail["features"]]
    assert sorted(audited) == sorted(raised)  # every crossing audited, none twice
    assert all(e.detail["model"] == KEY.model_name and e.outcome == "failure" for e in events)
    assert b"110100" in audit_message(events[0], "DDN_NODE")
    # Still drifted: no further event.
    assert feed(db, ref, rescaled(like_reference(ref, 20, seed=4))) == []
    assert len(drift_audits(db)) == len(events)

    users = [{"name": "officer", "password_hash": FAST_HASHER.hash(PASSWORD), "role": "admin"}]
    client = make_client(db, users=users)
    metrics = client.get("/metrics", headers=api_headers()).text
    line = next(
        x
        for x in metrics.splitlines()
        if x.startswith("ddn_drift_alarm{") and 'feature="intensity_mean"' in x
    )
    assert line.endswith(" 1.0")
    assert 'ddn_drift_alarm{feature="size"' in metrics and 'feature="size"' in metrics
    size_alarm = next(
        x
        for x in metrics.splitlines()
        if x.startswith("ddn_drift_alarm{") and 'feature="size"' in x
    )
    assert size_alarm.endswith(" 0.0")  # the sizes did not change
    login(client, user="officer")
    page = client.get("/admin/drift")
    assert page.status_code == 200
    assert "In alarm:" in page.text and "intensity_mean" in page.text
    assert "Other Vendor (60)" in page.text or "Other Vendor (80)" in page.text
    img = page.text.split('<img src="/admin/drift/', 1)[1].split(".png", 1)[0]
    png = client.get(f"/admin/drift/{img}.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_drift_page_is_for_admins_only(
    sqlite_database: Database, make_client: ClientFactory
) -> None:
    client = make_client(sqlite_database)
    login(client)
    assert client.get("/admin/drift").status_code == 403
