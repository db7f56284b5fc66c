"""``ddn-node bench backends``: which inference backend may serve the bundled model.

A faster backend is only acceptable if it gives the same answers. For each backend this
measures, in one run on the same machine:

* the macro AUC on the artifact's **validation** split (the split the thresholds were
  chosen on; the held-out test split is never used here) and its difference from eager
  fp32, plus the largest change of any probability;
* the forward pass per image at batch 1 and batch 16, in alternating rounds, as a ratio
  of eager fp32 measured in the same rounds.

The rule (issue 7): serve the fastest backend whose validation AUC is within 0.005 of
fp32. ONNX Runtime int8 is calibrated on training-split images, never on validation ones.
"""

from __future__ import annotations

import copy
import csv
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ddn_node.bench.common import header
from ddn_node.bench.model import _Logits, _onnx_runner
from ddn_node.model.artifact import ModelArtifact
from ddn_node.model.onnx_trunk import OnnxTrunk
from ddn_node.model.preprocess import prepare_batch
from ddn_node.training.data import read_label_csv
from ddn_node.training.images import load_image_file
from ddn_node.training.metrics import auc

AUC_TOLERANCE = 0.005
# AUC ranks; a radiologist sees the calls. A backend that keeps the AUC but flips many
# present/absent calls at the thresholds changes what the SR says.
MAX_FLIPS = 0.02


@dataclass
class BackendResult:
    name: str
    macro_auc: float
    delta_auc: float
    max_abs_dprob: float
    decisions_changed: float  # share of (image, finding) present/absent calls that flip
    ms_b1: float
    ms_b16: float
    ratio_b1: float  # speed vs eager fp32, > 1 is faster
    ratio_b16: float
    acceptable: bool


def _split_files(model: Path, split: str) -> set[str]:
    with (model / "split.csv").open(newline="") as fh:
        return {row["file"] for row in csv.DictReader(fh) if row["split"] == split}


def _tensor(paths: list[Path], art: ModelArtifact) -> torch.Tensor:
    batches = []
    for s in tqdm(range(0, len(paths), 32), desc="load images", unit="batch", leave=False):
        x, _ = prepare_batch([load_image_file(p) for p in paths[s : s + 32]], art.preprocess)
        batches.append(x)
    return torch.cat(batches)


def _variants(
    art: ModelArtifact, head: str, calibration: torch.Tensor
) -> dict[str, Callable[[torch.Tensor], Any]]:
    model = art.model.eval()
    eager = _Logits(model, head).eval()
    # A copy: converting a module to channels_last converts its parameters in place.
    cl = _Logits(copy.deepcopy(model), head).eval().to(memory_format=torch.channels_last)

    def torch_run(
        m: torch.nn.Module, channels_last: bool, bf16: bool
    ) -> Callable[[torch.Tensor], Any]:
        def run(x: torch.Tensor) -> Any:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return m(x).float()

        return run

    def bf16_backbone(x: torch.Tensor) -> Any:
        # What the worker runs with precision = "bf16": the backbone under autocast, the
        # attention, heads (and Grad-CAM) in fp32.
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                feats = cl.model.features(x)
            return cl.model.forward_from_features(feats.float(), heads=[head])[head]

    trunk = OnnxTrunk(model, art.preprocess.size, threads=torch.get_num_threads())

    def onnx_trunk(x: torch.Tensor) -> Any:
        # What the worker runs with backend = "onnxruntime": the trunk in ONNX Runtime, the
        # attention, pooling and heads (what Grad-CAM differentiates) in torch fp32.
        with torch.inference_mode():
            return cl.model.forward_from_features(trunk(x, torch.channels_last), heads=[head])[head]

    variants: dict[str, Callable[[torch.Tensor], Any]] = {
        "torch fp32 (eager, the reference)": torch_run(eager, False, False),
        "torch fp32 channels_last (precision = fp32)": torch_run(cl, True, False),
        "torch bf16 backbone, fp32 tail (precision = bf16)": bf16_backbone,
        "torch bf16 autocast, whole model": torch_run(cl, True, True),
        "ONNX Runtime trunk, torch tail (backend = onnxruntime)": onnx_trunk,
    }
    fp32_onnx = _onnx_runner(_Logits(model, head).eval(), int8=False, size=art.preprocess.size)
    variants["ONNX Runtime fp32"] = fp32_onnx
    int8_onnx = _onnx_runner(
        _Logits(model, head).eval(), int8=True, size=art.preprocess.size, calibration=calibration
    )
    variants["ONNX Runtime int8 (static QDQ, training-split calibration)"] = int8_onnx
    return variants


def _macro_auc(y: np.ndarray, p: np.ndarray) -> float:
    values = [a for k in range(y.shape[1]) if (a := auc(y[:, k], p[:, k])) is not None]
    return float(np.mean(values)) if values else float("nan")


def _probabilities(run: Callable[[torch.Tensor], Any], x: torch.Tensor) -> np.ndarray:
    out = []
    for s in range(0, len(x), 16):
        logits = run(x[s : s + 16])
        out.append(torch.sigmoid(torch.as_tensor(np.asarray(logits))).numpy())
    return np.concatenate(out).astype(np.float64)


