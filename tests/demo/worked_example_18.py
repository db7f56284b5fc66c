"""The worked example of issue 18, from the demo: feedback entered in the browser, the
``monitor`` report, a drift alarm provoked by feeding other images, a shadow model
compared and promoted. Not a test (pytest does not collect it): it prints the figures.

    .venv/bin/python tests/demo/worked_example_18.py --candidate DIR [--home var/example18]

``DIR`` is a candidate artifact of the bundled model, e.g. its cxr head refitted on the
frozen backbone (train + validation patients only, see ``docs/operations.md``)::

    ddn-node train --add-head-to models/ddn-cxr --head cxr --folds 4 \\
        --images ../shared/data/nih/png256 --labels ../shared/data/nih/labels.csv \\
        --version 2026.12.01-cxr-refit --out /work/candidates/ddn-cxr-refit --no-progress

What it does:

1. ``ddn-node demo`` (node + Orthanc + the four sample studies), with a drift window of
   100 images (judged from 100, as by default) so that the example is short;
2. the candidate put in shadow (``ddn-node model shadow``);
3. ``--studies`` NIH ChestX-ray14 images of the bundled model's **test** patients (never
   trained or tuned on by either model), each as a one-image CR study, sent to the node;
4. in headless Chromium, logged in as the demo radiologist, in the worklist's order, a
   review of every one of them on its study page, the NIH labels standing in for the
   radiologist (agree / disagree with each reported finding, tick the missed ones, the
   rest confirmed absent), then "Mark read";
5. ``ddn-node monitor`` (and its plots);
6. ``--drift-images`` more test-patient images, inverted (a modality sending MONOCHROME1
   pixels labelled MONOCHROME2) from another manufacturer: the drift alarm, its audit
   event and /metrics;
7. ``ddn-node model promote``; one more study, whose SR names the candidate's version.

The NIH labels are text-mined from reports (about 90 % accurate): they simulate a reader
here, they are not one.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from support.sr_reader import read_sr  # noqa: E402

from ddn_node.config import load_settings  # noqa: E402
from ddn_node.dicom.scu import Peer, StoreSCU  # noqa: E402
from ddn_node.store.engine import make_database  # noqa: E402

NIH = REPO.parent / "shared" / "data" / "nih"
CHROMIUM = "/usr/bin/chromium"
CR = "1.2.840.10008.5.1.4.1.1.1"


def run(*args: str, config: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ddn_node", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200"},
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"ddn-node {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


def test_images(n_total: int) -> list[tuple[str, str, list[str], tuple[int, int]]]:
    """(file, view, findings, original (width, height)) of the bundled model's test
    patients, in file order."""
    with (REPO / "models" / "ddn-cxr" / "split.csv").open() as fh:
        split = {r["file"]: r["split"] for r in csv.DictReader(fh)}
    out = []
    with (NIH / "labels.csv").open() as fh:
        for row in csv.DictReader(fh):
            if split.get(row["Image Index"]) != "test":
                continue
            findings = [f for f in row["Finding Labels"].split("|") if f != "No Finding"]
            size = (int(row["OrigWidth"]), int(row["OrigHeight"]))
            out.append((row["Image Index"], row["View Position"], findings, size))
    return out[:n_total]


def cr_study(
    png: Path,
    view: str,
    size: tuple[int, int],
    *,
    index: int,
    inverted: bool,
    manufacturer: str,
) -> Dataset:
    """A one-image CR study of an NIH image as a modality would send it: as large as the
    original radiograph's long side (what the drift reference records), square (NIH
    released its images squashed to squares: a 2450 x 2839 frame of the same pixels would
    move Effusion from 0.53 to 0.33 for the first test image, the model never having seen
    a chest at its true proportions), with a window over the full 8-bit range (without one
    the node windows at the 0.5-99.5 percentiles, which the reference, computed from the
    PNGs, did not). The node's probabilities for it are then within 0.014 of the PNG's."""
    side = max(size)
    image = Image.open(png).convert("L").resize((side, side), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    if inverted:
        pixels = 255 - pixels
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName = f"EXAMPLE^{index:03d}"
    ds.PatientID = f"EX-{index:05d}"
    ds.AccessionNumber = f"EXA{index:05d}"
    ds.StudyDate = ds.SeriesDate = time.strftime("%Y%m%d")
    ds.StudyTime = time.strftime("%H%M%S")
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", view
    ds.Manufacturer = manufacturer
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.WindowCenter, ds.WindowWidth = 127.5, 256
    ds.PixelData = pixels.tobytes()
    return ds


def send(files: list[Path], port: int) -> None:
    outcomes = StoreSCU("DDN_SEND", Peer("DDN_NODE", "127.0.0.1", port)).send(files)
    bad = [o for o in outcomes if not o.ok]
    if bad:
        raise SystemExit(f"not stored: {[(o.path.name, o.error) for o in bad]}")


def wait_analysed(db_url: str, uids: set[str], timeout: float = 1800) -> None:
    from sqlalchemy import select

    from ddn_node.store.models import Study

    db = make_database(db_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with db.read() as s:
                done = set(
                    s.scalars(
                        select(Study.study_uid).where(
                            Study.study_uid.in_(uids), Study.state == "analysed"
                        )
                    )
                )
            if done == uids:
                return
            time.sleep(1)
    finally:
        db.dispose()
    raise SystemExit(f"{len(uids - done)} studies not analysed in {timeout} s")


@contextlib.contextmanager
def logged_in(base: str, user: str) -> Iterator[Any]:
    """A headless Chromium page, logged in to the demo's web part as ``user``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], headless=True
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(f"{base}/login")
        page.fill("input[name=username]", user)
        page.fill("input[name=password]", user)  # the demo's passwords are the names
        page.click("button[type=submit]")
        try:
            yield page
        finally:
            browser.close()


