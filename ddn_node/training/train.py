"""Training: the paper's recipe, patient-disjoint splits, k-fold CV, checkpoints and resume.

Recipe (DESIGN.md "Model"): Adam, lr 1e-4, binary cross-entropy with class weighting
for the rare labels (``pos_weight = min(N_neg / N_pos, cap)``, the weighting of
``torch.nn.BCEWithLogitsLoss``), augmentation (rotation, flip, contrast). With pretrained
weights (``--init-weights``) the backbone is frozen for ``freeze_epochs`` (attention and
heads warm up on fixed features), then the deeper stages are fine-tuned while the stem and
``layer1`` stay frozen (generic edge/texture filters transfer best; Yosinski et al.,
"How transferable are features in deep neural networks?", NeurIPS 2014). From random
initialisation freezing would freeze random filters, so every stage trains.

Model selection uses the validation split only (early stopping on its macro AUC, and the
per-label thresholds); the test split is never read here, only recorded, so that
``ddn-node evaluate`` can measure the model on patients it has never seen.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
import torch
from torch import nn
from tqdm import tqdm

from ddn_node.model.artifact import (
    HeadInfo,
    Manifest,
    WeightsModel,
    architecture_of,
    save_artifact,
    software_version,
)
from ddn_node.model.codes import CODES_SOURCE
from ddn_node.model.ddn import DDN, DDNConfig, HeadConfig
from ddn_node.model.preprocess import PreprocessSpec, normalise
from ddn_node.training.augment import AugmentSpec, augment
from ddn_node.training.checkpoint import (
    TrainState,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)
from ddn_node.training.data import (
    ImageCache,
    LabelTable,
    data_fingerprint,
    load_images,
    read_label_csv,
)
from ddn_node.training.heads import add_head
from ddn_node.training.manifest_parts import (
    abnormality_def,
    choose_thresholds,
    command_line,
    json_clean,
    label_specs,
)
from ddn_node.training.metrics import BootstrapSpec, auc, classification_report
from ddn_node.training.splits import (
    Split,
    kfold_groups,
    read_split_csv,
    split_from_assignment,
    train_val_test_split,
    write_split_csv,
)

log = structlog.get_logger()


class TrainingError(RuntimeError):
    """Training cannot proceed as asked (bad options, resume mismatch...)."""


@dataclass
class TrainConfig:
    images: Path
    labels: Path
    out: Path
    init_weights: str | None = None  # path to a torchvision ResNet state dict, or "imagenet"
    folds: int = 1
    resume: bool = False
    device: str = "cpu"
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-4
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    patience: int = 5
    backbone: Literal["resnet50", "resnet18", "tiny"] = "resnet50"
    image_size: int = 224
    head: str = "cxr"
    freeze_epochs: int = 1
    frozen_stages: tuple[str, ...] = ("stem", "layer1")
    pos_weight_cap: float = 10.0
    dropout: float = 0.5
    attention_stages: tuple[str, ...] = ("layer4",)
    checkpoints: Path | None = None
    threads: int = 0
    add_head_to: Path | None = None
    label_columns: tuple[str, ...] = ()
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    progress: bool = True
    channels_last: bool = True
    command: str = ""
    name: str | None = None
    # The artifact's version; by default the date and its name (or, for --add-head-to,
    # the base artifact's). A candidate to run beside the live model needs its own.
    version: str | None = None

    def checkpoint_dir(self) -> Path:
        return self.checkpoints or Path("runs") / self.out.name


@dataclass
class FitResult:
    model: DDN
    best_epoch: int
    history: list[dict[str, Any]]
    val_probs: np.ndarray | None
    seconds: float


# --- batches ---------------------------------------------------------------------------


def _batch(cache: ImageCache, idx: Sequence[int], spec: PreprocessSpec) -> torch.Tensor:
    return cache.squares[list(idx)].float().div_(255.0).unsqueeze(1)


@torch.inference_mode()
def predict_probabilities(
    model: DDN,
    cache: ImageCache,
    idx: Sequence[int],
    head: str,
    spec: PreprocessSpec,
    device: str,
    batch_size: int = 32,
) -> np.ndarray:
    model.eval()
    out = []
    for s in range(0, len(idx), batch_size):
        x = normalise(_batch(cache, idx[s : s + batch_size], spec), spec).to(device)
        out.append(model.probabilities(model(x, heads=[head]))[head].float().cpu())
    n_labels = len(model.config.head(head).labels)
    return torch.cat(out).numpy() if out else np.zeros((0, n_labels), dtype=np.float32)


def macro_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    vals = [a for j in range(y.shape[1]) if (a := auc(y[:, j], p[:, j])) is not None]
    return float(np.mean(vals)) if vals else None


# --- losses ----------------------------------------------------------------------------


def make_loss(targets: np.ndarray, activation: str, cap: float) -> tuple[nn.Module, list[float]]:
    """Weighted BCE (sigmoid heads) or class-balanced cross-entropy (softmax heads)."""
    pos = targets.sum(0)
    neg = len(targets) - pos
    if activation == "softmax":
        w = (len(targets) / (len(pos) * np.maximum(pos, 1))).clip(max=cap)
        return nn.CrossEntropyLoss(weight=torch.tensor(w, dtype=torch.float32)), w.tolist()
    w = np.clip(neg / np.maximum(pos, 1), 1.0, cap)
    return nn.BCEWithLogitsLoss(pos_weight=torch.tensor(w, dtype=torch.float32)), w.tolist()


def _loss(crit: nn.Module, logits: torch.Tensor, y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "softmax":
        return crit(logits, y.argmax(1))
    return crit(logits, y)


# --- freezing --------------------------------------------------------------------------


def _set_trainable(model: DDN, epoch: int, cfg: TrainConfig, pretrained: bool) -> str:
    for p in model.parameters():
        p.requires_grad_(True)
    if not pretrained:
        return "all stages (random init)"
    if epoch < cfg.freeze_epochs:
        for p in model.backbone_parameters(["stem", "layer1", "layer2", "layer3", "layer4"]):
            p.requires_grad_(False)
        return "attention + heads (backbone frozen)"
    for p in model.backbone_parameters(cfg.frozen_stages):
        p.requires_grad_(False)
    return f"all but {','.join(cfg.frozen_stages)}"


def _freeze_bn_stats(model: DDN) -> None:
    # BatchNorm running statistics of frozen stages must not drift either.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def load_init_weights(model: DDN, source: str) -> str:
    """Load a torchvision ResNet state dict into the trunk, without unpickling arbitrary objects."""
    if source == "imagenet":
        import torchvision

        weights = {
            "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
            "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
        }.get(model.config.backbone)
        if weights is None:
            raise TrainingError(f"no ImageNet weights for backbone {model.config.backbone}")
        state = weights.get_state_dict(progress=True)  # torchvision loads with weights_only=True
        desc = f"torchvision {weights}"
    else:
        path = Path(source)
        if not path.is_file():
            raise TrainingError(f"--init-weights: {path} not found")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # weights_only=True: PyTorch's restricted unpickler, tensors and containers only.
            state = torch.load(path, map_location="cpu", weights_only=True)
            if (
                isinstance(state, dict)
                and "state_dict" in state
                and isinstance(state["state_dict"], dict)
            ):
                state = state["state_dict"]
        if not isinstance(state, dict):
            raise TrainingError(f"--init-weights: {path} does not hold a state dict")
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        desc = f"{path.name} (sha256 {sha})"
    try:
        missing = model.load_backbone_state(state)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    if missing:
        raise TrainingError(
            f"--init-weights lacks {len(missing)} trunk tensors, e.g. {missing[:3]}"
        )
    return desc


# --- one fit ---------------------------------------------------------------------------


def fit(  # noqa: C901, PLR0915 - the training loop (stages, epochs, early stopping, checkpoints) read in one place
    cfg: TrainConfig,
    model_config: DDNConfig,
    cache: ImageCache,
    table: LabelTable,
    train_idx: Sequence[int],
    val_idx: Sequence[int],
    epochs: int,
    ckpt_dir: Path,
    run_key: str,
    spec: PreprocessSpec,
    label: str = "",
) -> FitResult:
    """Train one model; early stopping on validation macro AUC when ``val_idx`` is given."""
    torch.manual_seed(cfg.seed)
    model = DDN(model_config)
    pretrained = False
    if cfg.init_weights:
        load_init_weights(model, cfg.init_weights)
        pretrained = True
    device = cfg.device
    # channels_last: ~25% faster convolutions on this CPU (oneDNN) and on tensor-core GPUs.
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt)  # type: ignore[call-overload]  # stub lacks this pair
    head = cfg.head
    activation = model_config.head(head).activation
    y_all = table.targets
    crit, _ = make_loss(y_all[list(train_idx)], activation, cfg.pos_weight_cap)
    crit.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    state = TrainState(run_key=run_key)
    if cfg.resume and (ckpt_dir / "last.json").is_file():
        state = load_checkpoint(ckpt_dir, "last", model, opt, gen)
        if state.run_key != run_key:
            raise TrainingError(
                f"--resume: the checkpoint in {ckpt_dir} was made with other data or settings; "
                "use another --checkpoints directory or drop --resume"
            )
        log.info("train.resumed", fold=label, epoch=state.epoch, best_epoch=state.best_epoch)
    elif (ckpt_dir / "last.json").is_file() and not cfg.resume:
        # Starting over must not silently mix with an old run's best.safetensors.
        for f in ckpt_dir.glob("*.safetensors"):
            f.unlink()
    t0 = time.monotonic()
    bs = cfg.batch_size
    n_train = len(train_idx)
    steps = max(1, n_train // bs) if n_train >= bs else 1
    has_val = len(val_idx) > 0
    for epoch in range(state.epoch, epochs):
        if state.finished:
            break
        te = time.monotonic()
        trainable = _set_trainable(model, epoch, cfg, pretrained)
        model.train()
        _freeze_bn_stats(model)
        perm = torch.randperm(n_train, generator=gen).tolist()
        order = [train_idx[i] for i in perm]
        total, seen = 0.0, 0
        bar = tqdm(
            range(steps),
            desc=f"{label}epoch {epoch + 1}/{epochs}",
            unit="batch",
            disable=not cfg.progress,
            leave=False,
        )
        for s in bar:
            idx = order[s * bs : (s + 1) * bs] if n_train >= bs else order
            x = augment(_batch(cache, idx, spec), gen, cfg.augment)
            x = normalise(x, spec).to(device).contiguous(memory_format=fmt)
            y = torch.from_numpy(y_all[idx]).to(device)
            logits = model(x, heads=[head])[head]
            loss = _loss(crit, logits, y, activation)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        bar.close()
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": total / max(seen, 1),
            "trainable": trainable,
        }
        if has_val:
            pv = predict_probabilities(model, cache, val_idx, head, spec, device)
            yv = y_all[list(val_idx)]
            with torch.no_grad():
                eps = 1e-6
                pt = torch.from_numpy(pv).clamp(eps, 1 - eps)
                logit = torch.log(pt) if activation == "softmax" else torch.logit(pt)
                rec["val_loss"] = float(_loss(crit.cpu(), logit, torch.from_numpy(yv), activation))
                crit.to(device)
            rec["val_macro_auc"] = macro_auc(yv, pv)
            score = rec["val_macro_auc"] if rec["val_macro_auc"] is not None else -rec["val_loss"]
        else:
            score = float(epoch)  # no validation: the last epoch is the model
        rec["seconds"] = round(time.monotonic() - te, 1)
        state.history.append(rec)
        state.epoch = epoch + 1
        if score > state.best_score:
            state.best_score, state.best_epoch, state.epochs_without_improvement = (
                float(score),
                epoch + 1,
                0,
            )
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_weights(ckpt_dir / "best.safetensors", model)
        else:
            state.epochs_without_improvement += 1
        if has_val and state.epochs_without_improvement >= cfg.patience:
            state.finished = True  # early stop; a resume with more epochs does not restart it
        save_checkpoint(ckpt_dir, "last", model, opt, gen, state)
        log.info(
            "train.epoch_done",
            fold=label or None,
            **{k: v for k, v in rec.items() if k != "trainable"},
            best_epoch=state.best_epoch,
        )
        if state.finished:
            break
    if (ckpt_dir / "best.safetensors").is_file():
        load_weights(ckpt_dir / "best.safetensors", model)
    model.eval()
    val_probs = (
        predict_probabilities(model, cache, val_idx, head, spec, device) if has_val else None
    )
    return FitResult(model.cpu(), state.best_epoch, state.history, val_probs, time.monotonic() - t0)


# --- the command -----------------------------------------------------------------------


def _run_key(cfg: TrainConfig, fingerprint: str, split_files: Sequence[str], part: str) -> str:
    keep = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in asdict(cfg).items()
        if k
        in (
            "backbone",
            "image_size",
            "lr",
            "batch_size",
            "seed",
            "pos_weight_cap",
            "dropout",
            "attention_stages",
            "head",
            "init_weights",
            "freeze_epochs",
            "frozen_stages",
            "augment",
        )
    }
    h = hashlib.sha256(
        json.dumps(
            [keep, fingerprint, sorted(split_files), part], sort_keys=True, default=str
        ).encode()
    )
    return h.hexdigest()


def run_training(cfg: TrainConfig) -> Manifest:  # noqa: PLR0915 - the command's steps in order: data, split, fit, thresholds, artifact
    """``ddn-node train``: returns the manifest of the artifact written to ``cfg.out``."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("--device cuda asked for, but no CUDA device is available")
    if cfg.add_head_to is not None:
        return add_head(cfg)
    t_start = time.monotonic()
    spec = PreprocessSpec(size=cfg.image_size)
    table = read_label_csv(cfg.images, cfg.labels, cfg.label_columns or None)
    log.info(
        "train.data",
        layout=table.layout,
        n_images=len(table),
        n_patients=len(set(table.patients)),
        labels=len(table.labels),
    )
    cache = load_images(table, spec.size, progress=cfg.progress)
    fp = data_fingerprint(table, cache.file_sha256)
    ckpt = cfg.checkpoint_dir()
    ckpt.mkdir(parents=True, exist_ok=True)
    # The manifest names the command that trained the weights: on --resume that is the
    # first invocation; the resuming ones are listed beside it.
    cmd_path = ckpt / "command.json"
    this_cmd = cfg.command or command_line()
    commands: dict[str, Any] = (
        json.loads(cmd_path.read_text())
        if cfg.resume and cmd_path.is_file()
        else {"command": this_cmd, "resumed_with": []}
    )
    if cfg.resume and cmd_path.is_file():
        commands["resumed_with"].append(this_cmd)
    cmd_path.write_text(json.dumps(commands, indent=1))

    # The split is made once and recorded; a resumed run reuses the recorded one.
    split_path = ckpt / "split.csv"
    if cfg.resume and split_path.is_file():
        split = split_from_assignment(table.files, read_split_csv(split_path))
    else:
        split = train_val_test_split(
            table.patients, cfg.val_fraction, cfg.test_fraction, cfg.seed, table.targets
        )
        write_split_csv(split_path, table.files, split.assignment(len(table)))
    _check_disjoint(table, split)
    model_config = DDNConfig(
        backbone=cfg.backbone,
        heads=(HeadConfig(cfg.head, tuple(table.labels), table.activation),),  # type: ignore[arg-type]
        attention_stages=cfg.attention_stages,
        dropout=cfg.dropout,
    )
    y = table.targets
    metrics: dict[str, Any] = {}
    training: dict[str, Any] = {}
    groups = table.patients
    if cfg.folds >= 2:
        dev = split.train + split.val
        folds = kfold_groups([table.patients[i] for i in dev], cfg.folds, cfg.seed, y[dev])
        oof = np.zeros((len(table), len(table.labels)), dtype=np.float32)
        best_epochs, fold_aucs = [], []
        for k, fold in enumerate(folds):
            val_k = [dev[i] for i in fold]
            held = set(val_k)
            tr_k = [i for i in dev if i not in held]
            key = _run_key(cfg, fp["sha256"], [table.files[i] for i in tr_k], f"fold{k}")
            res = fit(
                cfg,
                model_config,
                cache,
                table,
                tr_k,
                val_k,
                cfg.epochs,
                ckpt / f"fold{k + 1}",
                key,
                spec,
                f"fold {k + 1}/{cfg.folds} ",
            )
            assert res.val_probs is not None
            oof[val_k] = res.val_probs
            best_epochs.append(res.best_epoch)
            fold_aucs.append(macro_auc(y[val_k], res.val_probs))
        cv_report = classification_report(
            y[dev],
            oof[dev],
            table.labels,
            [0.5] * len(table.labels),
            [groups[i] for i in dev],
            BootstrapSpec(500, cfg.seed),
        )
        thresholds, methods = choose_thresholds(
            y[dev], oof[dev], table.labels, "pooled out-of-fold predictions"
        )
        final_epochs = max(1, int(np.median(best_epochs)))
        key = _run_key(cfg, fp["sha256"], [table.files[i] for i in dev], f"final{final_epochs}")
        final = fit(
            cfg,
            model_config,
            cache,
            table,
            dev,
            [],
            final_epochs,
            ckpt / "final",
            key,
            spec,
            "final ",
        )
        model = final.model
        metrics["cross_validation"] = {
            "folds": cfg.folds,
            "unit": "patient-grouped folds of the development (train+val) split",
            "fold_macro_auc": fold_aucs,
            "fold_best_epoch": best_epochs,
            "out_of_fold": {"macro": cv_report["macro"], "per_label": cv_report["per_label"]},
        }
        training.update(
            final_model=f"refit on all development patients for {final_epochs} epochs (median best epoch of the folds)",
            history=final.history,
        )
    else:
        key = _run_key(cfg, fp["sha256"], [table.files[i] for i in split.train], "single")
        res = fit(
            cfg, model_config, cache, table, split.train, split.val, cfg.epochs, ckpt, key, spec
        )
        model = res.model
        yv = y[split.val]
        thresholds, methods = choose_thresholds(
            yv, res.val_probs, table.labels, "the validation split"
        )
        if res.val_probs is not None and len(split.val):
            rep = classification_report(
                yv,
                res.val_probs,
                table.labels,
                thresholds,
                [groups[i] for i in split.val],
                BootstrapSpec(500, cfg.seed),
            )
            metrics["validation"] = {
                "note": "validation split: used for early stopping and thresholds, so optimistic; see metrics.test for held-out patients",
                "macro": rep["macro"],
                "per_label": {
                    k: {kk: v[kk] for kk in ("auc", "auc_ci95", "average_precision", "n_positive")}
                    for k, v in rep["per_label"].items()
                },
            }
        training.update(
            best_epoch=res.best_epoch,
            history=res.history,
            training_seconds=round(sum(h["seconds"] for h in res.history), 1),
        )

    init_desc = (
        "random initialisation (no pretrained weights available)"
        if not cfg.init_weights
        else str(cfg.init_weights)
    )
    _, pos_w = make_loss(
        y[split.train + split.val] if cfg.folds >= 2 else y[split.train],
        table.activation,
        cfg.pos_weight_cap,
    )
    training.update(
        command=commands["command"],
        resumed_with=commands["resumed_with"],
        data={
            **fp,
            "images_dir": str(cfg.images),
            "labels_csv": str(cfg.labels),
            "layout": table.layout,
        },
        split={
            "method": "patient-disjoint (whole patients per part), greedy label-balanced groups, seed "
            + str(cfg.seed),
            "file": "split.csv",
            "n_images": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
            "n_patients": {
                n: len({table.patients[i] for i in getattr(split, n)})
                for n in ("train", "val", "test")
            },
        },
        init=init_desc,
        recipe={
            "optimizer": "Adam",
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "epochs_max": cfg.epochs,
            "early_stopping": f"best validation macro AUC, patience {cfg.patience}",
            "loss": "BCEWithLogits, pos_weight = min(N_neg/N_pos, cap)"
            if table.activation == "sigmoid"
            else "class-weighted cross-entropy",
            "pos_weight_cap": cfg.pos_weight_cap,
            "pos_weight": dict(zip(table.labels, [round(w, 3) for w in pos_w], strict=True)),
            "freezing": "none: random init, every stage trains"
            if not cfg.init_weights
            else f"backbone frozen {cfg.freeze_epochs} epoch(s), then {cfg.frozen_stages} frozen",
            "augmentation": asdict(cfg.augment),
            "dropout": cfg.dropout,
        },
        device=cfg.device,
        torch=torch.__version__,
        wall_seconds=round(time.monotonic() - t_start, 1),
    )
    head = HeadInfo(
        activation=table.activation,  # type: ignore[arg-type]
        labels=label_specs(table.labels, thresholds, methods),
        abnormality=abnormality_def(table),
        training={"data": training["data"], "split": training["split"]},
        metrics=json_clean(metrics),
    )
    name = cfg.name or cfg.out.name
    manifest = Manifest(
        name=name,
        version=cfg.version or f"{datetime.now(UTC):%Y.%m.%d}-{name}",
        algorithm_name="DDN chest X-ray" if cfg.head == "cxr" else f"DDN {cfg.head}",
        architecture=architecture_of(model_config),
        heads={cfg.head: head},
        preprocess=spec,
        weights=WeightsModel(sha256="", dtype="float16", n_parameters=0),
        codes_source=CODES_SOURCE,
        training=json_clean(training),
        metrics={},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        software_version=software_version(),
    )
    final_manifest = save_artifact(cfg.out, model, manifest)
    write_split_csv(cfg.out / "split.csv", table.files, split.assignment(len(table)))
    log.info(
        "train.done",
        out=str(cfg.out),
        wall_s=training["wall_seconds"],
        weights_sha256=final_manifest.weights.sha256[:16],
    )
    return final_manifest


def _check_disjoint(table: LabelTable, split: Split) -> None:
    parts = [{table.patients[i] for i in getattr(split, n)} for n in ("train", "val", "test")]
    if parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]:
        raise TrainingError("internal error: a patient is in two split parts")
