#!/usr/bin/env bash
# GPU benchmark of the DDN (issue 8): batched inference, fp32 / bf16 / fp16 autocast,
# channels_last, CUDA graphs (torch.compile mode="reduce-overhead"), Grad-CAM overhead.
# Prints images/s and latency per image at batch 1 and at the best batch size, each
# against plain torchvision ResNet-50 fp32 measured in the same run.
#
#   bash bench/gpu.sh [models/ddn-cxr] [--no-compile]
#
# Needs a CUDA GPU and the project's venv (.venv). Writes bench-gpu.json in the cwd.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MODEL=${1:-models/ddn-cxr}
COMPILE=1
for a in "$@"; do [ "$a" = "--no-compile" ] && COMPILE=0; done
export MODEL COMPILE
exec "$PY" - <<'PYEOF'
import json, os, statistics, time
from pathlib import Path

import torch
import torchvision

from ddn_node.model.ddn import DDN, DDNConfig, HeadConfig
from ddn_node.model.gradcam import logits_and_cams

assert torch.cuda.is_available(), "bench/gpu.sh needs a CUDA device"
dev = torch.device("cuda")
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
model_dir = Path(os.environ["MODEL"])
if (model_dir / "manifest.json").is_file():
    from ddn_node.model.artifact import ModelArtifact
    art = ModelArtifact.load(model_dir)
    ddn, head, source = art.model, next(iter(art.heads)), f"{art.name} {art.version}"
else:
    ddn = DDN(DDNConfig(heads=(HeadConfig("cxr", tuple(f"l{i}" for i in range(14))),)))
    head, source = "cxr", "random DDN weights"
ddn = ddn.eval().to(dev, memory_format=torch.channels_last)
base = torchvision.models.resnet50(weights=None, num_classes=14).eval().to(dev)

def timed(fn, x, reps):
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps

def runner(m, dtype=None, cl=False):
    def run(x):
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            return m(x)
    return run

class Logits(torch.nn.Module):
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, x): return self.m(x, heads=[head])[head]

variants = {
    "resnet50 fp32 (baseline)": runner(base),
    "DDN fp32": runner(Logits(ddn)),
    "DDN channels_last fp32": runner(Logits(ddn), cl=True),
    "DDN channels_last bf16": runner(Logits(ddn), torch.bfloat16, cl=True),
    "DDN channels_last fp16": runner(Logits(ddn), torch.float16, cl=True),
}
if os.environ.get("COMPILE") == "1":
    t0 = time.perf_counter()
    graphed = torch.compile(Logits(ddn), mode="reduce-overhead")  # CUDA graphs
    variants["DDN bf16 torch.compile + CUDA graphs"] = runner(graphed, torch.bfloat16, cl=True)
    print(f"compile set up in {time.perf_counter() - t0:.1f} s (first calls compile)")

batches = [1, 8, 16, 32, 64, 128, 256]
results = {}
for name, fn in variants.items():
    results[name] = {}
    for b in batches:
        x = torch.randn(b, 3, 224, 224, device=dev)
        try:
            reps = 50 if b <= 16 else 10
            rounds = [timed(fn, x, reps) for _ in range(3)]
            s = statistics.median(rounds)
            results[name][b] = {"ms_per_image": 1000 * s / b, "images_per_s": b / s, "batch_latency_ms": 1000 * s}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break

base_name = "resnet50 fp32 (baseline)"
print(f"\nDDN GPU bench on {torch.cuda.get_device_name()} ({source}); torch {torch.__version__}")
print(f"{'variant':44s} {'b1 ms':>8s} {'b1 x':>6s} {'best b':>6s} {'img/s':>9s} {'x base':>7s}")
for name, r in results.items():
    best_b = max(r, key=lambda b: r[b]["images_per_s"])
    base_best = max(results[base_name].values(), key=lambda v: v["images_per_s"])["images_per_s"]
    print(f"{name:44s} {r[1]['batch_latency_ms']:8.2f} {results[base_name][1]['batch_latency_ms'] / r[1]['batch_latency_ms']:6.2f} "
          f"{best_b:6d} {r[best_b]['images_per_s']:9.0f} {r[best_b]['images_per_s'] / base_best:7.2f}")

# Grad-CAM overhead at batch 1 and 32, bf16 backbone, fp32 tail.
cam = {}
for b in (1, 32):
    x = torch.randn(b, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
    def fwd(x):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return ddn.forward_from_features(ddn.features(x), heads=[head])[head]
    def fwd_cam(x):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            f = ddn.features(x)
        logits_and_cams(ddn, f.float(), head, [[0, 1, 2]] * b)
    a, c = timed(fwd, x, 20), timed(fwd_cam, x, 20)
    cam[b] = {"forward_ms": 1000 * a, "forward_plus_3_cams_ms": 1000 * c, "overhead": c / a - 1}
    print(f"Grad-CAM (3 labels) batch {b}: forward {1000 * a:.2f} ms, +CAM {1000 * c:.2f} ms ({100 * (c / a - 1):+.1f}%)")
Path("bench-gpu.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "model": source, "throughput": results, "gradcam": cam}, indent=2))
PYEOF
