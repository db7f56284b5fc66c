"""``ddn-node evaluate``: what an artifact does on held-out patients.

Writes ``metrics.json`` (stable keys: ``macro.auc``, ``macro.auc_ci95``,
``per_label.<label>.auc``, ``abnormality.auc``, ``localization.pointing_game``,
``localization.random_pointing_game``, ``localization.evidence``, ``n_images``,
``n_patients``) and a human-readable report (``report.md`` + ``report.html``) with ROC
curves, a calibration plot, the per-label localisation evidence and example heat maps.

By default images the model trained or validated on (its ``split.csv``) are skipped, so the
figures are about patients it has never seen; ``--split all`` evaluates everything given.

With ``--bboxes``, Grad-CAM localisation is measured on the evaluated images and, when the
artifact records a split, on its validation patients as well: the validation figures
decide which labels get heat maps (:mod:`ddn_node.training.localisation`), the test
figures report how that decision holds up. ``--record-in-manifest`` writes the decision
into the manifest (``heads.<head>.localisation``), where the node reads it.
"""

from __future__ import annotations

import csv
import json
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import structlog
import torch
from tqdm import tqdm

from ddn_node.model.artifact import LocalisationRecord, ModelArtifact, write_manifest
from ddn_node.model.gradcam import logits_and_cams
from ddn_node.model.inference import Predictor, abnormality_score
from ddn_node.model.preprocess import Geometry, map_to_source, prepare_batch
from ddn_node.training.data import NIH_BBOX_TO_LABEL, LabelTable, read_label_csv
from ddn_node.training.images import load_image_file
from ddn_node.training.localisation import (
    BoxOutcome,
    EvidenceRule,
    RuleKind,
    build_record,
    centre_hit,
    random_hit_rate,
    summarise,
)
from ddn_node.training.metrics import (
    BootstrapSpec,
    Box,
    binary_auc_with_ci,
    box_overlaps,
    classification_report,
    localisation_summary,
    pointing_hit,
    predicted_box,
)
from ddn_node.training.splits import read_split_csv

log = structlog.get_logger()


class EvaluationError(RuntimeError):
    """The evaluation cannot run as asked."""


@dataclass
class EvalConfig:
    model: Path
    images: Path
    labels: Path
    out: Path
    bboxes: Path | None = None
    head: str | None = None
    split: str = "held-out"
    device: str = "cpu"
    n_boot: int = 1000
    threads: int = 0
    record_in_manifest: bool = False
    batch_size: int = 16
    n_examples: int = 8
    random_maps: int = 20
    seed: int = 0
    command: str = ""
    maps_rule: str = "ci_lower_bound"
    maps_min_boxes: int = 5
    maps_decide_on: str = "val"
    progress: bool = True


@dataclass(frozen=True)
class BoxRow:
    file: str
    label: str
    box_1024: Box
    box_256: Box | None


def read_bboxes(path: Path) -> list[BoxRow]:
    """NIH ``BBox_List_2017`` layout as in ``../shared/data/nih/bboxes.csv``."""
    rows: list[BoxRow] = []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        need = ["Image Index", "Finding Label", "x_1024", "y_1024", "w_1024", "h_1024"]
        missing = [c for c in need if c not in header]
        # NIH's original file names the columns "Bbox [x", "y", "w", "h]".
        if missing and "Bbox [x" in header:
            for r in reader:
                b = Box(float(r["Bbox [x"]), float(r["y"]), float(r["w"]), float(r["h]"]))
                rows.append(
                    BoxRow(
                        r["Image Index"],
                        NIH_BBOX_TO_LABEL.get(r["Finding Label"], r["Finding Label"]),
                        b,
                        None,
                    )
                )
            return rows
        if missing:
            raise EvaluationError(f"{path}: bbox columns {missing} not found")
        has256 = all(c in header for c in ("x_256", "y_256", "w_256", "h_256"))
        for r in reader:
            b1024 = Box(
                float(r["x_1024"]), float(r["y_1024"]), float(r["w_1024"]), float(r["h_1024"])
            )
            b256 = (
                Box(float(r["x_256"]), float(r["y_256"]), float(r["w_256"]), float(r["h_256"]))
                if has256
                else None
            )
            rows.append(
                BoxRow(
                    r["Image Index"],
                    NIH_BBOX_TO_LABEL.get(r["Finding Label"], r["Finding Label"]),
                    b1024,
                    b256,
                )
            )
    return rows


