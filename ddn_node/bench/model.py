"""``ddn-node bench model``: how fast the DDN runs on this machine's CPU.

Everything is measured in one run, on the same machine, against a baseline measured in the
same run (torchvision ResNet-50, fp32, eager, ``inference_mode``), so ratios are
meaningful even on a shared machine whose absolute speed drifts:

* images/s and latency per image at batch 1 and batch 16: ResNet-50 vs the DDN, and the
  DDN with channels_last, bf16 autocast, torch.compile and ONNX Runtime fp32 / int8 where
  they are available;
* the Grad-CAM cost as a ratio of the DDN forward pass alone (target: < +15%), with the
  heat map mapped back to a 224 image and to a 2048 x 2048 source image;
* the end-to-end time per image from a DICOM file to probabilities + heat maps (target on a
  2-core CPU: < 0.5 s).

Variants are measured in alternating rounds (A B C A B C ...) and medians reported, so a
burst of load from another process hits every variant alike.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import torchvision
from torch import nn

from ddn_node.model.ddn import DDN, DDNConfig, HeadConfig
from ddn_node.model.gradcam import logits_and_cams
from ddn_node.model.preprocess import Geometry, fit_geometry, map_to_source

log = structlog.get_logger()

N_LABELS = 14
DEFAULT_MODEL = Path("models/ddn-cxr")


@dataclass
class BenchConfig:
    model: Path | None = None
    dicom: tuple[Path, ...] = ()
    rounds: int = 5
    threads: int = 0
    quick: bool = False
    json_out: Path | None = None
    batches: tuple[int, ...] = (1, 16)


@dataclass
class Variant:
    name: str
    run: Callable[[torch.Tensor], Any]
    note: str = ""
    times: dict[int, list[float]] = field(default_factory=dict)  # batch -> seconds per call


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _time_call(fn: Callable[[], Any], reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


class _Logits(nn.Module):
    """DDN -> one head's logits, a single-tensor output for tracing/exporting."""

    def __init__(self, model: DDN, head: str) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, heads=[self.head])[self.head]


def _load_ddn(cfg: BenchConfig) -> tuple[DDN, str, str]:
    path = cfg.model or (DEFAULT_MODEL if (DEFAULT_MODEL / "manifest.json").is_file() else None)
    if path is not None:
        from ddn_node.model.artifact import ModelArtifact

        art = ModelArtifact.load(path)
        head = next(iter(art.heads))
        return art.model.eval(), head, f"{art.name} {art.version}"
    torch.manual_seed(0)
    model = DDN(
        DDNConfig(heads=(HeadConfig("cxr", tuple(f"l{i}" for i in range(N_LABELS))),))
    ).eval()
    return model, "cxr", "random DDN weights (no artifact)"


def _variants(model: DDN, head: str, quick: bool) -> tuple[list[Variant], dict[str, str]]:
    skipped: dict[str, str] = {}
    base = torchvision.models.resnet50(weights=None, num_classes=N_LABELS).eval()
    base_cl = (
        torchvision.models.resnet50(weights=None, num_classes=N_LABELS)
        .eval()
        .to(memory_format=torch.channels_last)
    )
    ddn = _Logits(model, head).eval()
    ddn_cl = _Logits(DDN(model.config).eval(), head)
    ddn_cl.model.load_state_dict(model.state_dict())
    ddn_cl = ddn_cl.to(memory_format=torch.channels_last).eval()

    def infer(
        m: Callable[[torch.Tensor], Any], cl: bool = False, bf16: bool = False
    ) -> Callable[[torch.Tensor], Any]:
        def run(x: torch.Tensor) -> Any:
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return m(x)

        return run

    def no_grad_run(x: torch.Tensor) -> Any:
        with torch.no_grad():
            return ddn(x)

    out = [
        Variant("resnet50 fp32 (baseline)", infer(base)),
        Variant("resnet50 channels_last", infer(base_cl, cl=True)),
        Variant("DDN fp32", infer(ddn)),
        Variant("DDN fp32 no_grad (not inference_mode)", no_grad_run),
        Variant("DDN channels_last", infer(ddn_cl, cl=True)),
        Variant("DDN channels_last bf16 autocast", infer(ddn_cl, cl=True, bf16=True)),
    ]
    if not quick:
        try:
            t0 = time.perf_counter()
            compiled = torch.compile(ddn_cl, dynamic=False)
            with torch.inference_mode():
                for b in (1, 16):
                    compiled(
                        torch.randn(b, 3, 224, 224).contiguous(memory_format=torch.channels_last)
                    )
            out.append(
                Variant(
                    "DDN channels_last torch.compile",
                    infer(compiled, cl=True),
                    note=f"compile {time.perf_counter() - t0:.0f} s",
                )
            )
        except Exception as e:  # noqa: BLE001 - inductor needs a C++ toolchain; report, don't fail
            skipped["DDN torch.compile"] = (
                f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            )
    for name, make in (
        ("DDN ONNX Runtime fp32", False),
        ("DDN ONNX Runtime int8 (static QDQ)", True),
    ):
        try:
            out.append(Variant(name, _onnx_runner(ddn, int8=make)))
        except Exception as e:  # noqa: BLE001 - optional dependency chain (onnx, onnxruntime)
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return out, skipped