def _timings(
    variants: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, rounds: int
) -> dict[str, dict[int, float]]:
    """Median ms per image at batch 1 and 16, variants alternating within every round."""
    samples: dict[str, dict[int, list[float]]] = {n: {1: [], 16: []} for n in variants}
    inputs = {1: x[:1], 16: x[:16]}
    for run in variants.values():  # warm-up
        run(inputs[1])
        run(inputs[16])
    for _ in range(rounds):
        for name, run in variants.items():
            for b, xb in inputs.items():
                t0 = time.perf_counter()
                run(xb)
                samples[name][b].append((time.perf_counter() - t0) * 1000 / b)
    return {n: {b: statistics.median(v) for b, v in per.items()} for n, per in samples.items()}


def run(
    model: Path = Path("models/ddn-cxr"),
    images: Path | None = None,
    labels: Path | None = None,
    rounds: int = 7,
) -> list[BackendResult] | None:
    header("inference backends: validation AUC and speed vs eager fp32", "ddn-node bench backends")
    if not (model / "manifest.json").is_file() or not (model / "split.csv").is_file():
        print(f"  (skipped: no artifact with a split.csv at {model})")
        return None
    art = ModelArtifact.load(model)
    head = next(iter(art.heads))
    data = art.manifest.training.get("data", {}) if isinstance(art.manifest.training, dict) else {}
    images = images or Path(str(data.get("images_dir", "../shared/data/nih/png256")))
    labels = labels or Path(str(data.get("labels_csv", "../shared/data/nih/labels.csv")))
    if not images.is_dir() or not labels.is_file():
        print(f"  (skipped: the training data is not at {images} / {labels})")
        return None
    table = read_label_csv(images, labels)
    val, train = _split_files(model, "val"), _split_files(model, "train")
    val_idx = [i for i, f in enumerate(table.files) if f in val]
    calib_idx = [i for i, f in enumerate(table.files) if f in train][:32]
    names = art.labels(head)
    cols = [table.labels.index(spec.name) for spec in names]
    y = table.targets[val_idx][:, cols]
    x_val = _tensor([table.paths[i] for i in val_idx], art)
    x_cal = _tensor([table.paths[i] for i in calib_idx], art)
    print(
        f"model: {art.name} {art.version}, head {head}; validation images: {len(val_idx)}, "
        f"int8 calibration: {len(calib_idx)} training images; torch threads {torch.get_num_threads()}"
    )
    variants = _variants(art, head, x_cal)
    probs = {
        n: _probabilities(v, x_val) for n, v in tqdm(variants.items(), desc="score", leave=False)
    }
    times = _timings(variants, x_val, rounds)
    ref_name = next(iter(variants))
    ref_auc, ref_p = _macro_auc(y, probs[ref_name]), probs[ref_name]
    thresholds = np.array([spec.threshold for spec in names])
    results = []
    for name in variants:
        a = _macro_auc(y, probs[name])
        results.append(
            BackendResult(
                name=name,
                macro_auc=a,
                delta_auc=a - ref_auc,
                max_abs_dprob=float(np.abs(probs[name] - ref_p).max()),
                decisions_changed=float(
                    ((probs[name] >= thresholds) != (ref_p >= thresholds)).mean()
                ),
                ms_b1=times[name][1],
                ms_b16=times[name][16],
                ratio_b1=times[ref_name][1] / times[name][1],
                ratio_b16=times[ref_name][16] / times[name][16],
                acceptable=abs(a - ref_auc) <= AUC_TOLERANCE,
            )
        )
    _print(results)
    return results


def _print(results: list[BackendResult]) -> None:
    print(
        f"{'backend':58s} {'val AUC':>8s} {'dAUC':>8s} {'max|dp|':>8s} {'flips':>6s} "
        f"{'ms b1':>7s} {'x b1':>6s} {'ms b16':>7s} {'x b16':>6s}"
    )
    for r in results:
        print(
            f"{r.name:58s} {r.macro_auc:8.4f} {r.delta_auc:+8.4f} {r.max_abs_dprob:8.4f} {r.decisions_changed:6.2%} "
            f"{r.ms_b1:7.1f} {r.ratio_b1:5.2f}x {r.ms_b16:7.1f} {r.ratio_b16:5.2f}x"
            + ("" if r.acceptable else "   (AUC moved more than 0.005: not acceptable)")
        )
    print(
        "flips: share of (image, finding) present/absent calls at the model's thresholds that differ from fp32"
    )
    ok = [r for r in results if r.acceptable]
    best = max(ok, key=lambda r: r.ratio_b1)
    print(
        f"fastest within {AUC_TOLERANCE} validation AUC (issue 7's rule), batch 1: {best.name} ({best.ratio_b1:.2f}x)"
    )
    steady = [r for r in ok if r.decisions_changed <= MAX_FLIPS]
    if steady:
        calm = max(steady, key=lambda r: r.ratio_b1)
        print(
            f"fastest that also flips <= {MAX_FLIPS:.0%} of the calls: {calm.name} ({calm.ratio_b1:.2f}x)"
        )
