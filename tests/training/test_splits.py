"""Patient-grouped splits: no patient ever in two parts or two folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ddn_node.training.data import read_label_csv
from ddn_node.training.splits import (
    kfold_groups,
    read_split_csv,
    split_from_assignment,
    train_val_test_split,
    write_split_csv,
)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=10, max_size=120),
    st.integers(2, 6),
    st.integers(0, 3),
)
def test_kfold_never_puts_a_patient_in_two_folds(patients: list[int], k: int, seed: int) -> None:
    ids = [str(p) for p in patients]
    if len(set(ids)) < k:
        return
    rng = np.random.default_rng(seed)
    targets = (rng.random((len(ids), 3)) < 0.3).astype(np.float32)
    folds = kfold_groups(ids, k, seed, targets)
    assert sorted(i for f in folds for i in f) == list(range(len(ids)))
    owners = [{ids[i] for i in f} for f in folds]
    for a in range(k):
        for b in range(a + 1, k):
            assert not owners[a] & owners[b]


def test_nih_five_folds_and_train_val_test_are_patient_disjoint(shared_data: Path) -> None:
    t = read_label_csv(shared_data / "nih" / "png256", shared_data / "nih" / "labels.csv")
    folds = kfold_groups(t.patients, 5, 0, t.targets)
    owners = [{t.patients[i] for i in f} for f in folds]
    assert all(not (owners[a] & owners[b]) for a in range(5) for b in range(a + 1, 5))
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) < 0.2 * np.mean(sizes)
    # every fold has positives of every label (AUC defined per fold)
    assert all(t.targets[f].sum(0).min() > 0 for f in folds)
    s = train_val_test_split(t.patients, 0.15, 0.15, 0, t.targets)
    parts = [{t.patients[i] for i in getattr(s, n)} for n in ("train", "val", "test")]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert len(s.train) + len(s.val) + len(s.test) == len(t)
    assert abs(len(s.test) / len(t) - 0.15) < 0.03


def test_split_csv_round_trip(tmp_path: Path) -> None:
    files = ["a.png", "b.png", "c.png"]
    s = train_val_test_split(["p1", "p2", "p3"], 0.34, 0.34, 0)
    write_split_csv(tmp_path / "split.csv", files, s.assignment(3))
    again = split_from_assignment(files, read_split_csv(tmp_path / "split.csv"))
    assert again == s