def _onnx_runner(
    model: nn.Module, int8: bool, size: int = 224, calibration: torch.Tensor | None = None
) -> Callable[[torch.Tensor], Any]:
    """An ONNX Runtime session of ``model``; int8 is calibrated on ``calibration`` (real
    images, for accuracy checks) or on noise (enough for timing)."""
    import onnxruntime as ort

    from ddn_node.model.onnx_trunk import export_onnx

    data = export_onnx(model, size, output="logits")
    if int8:
        import tempfile

        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        class _Calib(CalibrationDataReader):
            def __init__(self) -> None:
                if calibration is not None:
                    self.batches = iter(
                        [
                            {"x": calibration[i : i + 4].numpy()}
                            for i in range(0, len(calibration), 4)
                        ]
                    )
                    return
                g = torch.Generator().manual_seed(0)
                self.batches = iter(
                    [{"x": torch.randn(4, 3, size, size, generator=g).numpy()} for _ in range(4)]
                )

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.batches, None)

        with tempfile.TemporaryDirectory() as d:
            src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
            src.write_bytes(data)
            quantize_static(
                str(src),
                str(dst),
                _Calib(),
                quant_format=QuantFormat.QDQ,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8,
            )
            data = dst.read_bytes()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> Any:
        return sess.run(None, {"x": x.numpy()})[0]

    return run


def _measure(variants: list[Variant], batches: tuple[int, ...], rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, 3, 224, 224, generator=g) for b in batches}
    for v in variants:  # warm-up: first calls allocate, pick kernels, fill caches
        for b in batches:
            v.run(inputs[b])
    for _ in range(rounds):
        for b in batches:
            reps = 4 if b == 1 else 1
            for v in variants:
                v.times.setdefault(b, []).append(_time_call(partial(v.run, inputs[b]), reps))


def _gradcam_cost(model: DDN, head: str, rounds: int) -> dict[str, Any]:
    """DDN forward vs forward + Grad-CAM (1 and 3 labels), mapped to 224 and to 2048 px."""
    n_labels = len(model.config.head(head).labels)
    m = DDN(model.config).eval()
    m.load_state_dict(model.state_dict())
    m = m.to(memory_format=torch.channels_last)
    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(1)
    for b in (1, 16):
        x = torch.randn(b, 3, 224, 224, generator=g).contiguous(memory_format=torch.channels_last)
        geo_224 = fit_geometry(224, 224, 224)
        geo_big = fit_geometry(2048, 2048, 224)

        def fwd(x: torch.Tensor = x) -> torch.Tensor:
            with torch.inference_mode():
                return m.forward_from_features(m.features(x), heads=[head])[head]

        def cam(k: int, geo: Geometry | None, x: torch.Tensor = x, b: int = b) -> None:
            with torch.inference_mode():
                feats = m.features(x)
                m.forward_from_features(feats, heads=[head])
            _, cams = logits_and_cams(m, feats, head, [list(range(min(k, n_labels)))] * b)
            if geo is not None:
                for c in cams.values():
                    map_to_source(c, geo)

        cases: dict[str, Callable[[], Any]] = {
            "forward": fwd,
            "forward+cam1": lambda: cam(1, None),
            "forward+cam1->224px": partial(cam, 1, geo_224),
            "forward+cam3->224px": partial(cam, 3, geo_224),
            "forward+cam1->2048px": partial(cam, 1, geo_big),
        }
        for fn in cases.values():
            fn()
        times: dict[str, list[float]] = {k: [] for k in cases}
        reps = 5 if b == 1 else 1
        # The differences measured here are a few percent: more rounds than the throughput
        # table needs, or a burst of load elsewhere decides the sign.
        for _ in range(max(2 * rounds, 6)):
            for k, fn in cases.items():
                times[k].append(_time_call(fn, reps))
        med = {k: _median(v) for k, v in times.items()}
        out[f"batch{b}"] = {
            "ms_per_image": {k: 1000 * v / b for k, v in med.items()},
            "gradcam_overhead": {k: med[k] / med["forward"] - 1 for k in cases if k != "forward"},
        }
    return out


