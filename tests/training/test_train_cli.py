"""A tiny training run end to end through the CLI: train, resume, evaluate, add a head, k-fold."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from ddn_node.cli import model_cmds
from ddn_node.model.artifact import ModelArtifact
from ddn_node.model.inference import Predictor
from ddn_node.training.data import NIH_LABELS

LABELS = list(NIH_LABELS)


def _app() -> typer.Typer:
    app = typer.Typer()
    model_cmds.register(app)
    return app


def _run(*args: str) -> str:
    res = CliRunner().invoke(_app(), [str(a) for a in args])
    assert res.exit_code == 0, (res.output, res.exception)
    return res.output


@pytest.fixture(scope="module")
def nih_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 synthetic 64x64 radiograph-like PNGs in the NIH CSV layout, with boxes."""
    root = tmp_path_factory.mktemp("nih")
    (root / "png").mkdir()
    rng = np.random.default_rng(0)
    rows, boxes = [], []
    for i in range(60):
        patient = i // 2 if i < 20 else i  # some patients with two images
        name = f"{patient:08d}_{i % 2:03d}.png"
        found = (
            []
            if i % 6 == 0
            else sorted(set(rng.choice(LABELS[:6], size=rng.integers(1, 3)).tolist()))
        )
        img = rng.normal(0.4, 0.05, (64, 64))
        if "Effusion" in found:
            img[40:60, 5:25] += 0.5  # something learnable
            boxes.append([name, "Effusion", 20, 640, 320, 320, 5, 160, 80, 80])
        if "Infiltration" in found:
            boxes.append(
                [name, "Infiltrate", 512, 256, 256, 256, 128, 64, 64, 64]
            )  # NIH's box name
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / "png" / name)
        rows.append(
            [name, "|".join(found) or "No Finding", str(patient), "PA"]
            + [int(lab in found) for lab in LABELS]
            + [int(not found)]
        )
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["Image Index", "Finding Labels", "Patient ID", "View Position", *LABELS, "No Finding"]
        )
        w.writerows(rows)
    with (root / "bboxes.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "Image Index",
                "Finding Label",
                "x_1024",
                "y_1024",
                "w_1024",
                "h_1024",
                "x_256",
                "y_256",
                "w_256",
                "h_256",
            ]
        )
        w.writerows(boxes)
    return root


