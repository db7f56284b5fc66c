"""A model's drift reference: what its validation set looked like, beside its weights.

``drift_reference.json`` in the artifact folder holds, for the validation split the
training run kept for early stopping and thresholds, one value per validation image of
each numeric input feature (intensity mean and spread, image size) and of each score (the
abnormality score and every label's probability), and the counts of each categorical
feature (the view). The raw values, not histograms: they are few (one per validation
image), and the drift monitor bins them as it likes and runs the KS test on them exactly.

``ddn-node model drift-reference`` writes it (``training/drift_reference.py``); the node
reads it (``pipeline/drift.py``). The features of an image are computed here, once, so the
reference and the node measure the same thing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FILE = "drift_reference.json"
SCHEMA_VERSION = 1

# The numeric input features; the scores are "score" and "p:<label>".
INTENSITY_MEAN = "intensity_mean"
INTENSITY_STD = "intensity_std"
SIZE = "size"  # the long side in pixels, as the header gives it (Rows, Columns)
SCORE = "score"
VIEW = "view"  # PA / AP / LL ... (View Position)
MANUFACTURER = "manufacturer"


def label_feature(label: str) -> str:
    return f"p:{label}"


def intensity_stats(image: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of a display image (float in [0, 1], bright = dense),
    on a 4x-strided grid: two numbers that move when the exposure, the windowing or the
    photometric sense changes, at a sixteenth of the cost of reading every pixel."""
    grid = np.asarray(image[::4, ::4], dtype=np.float64)
    return float(grid.mean()), float(grid.std())


@dataclass(frozen=True)
class DriftReference:
    numeric: dict[str, list[float]]  # feature -> one value per validation image
    categorical: dict[str, dict[str, int]] = field(default_factory=dict)  # feature -> counts
    provenance: dict[str, Any] = field(default_factory=dict)  # how it was produced

    def to_json(self) -> str:
        return json.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "provenance": self.provenance,
                "numeric": {k: [round(v, 6) for v in vs] for k, vs in self.numeric.items()},
                "categorical": self.categorical,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> DriftReference:
        raw = json.loads(text)
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"drift reference schema {raw.get('schema_version')!r}")
        return cls(
            numeric={k: [float(v) for v in vs] for k, vs in raw["numeric"].items()},
            categorical={
                k: {str(c): int(n) for c, n in counts.items()}
                for k, counts in raw.get("categorical", {}).items()
            },
            provenance=dict(raw.get("provenance", {})),
        )


def load_reference(directory: Path | str) -> DriftReference | None:
    """The artifact's reference, or None where it has none (drift is then not judged)."""
    path = Path(directory) / FILE
    if not path.is_file():
        return None
    return DriftReference.from_json(path.read_text(encoding="utf-8"))


def write_reference(directory: Path | str, reference: DriftReference) -> Path:
    path = Path(directory) / FILE
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(reference.to_json() + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
