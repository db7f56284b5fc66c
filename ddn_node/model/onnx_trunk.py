"""The DDN's convolutional trunk (everything up to ``layer4``) in ONNX Runtime.

Grad-CAM back-propagates only through the layers after ``layer4`` (attention, pooling, the
heads: :mod:`ddn_node.model.gradcam`), so the trunk never needs autograd. It is the
expensive part of a forward pass, and ONNX Runtime runs it faster than eager torch on a
CPU (``ddn-node bench backends`` measures both and checks the validation AUC). The tail
stays in torch, so probabilities and heat maps come from the same differentiable code as
with the torch backend.

The ONNX graph is exported from the weights the artifact loaded (safetensors), at load
time, into memory or into a cache directory keyed by the weights' sha256: a model file in
the repository is never a graph that could differ from the weights the manifest vouches for.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import nn

from ddn_node.model.ddn import DDN

log = structlog.get_logger()

OPSET = 17


class _Trunk(nn.Module):
    """``DDN.features`` as a one-tensor module, for the exporter."""

    def __init__(self, model: DDN) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def export_onnx(module: nn.Module, size: int, output: str = "features") -> bytes:
    """``module`` (eval mode, fp32, one image tensor in, one tensor out) as ONNX bytes for
    ``size`` x ``size`` inputs, batch axis dynamic."""
    buf = io.BytesIO()
    # The TorchScript exporter: it takes the module as it is, without tracing through
    # torch.export (whose deprecation warning it raises every time).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (torch.zeros(1, 3, size, size),),
            buf,  # type: ignore[arg-type]  # the stub says a path; the TorchScript exporter takes a file too
            dynamo=False,
            input_names=["x"],
            output_names=[output],
            dynamic_axes={"x": {0: "batch"}, output: {0: "batch"}},
            opset_version=OPSET,
        )
    return buf.getvalue()


def export_trunk(model: DDN, size: int) -> bytes:
    """The trunk of ``model`` (eval mode, fp32) as ONNX bytes, batch axis dynamic."""
    return export_onnx(_Trunk(model).eval(), size)


def _cached_export(model: DDN, size: int, weights_sha256: str, cache_dir: Path | None) -> bytes:
    if cache_dir is None:
        return export_trunk(model, size)
    # Keyed by the weights and by what shapes the graph: the same weights exported by
    # another torch may differ, so the versions are part of the name.
    name = f"trunk-{weights_sha256[:32]}-{size}-op{OPSET}-torch{torch.__version__}.onnx"
    path = cache_dir / name.replace("+", "_")
    try:
        return path.read_bytes()
    except OSError:
        pass
    data = export_trunk(model, size)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Written to a temporary name and renamed, so a concurrent worker never reads half.
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".part")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("model.onnx_cache_unwritable", path=str(cache_dir), error=str(exc)[:200])
    return data


class OnnxTrunk:
    """An ONNX Runtime session of one model's trunk: (B, 3, S, S) fp32 -> (B, C, h, w)."""

    def __init__(
        self,
        model: DDN,
        size: int,
        threads: int,
        weights_sha256: str = "",
        cache_dir: Path | None = None,
    ) -> None:
        import onnxruntime as ort

        data = _cached_export(model, size, weights_sha256, cache_dir if weights_sha256 else None)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The worker owns its process's cores the way torch's pool does (`torch_threads`).
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        # No busy-waiting between runs: torch's tail runs right after the trunk, and the
        # SCP, delivery and web threads share the cores; ORT's spinning pool starved them
        # (the tail took 5x longer next to it on 2 cores), for a few % on the trunk alone.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session: Any = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])

    def __call__(
        self, x: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
    ) -> torch.Tensor:
        """Features for the normalised batch ``x``, in ``memory_format`` (the tail's: its
        attention runs 5x faster on channels_last features when its weights are)."""
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        (out,) = self.session.run(["features"], {"x": arr})
        return torch.from_numpy(out).contiguous(memory_format=memory_format)
