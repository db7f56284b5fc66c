"""Secondary Capture overlays: one JPEG picture per source image with every reported
finding of that image outlined in its colour, a legend, and their PNG rendering."""

from __future__ import annotations

import datetime
import io

import numpy as np
import pytest
from PIL import Image
from results_factories import (
    CENTRES,
    JPEG_BASELINE,
    SECONDARY_CAPTURE,
    SPEC,
    algorithm,
    blob,
    display_for,
    flat_display,
    prediction_for,
    roundtrip,
    same_study,
    synthetic_source,
)

from ddn_node.dicom.results import build_results, render_png
from ddn_node.dicom.results.content import reference_header
from ddn_node.dicom.results.overlay import (
    MAX_SIDE,
    PALETTE,
    DrawnFinding,
    _fit_width,
    _font,
    build_overlay,
    draw_findings,
    output_size,
)
from ddn_node.dicom.results.region import heatmap_region

PROBS = {"Pneumothorax": 0.9, "Effusion": 0.1, "Nodule": 0.35}  # Effusion negative
COLOUR = {spec: PALETTE[i] for i, spec in enumerate(SPEC)}  # model order
GREY = 128
NOW = datetime.datetime(2026, 11, 27, 9, 30, tzinfo=datetime.UTC)


def _overlays(sources, probabilities=None, **kwargs):
    probabilities = probabilities or [PROBS] * len(sources)
    prediction = prediction_for(sources, probabilities, demo=kwargs.pop("demo", True))
    display = kwargs.pop("display", None) or display_for(sources)
    results = build_results(sources, prediction, "STAT", display, **kwargs)
    return prediction, results


def _near(rgb: np.ndarray, colour: tuple[int, int, int], tolerance: int = 60) -> np.ndarray:
    """Pixels within ``tolerance`` of ``colour`` in every channel (JPEG moves colours)."""
    return np.abs(rgb.astype(int) - np.array(colour)).max(axis=-1) < tolerance


def _drawn(rgb: np.ndarray, tolerance: int = 6) -> np.ndarray:
    """Pixels that are not the flat grey display."""
    return np.abs(rgb.astype(int) - GREY).max(axis=-1) > tolerance


def test_one_overlay_per_image_in_one_series(tmp_path) -> None:
    sources = same_study(2, rows=120, columns=100)
    # The second image has no finding of its own, but the study has: it is shown too.
    negative = {"Pneumothorax": 0.2, "Effusion": 0.1, "Nodule": 0.1}
    _, results = _overlays(sources, [PROBS, negative])
    assert len(results.overlays) == 2
    assert len({sc.SeriesInstanceUID for sc in results.overlays}) == 1
    assert [sc.InstanceNumber for sc in results.overlays] == [1, 2]
    assert [str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) for sc in results.overlays] == [
        str(s.SOPInstanceUID) for s in sources
    ]
    assert [results.shows[str(sc.SOPInstanceUID)] for sc in results.overlays] == [
        ("Pneumothorax", "Nodule"),
        (),
    ]
    for sc in results.overlays:
        _, stored = roundtrip(sc, tmp_path, str(sc.InstanceNumber))
        assert stored.SOPClassUID == SECONDARY_CAPTURE
        assert stored.file_meta.TransferSyntaxUID == JPEG_BASELINE
        assert stored.PhotometricInterpretation == "YBR_FULL_422"
        assert (stored.SamplesPerPixel, stored.BitsAllocated, stored.BitsStored) == (3, 8, 8)
        assert (stored.Rows, stored.Columns) == (120, 100)
        pixels = stored.pixel_array  # decodable by pydicom, as RGB
        assert pixels.shape == (120, 100, 3) and pixels.dtype == np.uint8
        assert stored.BurnedInAnnotation == "YES"
        assert stored.LossyImageCompression == "01"
        assert stored.LossyImageCompressionMethod == "ISO_10918_1"
        assert float(stored.LossyImageCompressionRatio) > 1.0
        assert stored.ConversionType == "WSD"
        assert stored.SeriesDescription == "DDN AI findings overlay (SC) - NOT FOR DIAGNOSTIC USE"
        assert stored.SeriesNumber == 9002
        assert list(stored.PatientOrientation) == ["L", "F"]
        assert "NOT FOR DIAGNOSTIC USE" in stored.ImageComments
        # Every reported finding of the study is named, outlined or listed.
        assert stored.DerivationDescription == (
            "AI findings (Pneumothorax, Nodule) drawn on the source image"
        )


def test_no_overlay_without_a_reported_finding() -> None:
    _, results = _overlays(
        [synthetic_source()], [{"Pneumothorax": 0.2, "Effusion": 0.1, "Nodule": 0.1}]
    )
    assert results.overlays == [] and results.shows == {}


