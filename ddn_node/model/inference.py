"""Batched inference engine used by the node's worker.

    art = ModelArtifact.load(Path("models/ddn-cxr"))
    p = Predictor(art, device="cpu", threads=0)
    preds = p.predict(images, head="cxr", sop_instance_uids=uids, heatmaps=True)
    score = p.abnormality_score("cxr", p.study_probabilities(preds, "cxr"))

Images are display images from :func:`ddn_node.dicom.pixels.load_display_image`. For each
batch the backbone runs once under ``inference_mode``; when heat maps are wanted, the
logits come from the same differentiable tail that Grad-CAM back-propagates through, so
probabilities and heat maps cost one backbone pass. :meth:`Predictor.predict_deferred`
returns the probabilities first and keeps the features for :meth:`Predictor.add_heatmaps`.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch

from ddn_node.model.artifact import ModelArtifact
from ddn_node.model.gradcam import logits_and_cams
from ddn_node.model.onnx_trunk import OnnxTrunk
from ddn_node.model.preprocess import Geometry, map_to_source, prepare_batch
from ddn_node.model.types import ImagePrediction

log = structlog.get_logger()


@dataclass(frozen=True)
class _Batch:
    start: int  # index of the batch's first image
    features: torch.Tensor
    probs: np.ndarray
    geoms: list[Geometry]


@dataclass(frozen=True)
class ForwardPass:
    """What one forward pass leaves for the heat maps: the backbone features and the
    probabilities that decide which labels get a map."""

    head: str
    batches: list[_Batch]


class Predictor:
    """Runs one artifact on CPU or GPU, in batches."""

    def __init__(
        self,
        artifact: ModelArtifact,
        device: str = "cpu",
        threads: int = 0,
        batch_size: int = 16,
        channels_last: bool = True,
        precision: str = "fp32",
        backend: str = "torch",
        heatmap_max_side: int | None = None,
        onnx_cache_dir: Path | None = None,
    ) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but CUDA is not available")
        if threads > 0:
            # torch's intra-op pool is process-wide; the worker owns its process, so setting
            # it here is what the operator's `threads` setting means.
            torch.set_num_threads(threads)
        self.artifact = artifact
        self.device = torch.device(device)
        self.batch_size = max(1, batch_size)
        self._fmt = torch.channels_last if channels_last else torch.contiguous_format
        # Module.to takes a device and a memory_format together; its stub overloads do not.
        self.model = artifact.model.to(self.device, memory_format=self._fmt).eval()  # type: ignore[call-overload]
        self.spec = artifact.preprocess
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        # bf16 covers the backbone only: the features come back as fp32, so the heads,
        # the probabilities and Grad-CAM's back-propagation all run in fp32.
        self.bf16 = precision == "bf16"
        if backend not in ("torch", "onnxruntime"):
            raise ValueError(f"backend must be 'torch' or 'onnxruntime', got {backend!r}")
        self.backend = backend
        # The trunk (up to layer4) in ONNX Runtime, the tail in torch: Grad-CAM only
        # differentiates the tail, so the maps are computed exactly as with torch.
        self._trunk: OnnxTrunk | None = None
        if backend == "onnxruntime":
            if self.device.type != "cpu":
                raise ValueError("backend 'onnxruntime' runs on the CPU only (device = 'cpu')")
            if self.bf16:
                raise ValueError(
                    "precision 'bf16' is a torch autocast setting: use backend 'torch'"
                )
            self._trunk = OnnxTrunk(
                artifact.model,
                self.spec.size,
                threads=torch.get_num_threads(),
                weights_sha256=artifact.weights_sha256,
                cache_dir=onnx_cache_dir,
            )
        # Heat maps at most this many pixels on their long side (aspect kept), None: at the
        # source image's size. Every consumer resamples a map against the source's Rows
        # and Columns, so a worker that outlines on a 256 grid and parks maps at 256 px
        # need not draw 2048 x 2048 maps first (most of the Grad-CAM stage's time).
        self.heatmap_max_side = heatmap_max_side
        self.timings_ms: dict[str, float] = {}

    def predict(
        self,
        images: Sequence[np.ndarray],
        head: str,
        sop_instance_uids: Sequence[str] | None = None,
        heatmaps: bool = True,
    ) -> list[ImagePrediction]:
        """Probabilities per label for each image; heat maps for labels at/above threshold."""
        predictions, forward = self.predict_deferred(images, head, sop_instance_uids)
        if heatmaps:
            self.add_heatmaps(predictions, forward)
        return predictions

    def predict_deferred(
        self,
        images: Sequence[np.ndarray],
        head: str,
        sop_instance_uids: Sequence[str] | None = None,
    ) -> tuple[list[ImagePrediction], ForwardPass]:
        """Probabilities now; what :meth:`add_heatmaps` needs to draw the heat maps later.

        The worker reports the findings before it spends time on heat maps.
        """
        labels = self.artifact.head(head).labels
        uids = (
            list(sop_instance_uids)
            if sop_instance_uids is not None
            else [str(i) for i in range(len(images))]
        )
        if len(uids) != len(images):
            raise ValueError("one SOP Instance UID per image")
        out: list[ImagePrediction] = []
        batches: list[_Batch] = []
        t_model = 0.0
        for s in range(0, len(images), self.batch_size):
            chunk = images[s : s + self.batch_size]
            x, geoms = prepare_batch(chunk, self.spec)
            t0 = time.perf_counter()
            with torch.inference_mode():
                if self._trunk is not None:
                    feats = self._trunk(x, self._fmt)
                else:
                    x = x.to(self.device).contiguous(memory_format=self._fmt)
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                        feats = self.model.features(x)
                feats = feats.float()
                logits = self.model.forward_from_features(feats, heads=[head])[head]
            probs = self.model.probabilities({head: logits})[head].float().cpu().numpy()
            t_model += time.perf_counter() - t0
            batches.append(_Batch(s, feats, probs, geoms))
            out.extend(
                ImagePrediction(
                    sop_instance_uid=uids[s + b],
                    probabilities={spec.name: float(probs[b, k]) for k, spec in enumerate(labels)},
                )
                for b in range(len(chunk))
            )
        self.timings_ms = {"model": 1000 * t_model}
        return out, ForwardPass(head, batches)

    def add_heatmaps(
        self,
        predictions: Sequence[ImagePrediction],
        forward: ForwardPass,
        only: Collection[str] | None = None,
    ) -> None:
        """Grad-CAM heat maps, at source size (at most ``heatmap_max_side`` wide), for the
        labels at/above their threshold and in ``only`` when given (the labels whose maps
        carry evidence), into ``predictions[i].heatmaps`` (the predictions
        :meth:`predict_deferred` made)."""
        labels = self.artifact.head(forward.head).labels
        # A normal class has nothing to point at: never mapped, whatever ``only`` says.
        normal = self.artifact.head(forward.head).normal_labels
        allowed = [
            (only is None or spec.name in only) and spec.name not in normal for spec in labels
        ]
        t1 = time.perf_counter()
        for batch in forward.batches:
            n = batch.probs.shape[0]
            # Which labels pass their threshold is known only after the forward pass; the
            # cheap tail then runs once more, with gradients, inside logits_and_cams.
            wanted = [
                [
                    k
                    for k, spec in enumerate(labels)
                    if allowed[k] and batch.probs[b, k] >= spec.threshold
                ]
                for b in range(n)
            ]
            if not any(wanted):
                continue
            _, cams = logits_and_cams(self.model, batch.features, forward.head, wanted)
            for b in range(n):
                ks = [k for k in range(len(labels)) if (b, k) in cams]
                if ks:
                    # All of one image's maps are resized in one call: one pass at full size.
                    maps = map_to_source(
                        torch.stack([cams[(b, k)] for k in ks]).float().cpu(),
                        batch.geoms[b],
                        max_side=self.heatmap_max_side,
                    )
                    for i, k in enumerate(ks):
                        predictions[batch.start + b].heatmaps[labels[k].name] = maps[i]
        self.timings_ms["gradcam"] = 1000 * (time.perf_counter() - t1)

    def study_probabilities(
        self, predictions: Sequence[ImagePrediction], head: str | None = None
    ) -> dict[str, float]:
        """Study-level probabilities (see :func:`study_probabilities`)."""
        normal = self.artifact.head(head).normal_labels if head is not None else frozenset()
        return study_probabilities(predictions, normal)

    def abnormality_score(self, head: str, probabilities: Mapping[str, float]) -> float:
        """The head's abnormality score in [0, 1], as its manifest defines it."""
        return abnormality_score(self.artifact, head, probabilities)


def study_probabilities(
    predictions: Sequence[ImagePrediction], normal: Collection[str] = ()
) -> dict[str, float]:
    """Study-level probabilities: per label the maximum over the study's images, so the
    image that shows a finding most decides it; for a ``normal`` class the minimum, so
    the most abnormal image decides that too (one tumour slice among twenty normal ones
    makes the study abnormal, where the maximum would let the most normal slice decide).
    """
    study: dict[str, float] = {}
    for p in predictions:
        for k, v in p.probabilities.items():
            pick = min if k in normal else max
            study[k] = pick(study[k], v) if k in study else v
    return study


def abnormality_score(
    artifact: ModelArtifact, head: str, probabilities: Mapping[str, float]
) -> float:
    definition = artifact.head(head).abnormality
    names = definition.labels or artifact.head(head).label_names
    if definition.kind == "complement":
        return float(min(1.0, max(0.0, 1.0 - float(probabilities[names[0]]))))
    vals = [float(probabilities[n]) for n in names if n in probabilities]
    if not vals:
        raise ValueError(f"no probabilities for the labels of head {head!r}")
    return float(min(1.0, max(0.0, max(vals))))