def _box_for(row: BoxRow, shape: tuple[int, int]) -> tuple[Box, str]:
    """The box in the pixel grid of the image actually read (256 or 1024 set, else scaled)."""
    h, w = shape
    if (h, w) == (256, 256) and row.box_256 is not None:
        return row.box_256, "256"
    if (h, w) == (1024, 1024):
        return row.box_1024, "1024"
    sx, sy = w / 1024.0, h / 1024.0
    b = row.box_1024
    return Box(b.x * sx, b.y * sy, b.w * sx, b.h * sy), f"1024 scaled to {w}x{h}"


def _select(table: LabelTable, cfg: EvalConfig) -> tuple[LabelTable, dict[str, Any]]:
    info: dict[str, Any] = {"policy": cfg.split}
    if cfg.split == "all":
        return table, info
    if cfg.split != "held-out":
        raise EvaluationError("--split must be 'held-out' or 'all'")
    split_csv = cfg.model / "split.csv"
    if not split_csv.is_file():
        info["note"] = "the artifact records no split.csv; every image given is evaluated"
        return table, info
    recorded = read_split_csv(split_csv)
    keep = [i for i, f in enumerate(table.files) if recorded.get(f) not in ("train", "val")]
    info.update(
        excluded_train_val=len(table) - len(keep),
        note="images the model trained or validated on (its split.csv) are excluded",
    )
    if not keep:
        raise EvaluationError(
            "every image given was used in training/validation; nothing is held out (use --split all to override)"
        )
    return table.subset(keep), info


def _predict(
    predictor: Predictor,
    table: LabelTable,
    head: str,
    labels: list[str],
    batch: int,
    progress: bool = False,
) -> np.ndarray:
    """Probabilities (N, L), images decoded one batch at a time."""
    out = []
    starts = range(0, len(table), batch)
    for s in tqdm(starts, desc="predict", unit="batch", disable=not progress, leave=False):
        imgs = [load_image_file(p) for p in table.paths[s : s + batch]]
        preds = predictor.predict(imgs, head=head, heatmaps=False)
        out.extend([[pr.probabilities[lab] for lab in labels] for pr in preds])
    return np.asarray(out, dtype=np.float64).reshape(len(table), len(labels))


def _aligned_targets(table: LabelTable, labels: list[str]) -> np.ndarray:
    missing = [lab for lab in labels if lab not in table.labels]
    if missing:
        raise EvaluationError(f"the label CSV lacks the model's labels {missing}")
    return table.targets[:, [table.labels.index(lab) for lab in labels]]


def _thumbnail(a: np.ndarray, box: Box, side: int = 256) -> tuple[np.ndarray, Box]:
    """A copy no larger than ``side`` px (for report figures) and the box in its pixels."""
    h, w = a.shape
    f = min(1.0, side / max(h, w))
    if f >= 1.0:
        return a.copy(), box
    t = torch.nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(a))[None, None], scale_factor=f, mode="area"
    )[0, 0].numpy()
    return t, Box(box.x * f, box.y * f, box.w * f, box.h * f)


def _validation_part(table: LabelTable, cfg: EvalConfig) -> LabelTable | None:
    """The artifact's validation images among those given (None: the artifact records no split)."""
    split_csv = cfg.model / "split.csv"
    if not split_csv.is_file():
        return None
    recorded = read_split_csv(split_csv)
    return table.subset([i for i, f in enumerate(table.files) if recorded.get(f) == "val"])


