"""A small model artifact with chosen thresholds, for pipeline tests.

It has the bundled model's structure (DDN, a 'cxr' head with NIH label names and SNOMED
codes) on the tiny test backbone, so a study is analysed in milliseconds, and thresholds
chosen by the test (0.0 makes every finding positive: heat maps, Parametric Maps and
overlays are then always produced). ``evidence`` writes a localisation record into the
manifest (label -> whether its maps may be shown), as ``ddn-node evaluate`` would: the
node's default heat-map policy then draws maps for exactly those labels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ddn_node.model.artifact import (
    AbnormalityDef,
    HeadInfo,
    Manifest,
    WeightsModel,
    architecture_of,
    save_artifact,
)
from ddn_node.model.ddn import DDN, DDNConfig, HeadConfig
from ddn_node.model.preprocess import PreprocessSpec
from ddn_node.model.types import Code, LabelSpec

LABELS = (
    ("Pneumothorax", Code("36118008", "SCT", "Pneumothorax")),
    ("Effusion", Code("60046008", "SCT", "Pleural effusion")),
    ("Nodule", Code("427359005", "SCT", "Solitary nodule of lung")),
)


def make_test_artifact(
    directory: Path,
    threshold: float = 0.0,
    seed: int = 0,
    evidence: Mapping[str, bool] | None = None,
    version: str = "2026.11.27-test",
) -> Path:
    torch.manual_seed(seed)
    config = DDNConfig(
        backbone="tiny", heads=(HeadConfig("cxr", tuple(name for name, _ in LABELS)),)
    )
    model = DDN(config).eval()
    manifest = Manifest(
        name="ddn-test",
        version=version,
        algorithm_name="DDN test model",
        architecture=architecture_of(model.config),
        heads={
            "cxr": HeadInfo(
                activation="sigmoid",
                labels=[
                    LabelSpec(name, code, threshold, "fixed by the test") for name, code in LABELS
                ],
                abnormality=AbnormalityDef(kind="max_probability"),
            )
        },
        preprocess=PreprocessSpec(size=64),
        weights=WeightsModel(sha256="", dtype="float16", n_parameters=0),
    )
    save_artifact(directory, model, manifest)
    if evidence is not None:
        _record_evidence(directory, evidence)
    return directory


def _record_evidence(directory: Path, evidence: Mapping[str, bool]) -> None:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    data["heads"]["cxr"]["localisation"] = {
        "rule": {"kind": "ci_lower_bound", "decided_on": "val"},
        "weights_sha256": data["weights"]["sha256"],
        "labels": {
            name: {
                "maps_shown": shown,
                "reason": "set by the test: beats both baselines"
                if shown
                else "set by the test: below the centre prior",
            }
            for name, shown in evidence.items()
        },
    }
    path.write_text(json.dumps(data, indent=1))