def test_overlay_references_its_source_image() -> None:
    source = synthetic_source()
    _, results = _overlays([source])
    (sc,) = results.overlays
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    for seq in (sc.SourceImageSequence, sc.ReferencedImageSequence):
        assert seq[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert seq[0].ReferencedSOPClassUID == source.SOPClassUID
    assert sc.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "121322"


def test_findings_are_drawn_in_their_palette_colours_where_they_are() -> None:
    rows, columns = 480, 400
    source = synthetic_source(rows=rows, columns=columns)
    _, results = _overlays([source], display=flat_display([source]))
    rgb = results.overlays[0].pixel_array
    for label in ("Pneumothorax", "Nodule"):
        colour = np.array(COLOUR[label])
        cy, cx = CENTRES[label]
        region = heatmap_region(blob(rows, columns, cx=cx), rows, columns)
        (x0, y0), (x1, y1) = region.points.min(axis=0), region.points.max(axis=0)
        box = _near(rgb, COLOUR[label])[int(y0) - 4 : int(y1) + 5, int(x0) - 4 : int(x1) + 5]
        perimeter = float(np.sum(np.hypot(*np.diff(region.points, axis=0).T)))
        assert box.sum() > perimeter, label  # the outline, in the finding's colour
        # Inside: the anatomy under a light fill of that colour.
        r, c = int(rows * cy), int(columns * cx)
        inside = rgb[r - 2 : r + 3, c - 2 : c + 3].reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(inside, 0.75 * GREY + 0.25 * colour, atol=12)
    assert _near(rgb, COLOUR["Effusion"]).sum() == 0  # a negative finding is not drawn
    # Far from findings, tags and legend the display is untouched.
    far = rgb[int(rows * 0.62) : int(rows * 0.72), int(columns * 0.9) :]
    assert not _drawn(far).any()


def test_a_point_region_is_marked_on_its_peak() -> None:
    source = synthetic_source(rows=300, columns=240)
    prediction = prediction_for([source], [PROBS])
    point = np.zeros((300, 240), np.float32)
    point[150, 60] = 1.0
    prediction.images[0].heatmaps = {"Pneumothorax": point}
    results = build_results([source], prediction, "STAT", flat_display([source]))
    rgb = results.overlays[0].pixel_array
    marked = _near(rgb, COLOUR["Pneumothorax"])[130:171, 30:91]
    assert marked.sum() > 40
    assert results.shows[str(results.overlays[0].SOPInstanceUID)] == ("Pneumothorax",)


def test_the_legend_lists_every_reported_finding() -> None:
    display = np.full((400, 400), 0.5, np.float32)
    region = heatmap_region(blob(400, 400, cx=0.3), 400, 400)

    def picture(findings):
        return draw_findings(display, findings, source_size=(400, 400), title="AI findings")

    drawn = DrawnFinding("Pneumothorax", 0.9, 0.5, 0, region)
    listed = DrawnFinding("Nodule", 0.35, 0.3, 2, None, "no heat map: weak evidence")
    one, two = picture([drawn]), picture([drawn, listed])
    legend = slice(300, 400), slice(0, 300)  # bottom left
    # Dark boxes with white text, and the drawn finding's colour swatch.
    assert (one[legend].max(axis=-1) > 230).sum() > 50
    assert (one[legend].max(axis=-1) < 60).sum() > 500
    assert _near(one[legend], COLOUR["Pneumothorax"], 10).sum() >= 100
    # A second line for the finding without a map: more legend, but no swatch colour.
    assert _drawn(two[legend]).sum() > _drawn(one[legend]).sum() + 500
    assert _near(two, COLOUR["Nodule"], 10).sum() == 0
    # Its reason is written out: another reason, other pixels.
    other = picture([drawn, DrawnFinding("Nodule", 0.35, 0.3, 2, None, "no heat map: x")])
    assert not np.array_equal(other[legend], two[legend])
    np.testing.assert_array_equal(other[:300], two[:300])


def test_large_images_are_capped() -> None:
    assert output_size(3000, 2500) == (MAX_SIDE, round(2500 * MAX_SIDE / 3000))
    assert output_size(1024, 1024) == (1024, 1024)
    assert output_size(300, 200, max_side=150) == (150, 100)
    source = synthetic_source(rows=2000, columns=1500)
    _, results = _overlays([source], display=flat_display([source]))
    (sc,) = results.overlays
    assert (sc.Rows, sc.Columns) == (1024, 768)
    assert sc.pixel_array.shape == (1024, 768, 3)
    _, smaller = _overlays([source], display=flat_display([source]), max_overlay_side=500)
    assert (smaller.overlays[0].Rows, smaller.overlays[0].Columns) == (500, 375)


def test_demo_warning_is_burned_in() -> None:
    # The warning is drawn in red: red pixels appear only with the warning.
    display = np.full((200, 300), 0.5, np.float32)
    findings = [DrawnFinding("Pneumothorax", 0.9, 0.5, 0, None, "no heat map: x")]

    def reddish(img: np.ndarray) -> int:
        r, g, b = (img[..., i].astype(int) for i in range(3))
        return int(((r > 200) & (g < 120) & (b < 120)).sum())

    kwargs = {"source_size": (200, 300), "title": "AI findings"}
    with_warning = draw_findings(display, findings, warning="NOT FOR DIAGNOSTIC USE", **kwargs)
    without = draw_findings(display, findings, **kwargs)
    assert reddish(with_warning[:40]) > 50  # top left
    assert reddish(with_warning[140:]) > 50  # and under the legend
    assert reddish(without) == 0
    assert _drawn(without).any()  # the title and the legend are there too


def test_lossy_history_of_the_source_is_kept() -> None:
    source = synthetic_source()
    source.LossyImageCompression = "01"
    source.LossyImageCompressionMethod = "ISO_15444_1"
    source.LossyImageCompressionRatio = "10"
    sc = build_overlay(
        source,
        reference_header(source),
        np.full((96, 80), 0.5, np.float32),
        [DrawnFinding("Pneumothorax", 0.9, 0.5, 0, None, "no heat map: x")],
        algorithm=algorithm(),
        series_instance_uid="1.2.3.1",
        sop_instance_uid="1.2.3.2",
        series_number=9002,
        instance_number=1,
        now=NOW,
    )
    assert sc.LossyImageCompression == "01"
    assert list(sc.LossyImageCompressionMethod) == ["ISO_15444_1", "ISO_10918_1"]
    assert [float(v) for v in sc.LossyImageCompressionRatio][:1] == [10.0]
    assert len(sc.LossyImageCompressionRatio) == 2
    with pytest.raises(ValueError, match="at least one"):
        build_overlay(
            source,
            reference_header(source),
            np.full((96, 80), 0.5, np.float32),
            [],
            algorithm=algorithm(),
            series_instance_uid="1.2.3.1",
            sop_instance_uid="1.2.3.3",
            series_number=9002,
            instance_number=1,
        )


def test_render_png_gives_the_jpeg_capture_as_png(tmp_path) -> None:
    source = synthetic_source(rows=64, columns=80)
    _, results = _overlays([source])
    _, stored = roundtrip(results.overlays[0], tmp_path, "sc")
    data = render_png(stored)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    assert image.size == (80, 64) and image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), stored.pixel_array)
    thumb = Image.open(io.BytesIO(render_png(stored, max_side=40)))
    assert max(thumb.size) == 40