def _localisation(  # noqa: PLR0915 - the pointing game and its baselines in one pass over the boxes
    predictor: Predictor,
    head: str,
    labels: list[str],
    table: LabelTable,
    boxes: list[BoxRow],
    cfg: EvalConfig,
    part: str = "test",
    keep_examples: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[BoxOutcome]]:
    """Grad-CAM against the expert boxes of ``table``'s images: summary, examples, per-box outcomes."""
    index = {f: i for i, f in enumerate(table.files)}
    per_image: dict[int, list[BoxRow]] = {}
    for r in boxes:
        if r.file in index and r.label in labels:
            per_image.setdefault(index[r.file], []).append(r)
    if not per_image:
        return (
            {
                "n_boxes": 0,
                "pointing_game": None,
                "random_pointing_game": None,
                "note": "no boxed image in the evaluated set",
            },
            [],
            [],
        )
    rng = np.random.default_rng(cfg.seed)
    model, spec = predictor.model, predictor.spec
    hits, ious, iobbs = [], [], []
    r_hits, r_ious, r_iobbs, c_hits = [], [], [], []
    outcomes: list[BoxOutcome] = []
    by_label_maps: dict[str, list[float]] = {}
    coords: set[str] = set()
    examples: list[dict[str, Any]] = []
    order = sorted(per_image)
    starts = range(0, len(order), cfg.batch_size)
    for s in tqdm(
        starts,
        desc=f"Grad-CAM on {part} boxes",
        unit="batch",
        disable=not cfg.progress,
        leave=False,
    ):
        idx = order[s : s + cfg.batch_size]
        # Decoded per batch: a folder of full-size DICOM radiographs does not fit in memory.
        images = {i: load_image_file(table.paths[i]) for i in idx}
        x, geoms = prepare_batch([images[i] for i in idx], spec)
        x = x.to(predictor.device)
        with torch.inference_mode():
            feats = model.features(x)
        wanted = [[labels.index(r.label) for r in per_image[i]] for i in idx]
        logits, cams = logits_and_cams(model, feats, head, wanted)
        probs = model.probabilities({head: logits})[head].float().cpu().numpy()
        fh, fw = int(feats.shape[2]), int(feats.shape[3])
        for b, i in enumerate(idx):
            shape = images[i].shape
            for r in per_image[i]:
                k = labels.index(r.label)
                hm = map_to_source(cams[(b, k)].float().cpu(), geoms[b])
                box, which = _box_for(r, shape)
                coords.add(which)
                hit = pointing_hit(hm, box)
                iou, iobb = box_overlaps(predicted_box(hm), box, shape)
                hits.append(hit)
                ious.append(iou)
                iobbs.append(iobb)
                # Baselines: random maps with the same 7x7 smoothness and the same mapping
                # back to the image (simulated), a uniformly random peak (exact: the box's
                # area fraction), and a fixed map peaking at the image centre.
                rh, ri, rb = [], [], []
                for _ in range(cfg.random_maps):
                    rm = map_to_source(
                        torch.from_numpy(rng.random((fh, fw)).astype(np.float32)), geoms[b]
                    )
                    rh.append(pointing_hit(rm, box))
                    a, c = box_overlaps(predicted_box(rm), box, shape)
                    ri.append(a)
                    rb.append(c)
                r_hits.append(float(np.mean(rh)))
                r_ious.append(float(np.mean(ri)))
                r_iobbs.append(float(np.mean(rb)))
                by_label_maps.setdefault(r.label, []).append(float(np.mean(rh)))
                ch = centre_hit(box, shape)
                c_hits.append(ch)
                outcomes.append(
                    BoxOutcome(
                        r.label,
                        table.files[i],
                        table.patients[i],
                        hit,
                        random_hit_rate(box, shape),
                        ch,
                    )
                )
                if keep_examples:
                    thumb, tbox = _thumbnail(images[i], box)
                    small_hm, _ = _thumbnail(hm, box)
                    examples.append(
                        {
                            "i": i,
                            "label": r.label,
                            "prob": float(probs[b, k]),
                            "hit": hit,
                            "iou": iou,
                            "box": tbox,
                            "heatmap": small_hm,
                            "image": thumb,
                        }
                    )
    summary = localisation_summary(hits, ious, iobbs)
    rand = localisation_summary([bool(h) for h in r_hits], r_ious, r_iobbs)
    rand["pointing_game"] = float(np.mean(r_hits))  # expected hit rate, not rounded to 0/1
    per_label: dict[str, Any] = {}
    for lab in sorted(by_label_maps):
        fig = summarise([o for o in outcomes if o.label == lab]).model_dump(mode="json")
        per_label[lab] = {**fig, "random_maps": float(np.mean(by_label_maps[lab]))}
    summary.update(
        part=part,
        n_patients=len({o.patient for o in outcomes}),
        random_pointing_game=rand["pointing_game"],
        random_area_pointing_game=float(np.mean([o.random for o in outcomes])),
        centre_pointing_game=float(np.mean(c_hits)),
        random={k: v for k, v in rand.items() if k != "n_boxes"},
        per_label=per_label,
        box_coordinates=sorted(coords),
        method=(
            "Grad-CAM of the box's label (whatever its probability) on layer4, mapped to the image; "
            "pointing game = peak inside the expert box; predicted box = bounding box of the connected "
            "region >= 0.5 x peak that holds the peak; IoU and IoBB (intersection / predicted box area, "
            "Wang et al. 2017) accuracies at T = 0.1/0.25/0.5. Random baselines: "
            f"{cfg.random_maps} uniform-noise 7x7 maps per box through the same mapping (expected values, "
            "'random'), and a uniformly random peak (the box's area fraction, 'random_area'); "
            "centre baseline: a map peaking at the image centre. Per-label 95% CIs: Wilson on the Kish "
            "effective number of boxes (patients as clusters)."
        ),
    )
    return summary, examples, outcomes