def review_in_browser(base: str, studies: dict[str, list[str]], shots: Path) -> int:
    """Each study's page, as the radiologist: a verdict from the NIH labels, submitted."""
    reviewed = 0
    with logged_in(base, "radiologist") as page:
        # In the worklist's order, as a radiologist reads: most urgent first.
        page.goto(f"{base}/?limit=200")
        order: list[str] = page.eval_on_selector_all(
            "#rows tr[data-study-uid]", "rows => rows.map(r => r.dataset.studyUid)"
        )
        page.screenshot(path=str(shots / "worklist.png"), full_page=True)
        for i, uid in enumerate(u for u in order if u in studies):
            truth = studies[uid]
            page.goto(f"{base}/studies/{uid}#feedback")
            for radio in page.query_selector_all("input[type=radio][name^='verdict:']"):
                label = radio.get_attribute("name").split(":", 1)[1]
                wanted = "agree" if label in truth else "disagree"
                if radio.get_attribute("value") == wanted:
                    radio.check()
            for box in page.query_selector_all("input[type=checkbox][name=missed]"):
                if box.get_attribute("value") in truth:
                    box.check()
            if i == 0:
                page.screenshot(path=str(shots / "feedback-form.png"), full_page=True)
            page.click("form.feedback-form button[type=submit]")
            page.wait_for_selector("#feedback-history")
            page.click("button[name=status][value=read]")
            page.wait_for_selector("#read-status.read-status-read")
            reviewed += 1
    return reviewed