def _end_to_end(cfg: BenchConfig, rounds: int) -> list[dict[str, Any]]:
    """DICOM file -> display image -> probabilities + heat maps at the source size."""
    path = cfg.model or (DEFAULT_MODEL if (DEFAULT_MODEL / "manifest.json").is_file() else None)
    if path is None:
        return [{"skipped": "needs a model artifact (--model)"}]
    import tempfile

    from ddn_node.bench.common import write_instances

    with tempfile.TemporaryDirectory(prefix="ddn-bench-model-") as tmp:
        # By default the case (an uncompressed 2048 x 2048 DX) and a sample study.
        files = list(cfg.dicom) or [
            *write_instances(Path(tmp), 1, 2048),
            *sorted(Path("sample_studies").rglob("*.dcm"))[:1],
        ]
        return [_end_to_end_one(path, f, rounds) for f in files]


def _end_to_end_one(path: Path, dicom: Path, rounds: int) -> dict[str, Any]:
    from ddn_node.dicom.pixels import load_display_image
    from ddn_node.model.artifact import ModelArtifact
    from ddn_node.model.inference import Predictor

    art = ModelArtifact.load(path)
    head = next(iter(art.heads))
    predictor = Predictor(art, device="cpu")
    img = load_display_image(dicom)
    probs = predictor.predict([img], head=head, heatmaps=False)[0].probabilities
    # As shipped (whatever passes the thresholds on this image) and a fixed case of three
    # heat maps, so runs on different images stay comparable.
    top3 = sorted(probs, key=lambda k: -probs[k])[:3]
    h = art.head(head)
    forced = h.model_copy(
        update={
            "labels": [
                lab
                if lab.name not in top3
                else type(lab)(lab.name, lab.code, 0.0, lab.threshold_method)
                for lab in h.labels
            ]
        }
    )
    art3 = ModelArtifact(
        art.path,
        art.manifest.model_copy(update={"heads": {**art.manifest.heads, head: forced}}),
        art.model,
        art.weights_sha256,
    )
    predictor3 = Predictor(art3, device="cpu")

    def run(p: Predictor) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        im = load_display_image(dicom)
        t1 = time.perf_counter()
        pred = p.predict([im], head=head, heatmaps=True)[0]
        return t1 - t0, time.perf_counter() - t0, len(pred.heatmaps)

    run(predictor)
    shipped, three, decode = [], [], []
    n_maps = 0
    workers = _worker_variants(art)
    worker_times: dict[str, list[float]] = {k: [] for k in workers}
    for fn in workers.values():  # warm-up
        fn(dicom, head)
    for _ in range(rounds):
        d, t, n_maps = run(predictor)
        shipped.append(t)
        decode.append(d)
        three.append(run(predictor3)[1])
        for name, fn in workers.items():
            worker_times[name].append(fn(dicom, head))
    base = _median(shipped)
    return {
        "dicom": str(dicom),
        "image_size": list(img.shape),
        "decode_ms": 1000 * _median(decode),
        "as_shipped": {"seconds": base, "heatmaps": n_maps},
        "three_heatmaps": {"seconds": _median(three)},
        "as_the_worker_runs_it": {
            name: {"seconds": _median(v), "speed_vs_as_shipped": base / _median(v)}
            for name, v in worker_times.items()
        },
        "target_seconds": 0.5,
    }