def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    t0 = time.monotonic()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    art = ModelArtifact.load(cfg.model)
    head = cfg.head or next(iter(art.heads))
    info = art.head(head)
    labels = info.label_names
    if cfg.maps_decide_on not in ("val", "evaluated"):
        raise EvaluationError("--maps-decide-on must be 'val' or 'evaluated'")
    try:
        rule = EvidenceRule(
            # cast: EvidenceRule checks the kind itself (the ValueError below).
            kind=cast(RuleKind, cfg.maps_rule),
            min_boxes=cfg.maps_min_boxes,
            decide_on=cfg.maps_decide_on,
        )
    except ValueError as e:
        raise EvaluationError(str(e)) from e
    given = read_label_csv(cfg.images, cfg.labels)
    table, selection = _select(given, cfg)
    y = _aligned_targets(table, labels)
    predictor = Predictor(art, device=cfg.device, batch_size=cfg.batch_size)
    p = _predict(predictor, table, head, labels, cfg.batch_size, cfg.progress)
    thresholds = [spec.threshold for spec in info.labels]
    boot = BootstrapSpec(cfg.n_boot, cfg.seed)
    report = classification_report(y, p, labels, thresholds, table.patients, boot)
    scores = np.array(
        [abnormality_score(art, head, dict(zip(labels, row, strict=True))) for row in p.tolist()]
    )
    abnormal = ~table.normal
    abn = binary_auc_with_ci(abnormal.astype(float), scores, table.patients, boot)
    abn.update(
        definition=info.abnormality.model_dump(),
        n_normal=int(table.normal.sum()),
        n_abnormal=int(abnormal.sum()),
        normal_means="'No Finding' (NIH)"
        if table.layout == "nih"
        else "the normal class / no positive label",
    )
    command = cfg.command or " ".join(["ddn-node", *(shlex.quote(a) for a in sys.argv[1:])])
    created = datetime.now(UTC).isoformat(timespec="seconds")
    loc: dict[str, Any] = {
        "pointing_game": None,
        "random_pointing_game": None,
        "n_boxes": 0,
        "note": "no --bboxes given",
    }
    examples: list[dict[str, Any]] = []
    if cfg.bboxes is not None:
        rows = read_bboxes(cfg.bboxes)
        # The evaluated images are the held-out test patients when the artifact records its
        # split; otherwise (or with --split all) they are whatever was given.
        part = "test" if "excluded_train_val" in selection else "all"
        loc, examples, outcomes = _localisation(predictor, head, labels, table, rows, cfg, part)
        parts = {part: outcomes}
        val = _validation_part(given, cfg)
        if val is not None:
            # The validation patients decide which labels get heat maps (the test split
            # only reports); their classification metrics are not part of this report.
            val_loc, _, parts["val"] = _localisation(
                predictor, head, labels, val, rows, cfg, "val", keep_examples=False
            )
            loc["val"] = {
                k: val_loc.get(k)
                for k in (
                    "n_boxes",
                    "n_patients",
                    "pointing_game",
                    "random_pointing_game",
                    "random_area_pointing_game",
                    "centre_pointing_game",
                )
            }
        record = build_record(labels, parts, rule, art.weights_sha256, part, command, created)
        loc["evidence"] = record.model_dump(mode="json")
    metrics: dict[str, Any] = {
        "model": {
            "name": art.name,
            "version": art.version,
            "weights_sha256": art.weights_sha256,
            "head": head,
        },
        "data": {
            "images": str(cfg.images),
            "labels": str(cfg.labels),
            "bboxes": str(cfg.bboxes) if cfg.bboxes else None,
            "selection": selection,
        },
        "n_images": len(table),
        "n_patients": len(set(table.patients)),
        "macro": report["macro"],
        "per_label": report["per_label"],
        "abnormality": abn,
        "localization": loc,
        "bootstrap": report["bootstrap"],
        "command": command,
        "created": created,
        "seconds": 0.0,
    }
    metrics = json.loads(json.dumps(metrics, default=_json_default).replace("NaN", "null"))
    metrics["seconds"] = round(time.monotonic() - t0, 1)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    from ddn_node.training.report import write_report

    write_report(cfg.out, metrics, labels, y, p, scores, abnormal, table, examples, cfg.n_examples)
    if cfg.record_in_manifest:
        _record(art, metrics, cfg)
    log.info(
        "evaluate.done",
        n_images=metrics["n_images"],
        macro_auc=metrics["macro"]["auc"],
        abnormality_auc=abn["auc"],
        pointing_game=loc.get("pointing_game"),
        heat_map_labels=[
            lab for lab, v in loc.get("evidence", {}).get("labels", {}).items() if v["maps_shown"]
        ],
        seconds=metrics["seconds"],
    )
    return metrics