def test_clinical_model_overlay_has_no_demo_wording() -> None:
    _, results = _overlays([synthetic_source()], demo=False)
    (sc,) = results.overlays
    assert sc.SeriesDescription == "DDN AI findings overlay (SC)"
    assert "ImageComments" not in sc
    assert sc.BurnedInAnnotation == "YES"  # labels and probabilities are still burned in


def test_labels_of_maps_and_overlays_are_listed() -> None:
    sources = same_study(2)
    probabilities = [PROBS, {"Pneumothorax": 0.2, "Effusion": 0.1, "Nodule": 0.8}]
    prediction = prediction_for(sources, probabilities)
    results = build_results(sources, prediction, "STAT", display_for(sources))

    def shown(objects):
        return {
            str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID): results.shows[
                ds.SOPInstanceUID
            ]
            for ds in objects
        }

    expected = {
        str(sources[0].SOPInstanceUID): ("Pneumothorax", "Nodule"),
        str(sources[1].SOPInstanceUID): ("Nodule",),
    }
    assert shown(results.overlays) == expected == shown(results.parametric_maps)
    assert len(results.shows) == 4


def test_the_study_page_renders_an_overlay_secondary_capture(tmp_path) -> None:
    """The worker keeps no PNG of its own: the web part renders the SC the PACS got."""
    from ddn_node.web.images import ImageCache, png_scaled

    source = synthetic_source(rows=600, columns=500)
    objects = build_results(
        [source],
        prediction_for([source], [{"Pneumothorax": 0.9, "Effusion": 0.1, "Nodule": 0.1}]),
        "STAT",
        display_for([source]),
    )
    path = tmp_path / "overlay.dcm"
    objects.overlays[0].save_as(path, enforce_file_format=True)
    png = png_scaled(ImageCache(), path, max_px=200)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB" and max(image.size) == 200


def test_a_legend_line_too_long_for_the_picture_is_cut_not_run_off() -> None:
    """The reason a finding has no heat map can be a long sentence; on a small image the
    legend ends in an ellipsis inside the picture (the SR keeps the whole sentence)."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (200, 50)))
    font = _font(14)
    long = "Effusion: 51 % (threshold 0 %) - no heat map: not in the manifest's localisation record"
    cut = _fit_width(draw, long, font, 180)
    assert cut.endswith("…") and long.startswith(cut[:-1].rstrip())
    assert draw.textlength(cut, font=font) <= 180
    assert _fit_width(draw, "Nodule: 52 %", font, 180) == "Nodule: 52 %"
