"""Patient-grouped splits.

Images of one patient are strongly correlated (same anatomy, often the same finding on
follow-up), so every split here assigns whole patients, never single images: a patient in
both training and test would inflate every metric (see the NIH ChestX-ray14 README's
official patient-wise split for the same reason).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """Indices into a table for each part; no patient appears in two parts."""

    train: list[int]
    val: list[int]
    test: list[int]

    def assignment(self, n: int) -> list[str]:
        out = [""] * n
        for name in SPLIT_NAMES:
            for i in getattr(self, name):
                out[i] = name
        return out


def _patient_order(patients: Sequence[str], seed: int) -> list[str]:
    uniq = sorted(set(patients))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    return uniq


def _balanced_groups(
    patients: Sequence[str], targets: np.ndarray | None, n_groups: int, seed: int
) -> dict[str, int]:
    """Assign patients to ``n_groups`` groups of roughly equal image counts.

    When targets are given, patients carrying the rarest labels are dealt first, round-robin,
    so that every group gets some positives of every label (a greedy form of iterative
    stratification, Sechidis et al., ECML PKDD 2011), which keeps per-label AUCs defined.
    """
    order = _patient_order(patients, seed)
    idx_of: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        idx_of.setdefault(p, []).append(i)
    if targets is not None and targets.size:
        freq = targets.sum(0) + 1e-9
        rarity = {
            p: float(np.min(np.where(targets[idx_of[p]].max(0) > 0, freq, np.inf))) for p in order
        }
        # Stable sort keeps the seeded shuffle as tie-break.
        order = sorted(order, key=lambda p: rarity[p])
    sizes = [0] * n_groups
    label_counts = np.zeros((n_groups, targets.shape[1] if targets is not None else 1))
    group: dict[str, int] = {}
    for p in order:
        n = len(idx_of[p])
        if targets is not None:
            pos = targets[idx_of[p]].max(0)
            # Prefer the group with the fewest positives of this patient's labels, then the smallest.
            score = [(float((label_counts[g] * pos).sum()), sizes[g], g) for g in range(n_groups)]
        else:
            score = [(0.0, sizes[g], g) for g in range(n_groups)]
        g = min(score)[2]
        group[p] = g
        sizes[g] += n
        if targets is not None:
            label_counts[g] += targets[idx_of[p]].max(0)
    return group


def kfold_groups(
    patients: Sequence[str], k: int, seed: int = 0, targets: np.ndarray | None = None
) -> list[list[int]]:
    """K folds of image indices; each patient's images all fall in one fold."""
    if k < 2:
        raise ValueError("k-fold needs k >= 2")
    if len(set(patients)) < k:
        raise ValueError(f"{len(set(patients))} patients cannot fill {k} folds")
    group = _balanced_groups(patients, targets, k, seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for i, p in enumerate(patients):
        folds[group[p]].append(i)
    return folds


def train_val_test_split(
    patients: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int = 0,
    targets: np.ndarray | None = None,
) -> Split:
    """Patient-disjoint train/val/test split with roughly the requested image fractions.

    Built from 20 balanced patient groups (5% each), so fractions are rounded to 5%.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("fractions must be in [0, 1) and sum to less than 1")
    n_groups = 20
    group = _balanced_groups(patients, targets, n_groups, seed)
    n_test = round(test_fraction * n_groups)
    n_val = round(val_fraction * n_groups)
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, p in enumerate(patients):
        g = group[p]
        name = "test" if g < n_test else "val" if g < n_test + n_val else "train"
        parts[name].append(i)
    return Split(parts["train"], parts["val"], parts["test"])


def write_split_csv(path: Path, files: Sequence[str], assignment: Sequence[str]) -> None:
    """Record which image went where (file name + split; no patient identifiers)."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "split"])
        for f, s in sorted(zip(files, assignment, strict=True)):
            w.writerow([f, s])


def read_split_csv(path: Path) -> dict[str, str]:
    with path.open(newline="") as fh:
        return {r["file"]: r["split"] for r in csv.DictReader(fh)}


def split_from_assignment(files: Sequence[str], recorded: dict[str, str]) -> Split:
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, f in enumerate(files):
        s = recorded.get(f)
        if s in parts:
            parts[s].append(i)
    return Split(parts["train"], parts["val"], parts["test"])