def _json_default(o: object) -> object:
    if isinstance(o, Box):
        return [o.x, o.y, o.w, o.h]
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Geometry):
        return o.__dict__
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _record(art: ModelArtifact, metrics: dict[str, Any], cfg: EvalConfig) -> None:
    """Copy the headline held-out metrics into the manifest (weights untouched)."""
    head = metrics["model"]["head"]
    m = art.manifest
    summary = {
        "n_images": metrics["n_images"],
        "n_patients": metrics["n_patients"],
        "selection": metrics["data"]["selection"],
        "macro": {
            k: metrics["macro"][k]
            for k in ("auc", "auc_ci95", "average_precision", "average_precision_ci95", "f1")
        },
        "per_label": {
            lab: {
                k: v[k]
                for k in (
                    "auc",
                    "auc_ci95",
                    "average_precision",
                    "average_precision_ci95",
                    "n_positive",
                )
            }
            for lab, v in metrics["per_label"].items()
        },
        "abnormality": {
            k: metrics["abnormality"][k] for k in ("auc", "auc_ci95", "n_normal", "n_abnormal")
        },
        "localization": {
            k: metrics["localization"].get(k)
            for k in (
                "n_boxes",
                "pointing_game",
                "random_pointing_game",
                "random_area_pointing_game",
                "centre_pointing_game",
                "iou_acc@0.1",
                "iou_acc@0.25",
                "iou_acc@0.5",
                "iobb_acc@0.1",
                "iobb_acc@0.25",
                "iobb_acc@0.5",
            )
        },
        "command": metrics["command"],
        "created": metrics["created"],
    }
    heads = dict(m.heads)
    h = heads[head]
    update: dict[str, Any] = {"metrics": {**h.metrics, "test": summary}}
    evidence = metrics["localization"].get("evidence")
    if evidence is not None:
        # Without --bboxes the earlier record (if any) stays: it is tied to the weights' hash.
        update["localisation"] = LocalisationRecord.model_validate(evidence)
    heads[head] = h.model_copy(update=update)
    write_manifest(art.path, m.model_copy(update={"heads": heads}))
