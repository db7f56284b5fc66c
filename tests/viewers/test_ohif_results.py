"""The node's results as a radiologist sees them: OHIF Viewer 3.13.2, in headless Chromium,
against Orthanc (DICOMweb), after the node analysed a study Orthanc sent it.

The model has localisation evidence for Pneumothorax only (recorded in its manifest, as
``ddn-node evaluate`` records it), and every finding is positive: the SR outlines
Pneumothorax on the radiograph, labelled with its probability, and lists Effusion and
Nodule as findings without a heat map; the Parametric Map (Pneumothorax) is overlaid on
the radiograph; the Secondary Capture shows. No step may log a console error. The
screenshots (in $DDN_SCREENSHOT_DIR, else the test's tmp dir) are the ones in the docs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from support.artifacts import make_test_artifact
from support.deliveries import all_delivered
from support.net import free_port, wait_for
from support.node import NodeProcess
from support.ohif import (
    OhifViewer,
    skip_unless_viewer_runs,
)
from support.orthanc import Orthanc

from ddn_node.demo.ohif import OhifServer

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DX = REPO / "sample_studies" / "demo02" / "demo02_PA.dcm"

pytestmark = pytest.mark.slow


def _screenshots(tmp_path: Path) -> Path:
    where = Path(os.environ.get("DDN_SCREENSHOT_DIR") or tmp_path / "screenshots")
    where.mkdir(parents=True, exist_ok=True)
    return where


@contextmanager
def _analysed_in_orthanc(
    make_node: Callable[..., NodeProcess], sqlite_url: str, tmp_path: Path, model: Path
) -> Iterator[tuple[Orthanc, str]]:
    """Orthanc holding the sample radiograph and every result the node returned for it
    (the node stopped again); yields Orthanc and its id of the study."""
    with Orthanc(tmp_path / "orthanc", node_port=free_port()) as pacs:
        node = make_node(
            sqlite_url,
            roles=("scp", "worker"),
            node={"port": pacs.node_port},
            routing=[
                {"name": "cxr", "model": str(model), "head": "cxr", "modalities": ["DX", "CR"]}
            ],
            destinations=[
                {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
            ],
            worker={"poll_interval_s": 0.2, "torch_threads": 2},
            demo=True,
        )
        with node:
            uploaded = pacs.upload(SAMPLE_DX)
            pacs.send_to_node([uploaded["ParentStudy"]])
            wait_for(lambda: all_delivered(sqlite_url), 240, "the node's results stored in Orthanc")
        yield pacs, str(uploaded["ParentStudy"])


def test_sr_outlines_pm_overlay_and_sc_in_ohif(make_node, sqlite_url: str, tmp_path: Path) -> None:
    skip_unless_viewer_runs(SAMPLE_DX)
    model = make_test_artifact(tmp_path / "model", threshold=0.0, evidence={"Pneumothorax": True})
    source = pydicom.dcmread(SAMPLE_DX, stop_before_pixels=True)
    with (
        _analysed_in_orthanc(make_node, sqlite_url, tmp_path, model) as (pacs, _study),
        OhifServer(pacs.url) as ohif,
        OhifViewer(tmp_path / "browser", screenshots=_screenshots(tmp_path)) as viewer,
    ):
        viewer.open(ohif.viewer_url(str(source.StudyInstanceUID)))
        # The SR: Pneumothorax outlined on the radiograph, labelled as a radiologist reads it.
        sr = viewer.find_display_set(modality="SR")
        viewer.load_display_set(sr)
        labels = viewer.wait_for_annotation_labels(min_count=4, contains="Pneumothorax: ")
        # The outline of Pneumothorax, and the frame of the whole image with the score and
        # the findings that have no heat map, each read as "<finding>: <p> %".
        by_name = {text.split(": ")[0]: text for text in labels if ": " in text}
        assert {
            "Pneumothorax",
            "Abnormality score",
            "Pleural effusion",
            "Solitary nodule of lung",
        } <= set(by_name), labels
        assert all(by_name[name].rstrip().endswith("%") for name in by_name), labels
        # The outline and the whole image (OHIF adds tool annotations of its own, such as
        # reference lines).
        drawn = [a for a in viewer.annotations() if a.get("graphicType")]
        assert len(drawn) == 2, drawn
        viewer.screenshot("ohif-sr-findings")

        # The Secondary Capture, as any viewer shows it (before the map: OHIF keeps the
        # map's window for the next image, which would wash the capture out).
        sc = viewer.find_display_set(series_description="AI findings overlay (SC)")
        viewer.load_display_set(sc)
        viewer.wait_for_image(colour=True, min_coloured_fraction=0.002)
        viewer.screenshot("ohif-overlay-sc")

        # The Parametric Map, overlaid on its radiograph.
        pm = viewer.find_display_set(modality="PMAP")
        viewer.load_display_set(pm)
        viewer.wait_for_overlay(pm)
        viewer.screenshot("ohif-heat-map")

        errors = viewer.console_errors()
        assert errors == [], "\n".join(map(str, errors))
        assert viewer.failed_requests == []


def test_an_sr_without_outlines_opens_cleanly(make_node, sqlite_url: str, tmp_path: Path) -> None:
    """The default for a model without localisation evidence (the bundled one): findings
    but no heat maps. The SR has no measurement group then, and must still open."""
    skip_unless_viewer_runs(SAMPLE_DX)
    model = make_test_artifact(tmp_path / "model", threshold=0.0)
    source = pydicom.dcmread(SAMPLE_DX, stop_before_pixels=True)
    with _analysed_in_orthanc(make_node, sqlite_url, tmp_path, model) as (pacs, study):
        modalities = {
            s["MainDicomTags"].get("Modality") for s in pacs.get(f"/studies/{study}/series")
        }
        assert "PMAP" not in modalities and "PM" not in modalities
        with (
            OhifServer(pacs.url) as ohif,
            OhifViewer(tmp_path / "browser", screenshots=_screenshots(tmp_path)) as viewer,
        ):
            viewer.open(ohif.viewer_url(str(source.StudyInstanceUID)))
            viewer.load_display_set(viewer.find_display_set(modality="SR"))
            viewer.wait_for_image()
            viewer.screenshot("ohif-sr-no-outlines")
            errors = viewer.console_errors()
            assert errors == [], "\n".join(map(str, errors))
