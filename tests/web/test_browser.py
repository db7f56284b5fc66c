"""A radiologist's path in headless Chromium, against the real server (uvicorn thread).

Log in, see the studies in priority order, watch a study that the worker has just found
abnormal rise above the normal ones without reloading, mark one read, switch to arrival
order, open a study; screenshots go to $DDN_SCREENSHOT_DIR (else the test's tmp dir).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import select
from support.net import free_port
from web_helpers import PASSWORD, USER, web_settings
from worklist_factory import add_image, add_study, analyse, write_manifest, write_overlay_png

from ddn_node.dicom.spool import Spool
from ddn_node.store.engine import Database
from ddn_node.store.models import Study

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
HOSTILE = "<script>alert(1)</script>"

pytestmark = pytest.mark.slow

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page


@pytest.fixture
def screenshot_dir(tmp_path: Path) -> Path:
    where = Path(os.environ.get("DDN_SCREENSHOT_DIR") or tmp_path / "screenshots")
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest.fixture
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("Debian chromium not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def row_uids(page: Page) -> list[str]:
    uids: list[str] = page.eval_on_selector_all(
        "#rows tr[data-study-uid]", "rows => rows.map(r => r.dataset.studyUid)"
    )
    return uids


def test_radiologist_path(
    browser: Browser, sqlite_database: Database, spool: Spool, tmp_path: Path, screenshot_dir: Path
) -> None:
    from ddn_node.web.server import start_web

    db = sqlite_database
    m = dt.timedelta(minutes=1)
    normal_a = add_study(
        db, patient_name="NORMAL^ANNA", patient_id="P-100", accession="A-100", received_ago=95 * m
    )
    effusion = add_study(
        db, patient_name="EFFUSION^ERIK", patient_id="P-101", accession="A-101", received_ago=80 * m
    )
    normal_b = add_study(
        db,
        patient_name=f"{HOSTILE}^BOB",
        patient_id="P-102",
        accession="A-102",
        description=HOSTILE,
        received_ago=70 * m,
        modalities="DX",
    )
    arriving = add_study(
        db, patient_name="ARRIVING^ALEX", patient_id="P-103", accession="A-103", received_ago=2 * m
    )
    image = add_image(db, spool, effusion, size=128)
    overlay = write_overlay_png(spool, effusion, "9.9.2", size=128)
    analyse(db, normal_a, {"Atelectasis": 0.12})
    analyse(db, normal_b, {"Mass": 0.21})
    analyse(
        db,
        effusion,
        {"Effusion": 0.68, "Atelectasis": 0.31},
        overlays={image.sop_instance_uid: {"Effusion": overlay}},
        deliveries=[("pacs", "sr", "sent")],
    )

    settings = web_settings(
        tmp_path,
        str(db.engine.url),
        write_manifest(tmp_path / "model"),
        host="127.0.0.1",
        port=free_port(),
    )
    stop = start_web(settings, db, spool)
    base = f"http://127.0.0.1:{settings.web.port}"
    try:
        context = browser.new_context(viewport={"width": 1500, "height": 900})
        page = context.new_page()
        problems: list[str] = []
        page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.on(
            "dialog",
            lambda dialog: (problems.append("dialog: " + dialog.message), dialog.dismiss()),
        )

        page.goto(base + "/")
        assert page.url.startswith(base + "/login")
        page.fill("input[name=username]", USER)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("#rows tr[data-study-uid]")
        assert page.url == base + "/"
        # HIGH first, then ROUTINE by score, then the study still waiting for analysis.
        assert row_uids(page) == [effusion, normal_b, normal_a, arriving]
        assert page.inner_text(f"tr[data-study-uid='{normal_b}'] .patient") == f"{HOSTILE}, BOB"

        # The worker finishes the new study: critical finding. No reload: the page polls.
        page.evaluate("window.__sameDocument = true")
        analyse(db, arriving, {"Pneumothorax": 0.93, "Effusion": 0.4})
        page.wait_for_function(
            "uid => document.querySelector('#rows tr[data-study-uid]')?.dataset.studyUid === uid",
            arg=arriving,
            timeout=15_000,
        )
        assert page.evaluate("window.__sameDocument") is True
        assert row_uids(page) == [arriving, effusion, normal_b, normal_a]
        first = page.locator(f"tr[data-study-uid='{arriving}']")
        assert first.locator(".badge").inner_text() == "STAT"
        assert "Pneumothorax" in first.locator(".c-findings").inner_text()
        first.locator("details.why summary").click()
        assert "critical finding: Pneumothorax 0.93" in first.locator("details.why p").inner_text()
        page.screenshot(path=str(screenshot_dir / "worklist.png"), full_page=True)

        # Read one: it leaves the unread list.
        page.locator(f"tr[data-study-uid='{normal_a}'] button", has_text="Mark read").click()
        page.wait_for_selector(f"tr[data-study-uid='{normal_a}']", state="detached", timeout=10_000)
        assert row_uids(page) == [arriving, effusion, normal_b]
        with db.read() as session:
            assert (
                session.execute(
                    select(Study.read_status).where(Study.study_uid == normal_a)
                ).scalar_one()
                == "read"
            )

        # Arrival order: oldest first, the original order kept recoverable.
        page.click("#order-arrival")
        page.wait_for_url(base + "/?order=arrival")
        assert row_uids(page) == [effusion, normal_b, arriving]
        page.select_option("select[name=unread]", "false")
        page.wait_for_url("**unread=false**")
        assert row_uids(page) == [normal_a, effusion, normal_b, arriving]
        page.screenshot(path=str(screenshot_dir / "worklist-arrival.png"), full_page=True)

        # The study: findings with thresholds, the image and the overlay of its findings.
        page.click(f"tr[data-study-uid='{effusion}'] a.patient")
        page.wait_for_selector("table.findings-table")
        assert "EFFUSION, ERIK" in page.inner_text("h1")
        assert (
            page.locator("img[alt='AI findings: Effusion']").evaluate("img => img.naturalWidth") > 0
        )
        assert page.locator("img[alt^='source image']").evaluate("img => img.naturalWidth") > 0
        page.select_option("select[name=priority]", "STAT")
        page.click(".override-form button:text('Override')")
        page.wait_for_selector("text=priority set to STAT")
        assert page.inner_text("#priority-badge") == "STAT"
        page.screenshot(path=str(screenshot_dir / "study.png"), full_page=True)

        # Feedback on the findings: agree with Effusion, add the missed Mass, a note.
        page.check("input[name='verdict:Effusion'][value=agree]")
        page.check("input[name=missed][value=Mass]")
        page.fill("textarea[name=note]", "small left effusion")
        page.click(".feedback-form button:text('Record feedback')")
        page.wait_for_selector("#feedback-history")
        history = page.inner_text("#feedback-history")
        assert "Effusion: agreed" in history and "Mass: missed by the model" in history
        assert "small left effusion" in history
        assert page.is_checked("input[name='verdict:Effusion'][value=agree]")
        page.screenshot(path=str(screenshot_dir / "study-feedback.png"), full_page=True)

        assert problems == []
        context.close()
    finally:
        stop()