def _worker_variants(art: Any) -> dict[str, Callable[[Path, str], float]]:
    """File -> probabilities + heat maps as ``pipeline/analysis.py`` runs it: the display
    image no wider than the overlays (JPEG 2000 from a lower level), heat maps as wide as
    the SR's outline grid, for each backend the worker offers. Seconds per call."""
    from ddn_node.dicom.pixels import load_display_image
    from ddn_node.dicom.results.overlay import MAX_SIDE
    from ddn_node.dicom.results.region import CONTOUR_GRID
    from ddn_node.model.inference import Predictor

    out: dict[str, Callable[[Path, str], float]] = {}
    for name, precision, backend in (
        ("worker, backend torch fp32", "fp32", "torch"),
        ("worker, backend torch bf16", "bf16", "torch"),
        ("worker, backend onnxruntime", "fp32", "onnxruntime"),
    ):
        try:
            p = Predictor(
                art,
                device="cpu",
                heatmap_max_side=CONTOUR_GRID,
                precision=precision,
                backend=backend,
            )
        except Exception as e:  # noqa: BLE001 - an optional backend: report, don't fail
            log.info("bench.variant_skipped", variant=name, error=str(e)[:200])
            continue

        def run(dicom: Path, head: str, p: Predictor = p) -> float:
            t0 = time.perf_counter()
            p.predict([load_display_image(dicom, max_side=MAX_SIDE)], head=head, heatmaps=True)
            return time.perf_counter() - t0

        out[name] = run
    return out


def _wg04_j2k() -> tuple[Path, ...]:
    """The real 2140 x 1760 JPEG 2000 CR of the shared test data, where it is."""
    path = Path("../shared/data/dicom/xray_other_real/wg04__RG2_J2KR.dcm")
    return (path,) if path.is_file() else ()


