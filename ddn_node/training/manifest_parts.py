"""Parts of an artifact's manifest that every way of training a head builds.

Both ``ddn-node train`` (:mod:`ddn_node.training.train`) and ``ddn-node train
--add-head-to`` (:mod:`ddn_node.training.heads`) write a :class:`~ddn_node.model.artifact.HeadInfo`:
label specs with codes and thresholds, the abnormality-score definition, JSON-safe metrics
and the command that produced them. They live here so that neither module reaches into the
other's private helpers; this module imports only from ``ddn_node.model`` and
:mod:`ddn_node.training.metrics`, so there is no import cycle.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ddn_node.model.artifact import AbnormalityDef
from ddn_node.model.codes import code_for
from ddn_node.model.types import LabelSpec
from ddn_node.training.data import LabelTable
from ddn_node.training.metrics import choose_threshold


def command_line() -> str:
    """The command as typed, with the console script's name (for the manifest)."""
    return " ".join(["ddn-node", *(shlex.quote(a) for a in sys.argv[1:])])


def label_specs(
    labels: Sequence[str], thresholds: Sequence[float], methods: Sequence[str]
) -> list[LabelSpec]:
    """One :class:`LabelSpec` per label: its code (``model.codes``), threshold and how it was chosen."""
    return [
        LabelSpec(lab, code_for(lab), float(t), m)
        for lab, t, m in zip(labels, thresholds, methods, strict=True)
    ]


def abnormality_def(table: LabelTable) -> AbnormalityDef:
    """How the head's probabilities become one abnormality score.

    A softmax head with a class that marks every normal image (e.g. ``notumor``) scores
    1 - P(normal class); every other head scores its highest finding probability.
    """
    if table.activation == "softmax":
        normal = [
            lab
            for lab in table.labels
            if table.normal[table.targets[:, table.labels.index(lab)] > 0].all()
        ]
        normal = [n for n in normal if table.targets[:, table.labels.index(n)].sum() > 0]
        if normal:
            return AbnormalityDef(
                kind="complement",
                labels=[normal[0]],
                description=f"1 - P({normal[0]}): the probability that the image is not in the normal class",
            )
    return AbnormalityDef(
        kind="max_probability",
        labels=list(table.labels),
        description="highest finding probability over the head's labels (study level: max over images)",
    )


def choose_thresholds(
    y: np.ndarray, p: np.ndarray | None, labels: Sequence[str], where: str
) -> tuple[list[float], list[str]]:
    """Per-label thresholds (max F1 on ``p``; 0.5 without predictions) and their method strings.

    ``where`` names the data the thresholds were chosen on, e.g. "the validation split".
    """
    thr, meth = [], []
    for j in range(len(labels)):
        if p is None:
            thr.append(0.5)
            meth.append("default 0.5 (no validation data)")
            continue
        t, m = choose_threshold(y[:, j], p[:, j])
        thr.append(t)
        meth.append(m.replace("the validation split", where))
    return thr, meth


def json_clean(obj: Any) -> Any:
    """JSON-safe copy (NaN -> None, numpy scalars -> float)."""
    return json.loads(json.dumps(obj, default=float).replace("NaN", "null"))
