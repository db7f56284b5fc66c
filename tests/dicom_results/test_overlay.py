"""RGB Secondary Capture overlays and their PNG rendering."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from results_factories import blob, display_for, prediction_for, roundtrip, synthetic_source

from ddn_node.dicom.results import blend, build_results, render_png
from ddn_node.dicom.results.overlay import MAX_SIDE, burn_in, output_size

PROBS = {"Pneumothorax": 0.9, "Effusion": 0.1, "Nodule": 0.35}


def _overlays(source, **kwargs):
    prediction = prediction_for([source], [PROBS], demo=kwargs.pop("demo", True))
    results = build_results([source], prediction, "STAT", display_for([source]), **kwargs)
    return prediction, results


def test_one_overlay_per_positive_label_in_one_series(tmp_path) -> None:
    source = synthetic_source(rows=120, columns=100)
    _, results = _overlays(source)
    assert len(results.overlays) == 2
    assert len({sc.SeriesInstanceUID for sc in results.overlays}) == 1
    assert [sc.InstanceNumber for sc in results.overlays] == [1, 2]
    for sc in results.overlays:
        _, stored = roundtrip(sc, tmp_path, str(sc.InstanceNumber))
        assert stored.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert stored.PhotometricInterpretation == "RGB" and stored.SamplesPerPixel == 3
        assert (stored.Rows, stored.Columns) == (120, 100)
        assert stored.pixel_array.shape == (120, 100, 3)
        assert stored.BurnedInAnnotation == "YES"
        assert stored.ConversionType == "WSD"
        assert stored.SeriesDescription == "DDN heat map overlay (SC) - NOT FOR DIAGNOSTIC USE"
        assert stored.SeriesNumber == 9002
        assert list(stored.PatientOrientation) == ["L", "F"]
        assert "NOT FOR DIAGNOSTIC USE" in stored.ImageComments


def test_overlay_references_its_source_image() -> None:
    source = synthetic_source()
    _, results = _overlays(source)
    sc = results.overlays[0]
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    for seq in (sc.SourceImageSequence, sc.ReferencedImageSequence):
        assert seq[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert seq[0].ReferencedSOPClassUID == source.SOPClassUID
    assert sc.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "121322"


def test_large_images_are_capped() -> None:
    assert output_size(3000, 2500) == (MAX_SIDE, round(2500 * MAX_SIDE / 3000))
    assert output_size(1024, 1024) == (1024, 1024)
    rgb = blend(np.zeros((300, 200), np.float32), blob(30, 20), max_side=150)
    assert rgb.shape == (150, 100, 3) and rgb.dtype == np.uint8


def test_heat_is_coloured_and_cold_regions_stay_gray() -> None:
    display = np.full((100, 100), 0.5, np.float32)
    heat = np.zeros((100, 100), np.float32)
    heat[40:60, 40:60] = 1.0
    rgb = blend(display, heat).astype(int)
    cold, hot = rgb[5, 5], rgb[50, 50]
    assert cold[0] == cold[1] == cold[2] == 128  # untouched anatomy
    assert hot.max() - hot.min() > 60  # visibly coloured


def test_demo_warning_is_burned_in() -> None:
    # The warning box is drawn in red on black: red pixels appear only with the warning.
    base = np.full((200, 300, 3), 128, np.uint8)
    with_warning = burn_in(base, ["Pneumothorax: p = 0.90"], warning="NOT FOR DIAGNOSTIC USE")
    without = burn_in(base, ["Pneumothorax: p = 0.90"])

    def reddish(img: np.ndarray) -> int:
        top = img[:100]  # the text; the colour bar (which has reds) is at the bottom
        r, g, b = (top[..., i].astype(int) for i in range(3))
        return int(((r > 150) & (g < 120) & (b < 120)).sum())

    assert reddish(with_warning) > 50
    assert reddish(without) == 0
    assert not np.array_equal(without, base)  # the label text is there too


def test_render_png_gives_the_capture_as_png() -> None:
    source = synthetic_source(rows=64, columns=80)
    _, results = _overlays(source)
    data = render_png(results.overlays[0])
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    assert image.size == (80, 64) and image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), results.overlays[0].pixel_array)


def test_clinical_model_overlay_has_no_demo_wording() -> None:
    _, results = _overlays(synthetic_source(), demo=False)
    sc = results.overlays[0]
    assert sc.SeriesDescription == "DDN heat map overlay (SC)"
    assert "ImageComments" not in sc
    assert sc.BurnedInAnnotation == "YES"  # label and probability are still burned in


def test_labels_of_maps_and_overlays_are_listed() -> None:
    sources = [synthetic_source(), synthetic_source()]
    sources[1].StudyInstanceUID = sources[0].StudyInstanceUID
    probabilities = [PROBS, {"Pneumothorax": 0.2, "Effusion": 0.1, "Nodule": 0.8}]
    prediction = prediction_for(sources, probabilities)
    results = build_results(sources, prediction, "STAT", display_for(sources))
    expected = [
        (img.sop_instance_uid, label) for img in prediction.images for label in img.heatmaps
    ]

    def source(ds):
        return str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)

    got_sc = [(source(sc), results.overlay_labels[sc.SOPInstanceUID]) for sc in results.overlays]
    got_pm = [
        (source(pm), results.parametric_map_labels[pm.SOPInstanceUID])
        for pm in results.parametric_maps
    ]
    assert sorted(got_sc) == sorted(expected) == sorted(got_pm)
    # Nodule maps of both images share one series, instance numbers 1 and 2.
    labels = results.parametric_map_labels
    nodule = [pm for pm in results.parametric_maps if labels[pm.SOPInstanceUID] == "Nodule"]
    assert len({pm.SeriesInstanceUID for pm in nodule}) == 1
    assert [pm.InstanceNumber for pm in nodule] == [1, 2]


def test_the_study_page_renders_an_overlay_secondary_capture(tmp_path) -> None:
    """The worker keeps no PNG of its own: the web part renders the SC the PACS got."""
    from io import BytesIO

    from PIL import Image
    from results_factories import display_for, prediction_for, synthetic_source

    from ddn_node.dicom.results import build_results
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
    image = Image.open(BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB" and max(image.size) == 200
