"""The OHIF harness end to end: Orthanc (with DICOMweb) + ddn_node.demo.ohif + headless
Chromium, on a sample radiograph and a Secondary Capture of its study.

Proves that what the viewer tests build on works here: the viewer opens a study by URL,
the harness finds the display sets, loads one by double-clicking its thumbnail, sees the
RGB image drawn, and OHIF logs no error. Screenshots go to $DDN_SCREENSHOT_DIR (else the
test's tmp dir). The server test at the end needs neither a browser nor OHIF's files.
"""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from highdicom import UID
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from support.net import free_port
from support.ohif import (
    OhifViewer,
    skip_unless_viewer_runs,
)
from support.orthanc import Orthanc

from ddn_node.demo.ohif import OhifError, OhifServer, OhifSite

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DX = REPO / "sample_studies" / "demo02" / "demo02_PA.dcm"


def _screenshots(tmp_path: Path) -> Path:
    where = Path(os.environ.get("DDN_SCREENSHOT_DIR") or tmp_path / "screenshots")
    where.mkdir(parents=True, exist_ok=True)
    return where


def _secondary_capture(source: Dataset) -> SCImage:
    """An RGB Secondary Capture in the source's study: a colour gradient, so that the
    viewport shows colour only if this image (not the grey radiograph) is drawn."""
    rows, columns = 256, 256
    yy, xx = np.mgrid[0:rows, 0:columns]
    rgb = np.stack([xx, yy, 255 - xx], axis=-1).astype(np.uint8)
    return SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=UID(),
        sop_instance_uid=UID(),
        series_number=9902,
        instance_number=1,
        manufacturer="ddn-node tests",
        patient_orientation=("L", "F"),
        series_description="harness check (SC)",
    )


@pytest.mark.slow
def test_secondary_capture_displays_without_console_errors(tmp_path: Path) -> None:
    skip_unless_viewer_runs(SAMPLE_DX)
    source = pydicom.dcmread(SAMPLE_DX)
    sc = _secondary_capture(source)
    sc_path = tmp_path / "sc.dcm"
    sc.save_as(sc_path, enforce_file_format=True)

    with Orthanc(tmp_path / "orthanc", node_port=free_port()) as pacs:
        pacs.upload(SAMPLE_DX)
        pacs.upload(sc_path)
        with (
            OhifServer(pacs.url) as ohif,
            OhifViewer(tmp_path / "browser", screenshots=_screenshots(tmp_path)) as viewer,
        ):
            viewer.open(ohif.viewer_url(str(source.StudyInstanceUID)))
            radiograph = viewer.find_display_set(series_instance_uid=str(source.SeriesInstanceUID))
            assert radiograph.modality == "DX"
            shown = viewer.find_display_set(series_instance_uid=str(sc.SeriesInstanceUID))
            assert shown.series_description == "harness check (SC)"

            viewer.load_display_set(shown)
            stats = viewer.wait_for_image(colour=True, min_coloured_fraction=0.2)
            info = viewer.viewport_info()
            assert info is not None and str(sc.SOPInstanceUID) in str(info["imageId"])
            viewer.screenshot("ohif-secondary-capture")

            assert stats.coloured_fraction > 0.2
            assert viewer.console_errors() == [], "\n".join(map(str, viewer.console_errors()))
            assert viewer.failed_requests == []


# -- the server alone: static files, the single-page fallback, the DICOMweb proxy ---------


class _FakeOrthanc(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{self.path} host={self.headers.get('Host')} accept={self.headers.get('Accept')}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def fake_orthanc() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeOrthanc)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_server_routes_files_app_and_dicomweb(tmp_path: Path, fake_orthanc: str) -> None:
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<html>index</html>")
    (dist / "app-config.js").write_text("window.config = 'shipped';")
    (dist / "1.bundle.js").write_text("bundle();")
    (dist / "x.wasm").write_bytes(b"\0asm")
    config = tmp_path / "app-config.js"
    config.write_text("window.config = 'ours';")

    with OhifServer(fake_orthanc, site=OhifSite(dist=dist, config=config)) as ohif:
        root = ohif.url
        assert ohif.viewer_url("1.2.3") == f"{root}/viewer?StudyInstanceUIDs=1.2.3"
        with httpx.Client(timeout=10) as http:
            assert http.get(f"{root}/app-config.js").text == "window.config = 'ours';"
            bundle = http.get(f"{root}/1.bundle.js")
            assert bundle.text == "bundle();" and bundle.headers["content-type"].startswith(
                "text/javascript"
            )
            assert http.get(f"{root}/x.wasm").headers["content-type"] == "application/wasm"
            for route in ("/", "/viewer?StudyInstanceUIDs=1.2.3", "/viewer/dicomweb"):
                page = http.get(f"{root}{route}")
                assert page.status_code == 200 and page.text == "<html>index</html>", route
            assert http.get(f"{root}/missing.bundle.js").status_code == 404
            proxied = http.get(
                f"{root}/dicom-web/studies?StudyInstanceUID=1.2.3",
                headers={"Accept": "application/dicom+json"},
            )
            host = root.removeprefix("http://")
            assert proxied.text == (
                f"/dicom-web/studies?StudyInstanceUID=1.2.3 host={host} accept=application/dicom+json"
            )
            assert http.post(f"{root}/dicom-web/studies", content=b"x").status_code == 501


def test_server_reports_a_missing_site(tmp_path: Path) -> None:
    site = OhifSite(dist=tmp_path / "nowhere", config=tmp_path / "app-config.js")
    assert site.missing is not None and "fetch-ohif.sh" in site.missing
    with pytest.raises(OhifError, match=r"fetch-ohif\.sh"):
        OhifServer("http://127.0.0.1:1", site=site).start()