@pytest.fixture(scope="module")
def trained(nih_like: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("models") / "tiny-cxr"
    ckpt = out.parent / "ckpt"
    common = [
        "train",
        "--images",
        nih_like / "png",
        "--labels",
        nih_like / "labels.csv",
        "--out",
        out,
        "--backbone",
        "tiny",
        "--image-size",
        "64",
        "--batch-size",
        "8",
        "--checkpoints",
        ckpt,
        "--no-progress",
        "--val-fraction",
        "0.25",
        "--test-fraction",
        "0.25",
    ]
    _run(*common, "--epochs", "2")
    first = json.loads((out / "manifest.json").read_text())
    assert len(first["training"]["history"]) == 2
    _run(*common, "--epochs", "3", "--resume")
    return out, ckpt


def test_train_writes_a_verified_artifact(trained: tuple[Path, Path]) -> None:
    out, ckpt = trained
    art = ModelArtifact.load(out)
    m = json.loads((out / "manifest.json").read_text())
    assert [lab.name for lab in art.heads["cxr"].labels] == LABELS
    assert art.heads["cxr"].labels[2].code.value == "60046008"  # Effusion, checked in DICOM PS3.16
    assert (
        m["training"]["command"].startswith("ddn-node train")
        and "--resume" not in m["training"]["command"]
    )
    assert "--resume" in m["training"]["resumed_with"][0]
    assert [h["epoch"] for h in m["training"]["history"]] == [1, 2, 3]
    assert m["training"]["init"].startswith("random initialisation")
    assert m["training"]["data"]["n_images"] == 60 and len(m["training"]["data"]["sha256"]) == 64
    assert m["intended_use"].lower().count("not for diagnostic use") == 1
    assert m["heads"]["cxr"]["abnormality"]["kind"] == "max_probability"
    split = list(csv.DictReader((out / "split.csv").open()))
    assert {r["split"] for r in split} == {"train", "val", "test"}
    assert (ckpt / "last.safetensors").is_file() and (ckpt / "best.safetensors").is_file()
    assert not list(ckpt.glob("*.pt")) and not list(ckpt.glob("*.pkl"))


def test_evaluate_writes_stable_keys_and_a_report(
    trained: tuple[Path, Path], nih_like: Path, tmp_path: Path
) -> None:
    out, _ = trained
    rep = tmp_path / "report"
    text = _run(
        "evaluate",
        "--model",
        out,
        "--images",
        nih_like / "png",
        "--labels",
        nih_like / "labels.csv",
        "--bboxes",
        nih_like / "bboxes.csv",
        "--out",
        rep,
        "--n-boot",
        "100",
    )
    assert "macro AUC" in text
    m = json.loads((rep / "metrics.json").read_text())
    n_test = sum(1 for r in csv.DictReader((out / "split.csv").open()) if r["split"] == "test")
    assert m["n_images"] == n_test and m["n_patients"] <= n_test
    for key in ("auc", "auc_ci95"):
        assert key in m["macro"]
    assert set(m["per_label"]) == set(LABELS) and "auc" in m["per_label"]["Effusion"]
    assert "auc" in m["abnormality"]
    assert "pointing_game" in m["localization"] and "random_pointing_game" in m["localization"]
    assert set(m["localization"]["evidence"]["labels"]) == set(LABELS)
    assert (
        not (out / "manifest.json").read_text().count('"localisation": {')
    )  # not written without the flag
    for f in ("report.md", "report.html", "roc_curves.png", "calibration.png"):
        assert (rep / f).is_file(), f
    everything = tmp_path / "all"
    _run(
        "evaluate",
        "--model",
        out,
        "--images",
        nih_like / "png",
        "--labels",
        nih_like / "labels.csv",
        "--out",
        everything,
        "--split",
        "all",
        "--n-boot",
        "100",
    )
    assert json.loads((everything / "metrics.json").read_text())["n_images"] == 60


def test_evaluate_records_localisation_evidence_in_the_manifest(
    trained: tuple[Path, Path], nih_like: Path, tmp_path: Path
) -> None:
    import shutil

    out, _ = trained
    model = tmp_path / "model"
    shutil.copytree(out, model)  # the module's artifact stays as trained
    before = ModelArtifact.load(model)
    assert before.heatmap_labels("cxr") == frozenset()  # nothing recorded yet: no maps
    text = _run(
        "evaluate",
        "--model",
        model,
        "--images",
        nih_like / "png",
        "--labels",
        nih_like / "labels.csv",
        "--bboxes",
        nih_like / "bboxes.csv",
        "--out",
        tmp_path / "rep",
        "--n-boot",
        "100",
        "--write-manifest",
        "--no-progress",
    )
    assert "heat maps" in text and "written to the manifest" in text
    art = ModelArtifact.load(model)
    assert art.weights_sha256 == before.weights_sha256  # only the manifest changes
    rec = art.head("cxr").localisation
    assert (
        rec is not None
        and rec.rule.decided_on == "val"
        and rec.weights_sha256 == art.weights_sha256
    )
    assert set(rec.labels) == set(LABELS)
    recorded = {r["file"]: r["split"] for r in csv.DictReader((model / "split.csv").open())}
    boxed = {
        r["Image Index"]: r["Finding Label"]
        for r in csv.DictReader((nih_like / "bboxes.csv").open())
    }
    n_val_effusion = sum(
        1 for f, lab in boxed.items() if lab == "Effusion" and recorded[f] == "val"
    )
    assert rec.labels["Effusion"].parts["val"].n_boxes == n_val_effusion
    assert rec.labels["Effusion"].parts["test"].n_boxes == sum(
        1 for f, lab in boxed.items() if lab == "Effusion" and recorded[f] == "test"
    )
    ev = art.localisation("cxr")
    for lab in LABELS:
        e, entry = ev[lab], rec.labels[lab]
        assert (
            e.recorded
            and e.shown == entry.maps_shown
            and e.reason == entry.reason
            and e.split == "val"
        )
        if entry.parts["val"].n_boxes == 0:
            assert not e.shown and e.reason.startswith("no boxes for this label")
        if e.shown:
            assert (
                e.ci is not None
                and e.ci[0] > max(e.random, e.centre)
                and e.n_boxes >= rec.rule.min_boxes
            )
    assert not ev["Hernia"].shown  # never boxed
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert m["localization"]["evidence"]["labels"]["Effusion"]["maps_shown"] == ev["Effusion"].shown
    assert (tmp_path / "rep" / "localisation.png").is_file()
    assert "Which labels get heat maps" in (tmp_path / "rep" / "report.md").read_text()
    # An operator's looser rule, decided on the evaluated images, is recorded as such.
    _run(
        "evaluate",
        "--model",
        model,
        "--images",
        nih_like / "png",
        "--labels",
        nih_like / "labels.csv",
        "--bboxes",
        nih_like / "bboxes.csv",
        "--out",
        tmp_path / "rep2",
        "--n-boot",
        "100",
        "--record-in-manifest",
        "--maps-rule",
        "point_estimate",
        "--maps-decide-on",
        "evaluated",
        "--maps-min-boxes",
        "1",
        "--no-progress",
    )
    rule = ModelArtifact.load(model).head("cxr").localisation.rule  # type: ignore[union-attr]
    assert rule.kind == "point_estimate" and rule.decided_on == "test" and rule.min_boxes == 1


def test_add_a_softmax_head_on_the_same_backbone(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    out, _ = trained
    d = tmp_path / "mri"
    (d / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    with (d / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label"])
        for i in range(24):
            cls = ["glioma", "meningioma", "notumor", "pituitary"][i % 4]
            img = rng.random((48, 48, 3)) * 0.3 + 0.15 * (i % 4)
            Image.fromarray((img * 255).astype(np.uint8)).save(d / "images" / f"{i}.jpg")
            w.writerow([f"images/{i}.jpg", cls])
    both = tmp_path / "both"
    _run(
        "train",
        "--add-head-to",
        out,
        "--head",
        "brain_mri",
        "--images",
        d,
        "--labels",
        d / "labels.csv",
        "--out",
        both,
        "--folds",
        "3",
        "--no-progress",
    )
    art = ModelArtifact.load(both)
    assert set(art.heads) == {"cxr", "brain_mri"}
    old = ModelArtifact.load(out)
    # one backbone, unchanged: only the new head's tensors differ
    for k, v in old.model.state_dict().items():
        assert (art.model.state_dict()[k] == v).all(), k
    h = art.heads["brain_mri"]
    assert (
        h.activation == "softmax"
        and h.abnormality.kind == "complement"
        and h.abnormality.labels == ["notumor"]
    )
    cv = h.metrics["cross_validation"]
    assert cv["folds"] == 3 and 0.0 <= cv["accuracy_argmax"] <= 1.0
    p = Predictor(art)
    pred = p.predict([rng.random((48, 48)).astype(np.float32)], head="brain_mri", heatmaps=False)[0]
    assert set(pred.probabilities) == {"glioma", "meningioma", "notumor", "pituitary"}


def test_a_refitted_head_is_a_candidate_that_never_saw_the_test_split(
    trained: tuple[Path, Path], nih_like: Path, tmp_path: Path
) -> None:
    """The cxr head refitted on the frozen backbone, from the same NIH-layout data: the
    images the base model's split.csv holds out for evaluation are left out of the fit,
    and the artifact carries the version given, so it can run in shadow beside the base."""
    from ddn_node.training.splits import read_split_csv

    out, _ = trained
    split = read_split_csv(out / "split.csv")
    test_images = sum(1 for s in split.values() if s == "test")
    assert test_images > 0
    candidate = tmp_path / "candidate"
    _run(
        "train",
        "--add-head-to",
        out,
        "--head",
        "cxr",
        "--images",
        nih_like / "png",
        "--labels",
        nih_like / "labels.csv",
        "--out",
        candidate,
        "--folds",
        "3",
        "--version",
        "2026.12.01-refit",
        "--no-progress",
    )
    art, base = ModelArtifact.load(candidate), ModelArtifact.load(out)
    assert (art.name, art.version) == (base.name, "2026.12.01-refit")
    assert art.weights_sha256 != base.weights_sha256
    training = art.heads["cxr"].training
    assert training["test_images_left_out"] == test_images
    assert training["data"]["n_images"] == 60 - test_images
    # The same split travels with it: `ddn-node evaluate` measures it on the same patients.
    assert read_split_csv(candidate / "split.csv") == split


def test_kfold_training_records_cross_validation(nih_like: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    _run(
        "train",
        "--images",
        nih_like / "png",
        "--labels",
        nih_like / "labels.csv",
        "--out",
        out,
        "--backbone",
        "tiny",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--folds",
        "2",
        "--checkpoints",
        tmp_path / "ck",
        "--no-progress",
    )
    m = json.loads((out / "manifest.json").read_text())
    cv = m["heads"]["cxr"]["metrics"]["cross_validation"]
    assert cv["folds"] == 2 and len(cv["fold_macro_auc"]) == 2
    assert (
        "pooled out-of-fold" in m["heads"]["cxr"]["labels"][0]["threshold_method"]
        or "default" in m["heads"]["cxr"]["labels"][0]["threshold_method"]
    )


def test_bad_requests_exit_with_a_message(nih_like: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        _app(),
        [
            "train",
            "--images",
            str(nih_like / "png"),
            "--labels",
            str(nih_like / "labels.csv"),
            "--out",
            str(tmp_path / "x"),
            "--device",
            "cuda",
            "--backbone",
            "tiny",
        ],
    )
    import torch

    if not torch.cuda.is_available():
        assert res.exit_code == 2 and "CUDA" in res.output