def admin_page(base: str, path: str, shots: Path, name: str) -> None:
    with logged_in(base, "admin") as page:
        page.goto(f"{base}{path}")
        page.screenshot(path=str(shots / name), full_page=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidate", type=Path, required=True)
    parser.add_argument("--home", type=Path, default=REPO / "var" / "example18")
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--drift-images", type=int, default=43)
    args = parser.parse_args()
    home: Path = args.home.resolve()
    if home.exists():
        subprocess.run(["rm", "-rf", str(home)], check=True)
    home.mkdir(parents=True)
    shots = home / "screenshots"
    shots.mkdir()
    base_config = home / "base.toml"
    example = (REPO / "deploy" / "ddn-node.example.toml").read_text()
    base_config.write_text(re.sub(r"\nwindow = 200 .*\n", "\nwindow = 100\n", example))
    out = home / "demo.out"
    handle = open(out, "w")  # noqa: SIM115 - closed at the end
    demo = subprocess.Popen(
        [sys.executable, "-m", "ddn_node", "demo", "--home", str(home / "demo"),
         "--config", str(base_config)],
        stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
        env={**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        t0 = time.monotonic()
        while "Press Ctrl-C" not in out.read_text():
            if demo.poll() is not None:
                raise SystemExit(out.read_text())
            time.sleep(1)
        print(f"demo up with its 4 sample studies in {time.monotonic() - t0:.0f} s")
        config = home / "demo" / "ddn-node.toml"
        settings = load_settings(config)
        web = f"http://127.0.0.1:{settings.web.port}"
        port, db_url = settings.node.port, settings.database.url

        print(run("model", "shadow", "chest-xray", str(args.candidate), "--by", "ml-engineer",
                  config=config).strip())  # fmt: skip

        chosen = test_images(args.studies + args.drift_images + 1)
        normal, drifted, last = (
            chosen[: args.studies],
            chosen[args.studies : -1],
            chosen[-1],
        )
        files, truth = [], {}
        for i, (name, view, findings, size) in enumerate(normal):
            ds = cr_study(
                NIH / "png256" / name, view, size, index=i, inverted=False, manufacturer="NIH"
            )
            path = home / f"n{i:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
            truth[str(ds.StudyInstanceUID)] = findings
        t0 = time.monotonic()
        send(files, port)
        wait_analysed(db_url, set(truth))
        print(f"{len(files)} test-patient studies analysed (live + shadow) in "
              f"{time.monotonic() - t0:.0f} s")  # fmt: skip

        t0 = time.monotonic()
        reviewed = review_in_browser(web, truth, shots)
        print(f"{reviewed} reviews entered in the browser in {time.monotonic() - t0:.0f} s")

        plots = home / "plots"
        report = run("monitor", "--plots", str(plots), config=config)
        print(report)
        (home / "monitor.txt").write_text(report)
        (home / "monitor.json").write_text(run("monitor", "--json", config=config))

        files = []
        drift_uids = set()
        for i, (name, view, _findings, size) in enumerate(drifted):
            ds = cr_study(NIH / "png256" / name, view, size, index=500 + i, inverted=True,
                          manufacturer="OTHER VENDOR")  # fmt: skip
            path = home / f"d{i:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
            drift_uids.add(str(ds.StudyInstanceUID))
        send(files, port)
        wait_analysed(db_url, drift_uids)
        db = make_database(db_url)
        try:
            from sqlalchemy import select

            from ddn_node.store.models import AuditEvent

            with db.read() as s:
                alarms = [
                    (e.at.isoformat(timespec="seconds"), e.detail)
                    for e in s.scalars(
                        select(AuditEvent).where(AuditEvent.event == "model.drift_alarm")
                    )
                ]
        finally:
            db.dispose()
        print(f"after {len(files)} inverted images from another manufacturer: "
              f"{len(alarms)} drift alarm(s)")  # fmt: skip
        for at, detail in alarms:
            print(" ", at, json.dumps(detail)[:1500])
        request = urllib.request.Request(
            f"{web}/metrics", headers={"Authorization": "Bearer demo-token"}
        )
        metrics = urllib.request.urlopen(request).read().decode()
        print("\n".join(line for line in metrics.splitlines()
                        if line.startswith("ddn_drift_alarm")))  # fmt: skip
        admin_page(web, "/admin/drift", shots, "admin-drift.png")
        admin_page(web, "/admin/monitor", shots, "admin-monitor.png")

        version = json.loads((args.candidate / "manifest.json").read_text())["version"]
        print(run("model", "promote", "chest-xray", "--by", "ml-engineer",
                  "--expect-version", version, config=config).strip())  # fmt: skip
        name, view, _, size = last
        ds = cr_study(
            NIH / "png256" / name, view, size, index=999, inverted=False, manufacturer="NIH"
        )
        path = home / "after-promotion.dcm"
        ds.save_as(path, enforce_file_format=True)
        send([path], port)
        uid = str(ds.StudyInstanceUID)
        wait_analysed(db_url, {uid})
        db = make_database(db_url)
        try:
            from sqlalchemy import select

            from ddn_node.store.models import Delivery, Result, Study

            with db.read() as s:
                study_id = s.scalars(select(Study.id).where(Study.study_uid == uid)).one()
                result = s.scalars(select(Result).where(Result.study_id == study_id)).one()
                sr_path = s.scalars(
                    select(Delivery.path).where(
                        Delivery.study_id == study_id, Delivery.kind == "sr"
                    )
                ).first()
        finally:
            db.dispose()
        sr = read_sr(pydicom.dcmread(settings.node.spool_dir / sr_path))
        print(f"next study after promotion: result {result.model_name} {result.model_version}; "
              f"SR algorithm version {sr.algorithm_version}; same demo process "
              f"(pid {demo.pid}) throughout")  # fmt: skip
        print(run("model", "status", config=config))
        admin_page(web, "/admin/models", shots, "admin-models.png")
        print(f"screenshots and plots in {shots} and {plots}")
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(60)
        except subprocess.TimeoutExpired:
            demo.kill()
        handle.close()


if __name__ == "__main__":
    main()
