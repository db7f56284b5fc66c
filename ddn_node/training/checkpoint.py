"""Training checkpoints without pickle.

``torch.save`` pickles, and ``torch.load`` of a pickle from an untrusted run directory can
execute code; checkpoints here are a safetensors file (model weights, Adam moments, RNG
states) plus a JSON sidecar (epoch, history, optimiser hyper-parameters), so resuming reads
only tensors and JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs."""

    epoch: int = 0  # epochs completed
    best_epoch: int = 0
    best_score: float = float("-inf")
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    run_key: str = ""  # identifies the data + config; a resume with other data is refused
    finished: bool = False  # stopped early (patience exhausted)


def _fsync_replace(tmp: Path, final: Path) -> None:
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(final)


def save_checkpoint(
    directory: Path,
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator | None,
    state: TrainState,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()
    }
    groups: list[dict[str, Any]] = []
    if optimizer is not None:
        sd = optimizer.state_dict()
        for idx, st in sd["state"].items():
            for k, v in st.items():
                t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
                tensors[f"optim.{idx}.{k}"] = t.detach().cpu().contiguous()
        groups = [dict(g.items()) for g in sd["param_groups"]]
    tensors["rng.torch"] = torch.get_rng_state()
    if generator is not None:
        tensors["rng.generator"] = generator.get_state()
    tmp = directory / f"{name}.safetensors.part"
    save_file(tensors, str(tmp), metadata={"epoch": str(state.epoch)})
    _fsync_replace(tmp, directory / f"{name}.safetensors")
    meta = {"state": state.__dict__, "param_groups": groups}
    tmpj = directory / f"{name}.json.part"
    tmpj.write_text(json.dumps(meta, indent=1, default=float))
    _fsync_replace(tmpj, directory / f"{name}.json")


def load_checkpoint(
    directory: Path,
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator | None,
) -> TrainState:
    meta = json.loads((directory / f"{name}.json").read_text())
    tensors = load_file(str(directory / f"{name}.safetensors"))
    state = TrainState(**meta["state"])
    model.load_state_dict(
        {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    )
    if optimizer is not None and meta["param_groups"]:
        per: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                per.setdefault(int(idx), {})[key] = v
        optimizer.load_state_dict({"state": per, "param_groups": meta["param_groups"]})
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if generator is not None and "rng.generator" in tensors:
        generator.set_state(tensors["rng.generator"])
    return state


def save_weights(path: Path, model: nn.Module) -> None:
    tmp = path.with_name(path.name + ".part")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    _fsync_replace(tmp, path)


def load_weights(path: Path, model: nn.Module) -> None:
    model.load_state_dict(load_file(str(path)))