def _large_j2k(folder: Path, side: int = 3000) -> Path:
    """A lossless 12-bit JPEG 2000 DX of ``side`` x ``side`` (a smooth synthetic chest),
    as a modality sends a large radiograph."""
    import openjpeg
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    from ddn_node.bench.common import dx_instance

    ds = dx_instance(pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), 64, seed=0)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    body = 1800 + 900 * np.exp(-((xx - 0.5) ** 2) / 0.02)  # the mediastinum
    lungs = 700 * (np.exp(-((xx - 0.3) ** 2 + (yy - 0.45) ** 2) / 0.02))
    lungs += 700 * np.exp(-((xx - 0.7) ** 2 + (yy - 0.45) ** 2) / 0.02)
    noise = np.random.default_rng(0).normal(0, 25, (side, side))
    arr = np.clip(body - lungs + noise, 0, 4095).astype(np.uint16)
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([openjpeg.encode(arr, bits_stored=12)])
    ds["PixelData"].VR = "OB"
    path = folder / "large-j2k.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _j2k_decoders(rounds: int, extra: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """A large JPEG 2000 image through each installed decoder at full resolution, against
    the node's path (at full resolution, and as the worker asks for it: no wider than the
    overlays), in alternating rounds."""
    import tempfile
    import warnings

    import pydicom
    from pydicom.pixels import pixel_array

    from ddn_node.dicom.pixels import load_display_image
    from ddn_node.dicom.results.overlay import MAX_SIDE

    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ddn-bench-j2k-") as tmp:
        files = [_large_j2k(Path(tmp)), *extra]
        for path in files:
            ds = pydicom.dcmread(path)
            cases: dict[str, Callable[[], Any]] = {}
            for plugin in ("pylibjpeg", "pillow", "gdcm"):

                def decode(plugin: str = plugin, ds: Any = ds) -> Any:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        return pixel_array(ds, decoding_plugin=plugin)

                try:
                    decode()
                except Exception:  # noqa: BLE001 - not installed, or refuses this file
                    continue
                cases[
                    f"pydicom + {plugin}" + (" (never used: unsafe)" if plugin == "gdcm" else "")
                ] = decode
            cases["node: display image, full resolution"] = partial(load_display_image, path)
            cases[f"node: display image, max_side {MAX_SIDE} (the worker)"] = partial(
                load_display_image, path, max_side=MAX_SIDE
            )
            for fn in cases.values():
                fn()
            times: dict[str, list[float]] = {k: [] for k in cases}
            for _ in range(max(3, rounds)):
                for k, fn in cases.items():
                    times[k].append(_time_call(fn, 1))
            med = {k: _median(v) for k, v in times.items()}
            fastest = min(v for k, v in med.items() if not k.startswith("node"))
            out.append(
                {
                    "dicom": path.name if path.parent == Path(tmp) else str(path),
                    "size": [int(ds.Rows), int(ds.Columns)],
                    "ms": {k: 1000 * v for k, v in med.items()},
                    "vs_fastest_full_decoder": {k: v / fastest for k, v in med.items()},
                }
            )
    return out


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    rounds = max(1, 2 if cfg.quick else cfg.rounds)
    model, head, source = _load_ddn(cfg)
    variants, skipped = _variants(model, head, cfg.quick)
    _measure(variants, cfg.batches, rounds)
    base = variants[0]
    rows = []
    for v in variants:
        row: dict[str, Any] = {"variant": v.name, "note": v.note}
        for b in cfg.batches:
            med = _median(v.times[b])
            row[f"batch{b}"] = {
                "latency_ms_per_image": 1000 * med / b,
                "images_per_s": b / med,
                "speed_vs_baseline": _median(base.times[b]) / med,
            }
        rows.append(row)
    result: dict[str, Any] = {
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": __import__("os").cpu_count(),
        },
        "model": source,
        "rounds": rounds,
        "throughput": rows,
        "skipped": skipped,
        "gradcam": _gradcam_cost(model, head, rounds),
        "end_to_end": _end_to_end(cfg, rounds),
        "jpeg2000": _j2k_decoders(rounds, _wg04_j2k()),
    }
    _print(result)
    if cfg.json_out:
        cfg.json_out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("bench.model_done", variants=len(rows), skipped=len(skipped))
    return result


def _print(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=150)  # a pipe or CI log would otherwise wrap the table at 80 columns
    con.print(
        f"[bold]ddn-node bench model[/]  {r['model']}; torch {r['machine']['torch']}, {r['machine']['threads']} threads, medians of {r['rounds']} alternating rounds"
    )
    t = Table(
        "variant",
        "b1 ms/img",
        "b1 img/s",
        "b1 x base",
        "b16 ms/img",
        "b16 img/s",
        "b16 x base",
        "note",
    )
    for row in r["throughput"]:
        b1, b16 = row.get("batch1", {}), row.get("batch16", {})
        t.add_row(
            row["variant"],
            f"{b1.get('latency_ms_per_image', float('nan')):.1f}",
            f"{b1.get('images_per_s', float('nan')):.1f}",
            f"{b1.get('speed_vs_baseline', float('nan')):.2f}",
            f"{b16.get('latency_ms_per_image', float('nan')):.1f}",
            f"{b16.get('images_per_s', float('nan')):.1f}",
            f"{b16.get('speed_vs_baseline', float('nan')):.2f}",
            row["note"],
        )
    con.print(t)
    for k, v in r["skipped"].items():
        con.print(f"  skipped {k}: {v}")
    g = Table("Grad-CAM", "b1 ms/img", "b1 overhead", "b16 ms/img", "b16 overhead")
    for k in r["gradcam"]["batch1"]["ms_per_image"]:
        g.add_row(
            k,
            f"{r['gradcam']['batch1']['ms_per_image'][k]:.1f}",
            ""
            if k == "forward"
            else f"{100 * r['gradcam']['batch1']['gradcam_overhead'][k]:+.1f}%",
            f"{r['gradcam']['batch16']['ms_per_image'][k]:.1f}",
            ""
            if k == "forward"
            else f"{100 * r['gradcam']['batch16']['gradcam_overhead'][k]:+.1f}%",
        )
    con.print(g)
    for e in r["end_to_end"]:
        if "skipped" in e:
            con.print(f"end to end: skipped ({e['skipped']})")
            continue
        con.print(
            f"end to end {e['dicom']} {e['image_size']}: decode {e['decode_ms']:.0f} ms; DICOM -> probabilities + "
            f"{e['as_shipped']['heatmaps']} heat map(s) {e['as_shipped']['seconds']:.3f} s; with 3 heat maps "
            f"{e['three_heatmaps']['seconds']:.3f} s (target < {e['target_seconds']} s)"
        )
        for name, v in e.get("as_the_worker_runs_it", {}).items():
            con.print(
                f"  {name}: DICOM -> probabilities + heat maps {v['seconds']:.3f} s "
                f"({v['speed_vs_as_shipped']:.2f}x the line above, same rounds)"
            )
    for j in r.get("jpeg2000", []):
        con.print(
            f"JPEG 2000 decode, {j['dicom']} {j['size']}: median ms (x the fastest full-resolution decoder)"
        )
        for k, ms in j["ms"].items():
            con.print(f"  {k:48s} {ms:7.1f} ms  {j['vs_fastest_full_decoder'][k]:5.2f}x")
