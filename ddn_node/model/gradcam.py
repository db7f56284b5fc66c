"""Grad-CAM on the last convolutional stage.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017, eq. 1-2: for class c with score y^c (the logit, before the
sigmoid/softmax) and feature maps A^k of the target layer,
``alpha_k = mean_ij dy^c/dA^k_ij`` and ``L^c = ReLU(sum_k alpha_k A^k)``.

The target layer is ``layer4``'s output (before the CBAM block), so the gradient flows
through only attention, pooling and one linear layer: the backbone features are computed
once, without autograd, and reused for every label and for the probabilities themselves.
That is what keeps Grad-CAM to a small fraction of a forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ddn_node.model.ddn import DDN


def logits_and_cams(
    model: DDN,
    features: torch.Tensor,
    head: str,
    wanted: Sequence[Sequence[int]],
) -> tuple[torch.Tensor, dict[tuple[int, int], torch.Tensor]]:
    """Logits of ``head`` and Grad-CAM maps for the requested (image, label) pairs.

    ``features``: (B, C, h, w) from ``model.features`` (no grad needed); ``wanted[b]``: label
    indices for image b. Returns the logits (B, L), detached, and ``{(b, label): (h, w) map}``
    with non-negative values (not yet normalised). Dropout must be off (``model.eval()``).
    """
    if len(wanted) != features.shape[0]:
        raise ValueError("one list of wanted labels per image")
    # A fresh leaf: features may come from inference_mode, which autograd cannot use.
    f = features.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model.forward_from_features(f, heads=[head])[head]
        labels = sorted({k for w in wanted for k in w})
        cams: dict[tuple[int, int], torch.Tensor] = {}
        for n, k in enumerate(labels):
            # Images are independent in eval mode (no batch statistics), so the gradient of
            # the summed logit gives every image's own dy_k/dA in one backward pass.
            (grad,) = torch.autograd.grad(logits[:, k].sum(), f, retain_graph=n < len(labels) - 1)
            weights = grad.mean(dim=(2, 3), keepdim=True)
            cam = torch.relu((weights * f.detach()).sum(dim=1))
            for b, w in enumerate(wanted):
                if k in w:
                    cams[(b, k)] = cam[b].detach()
    return logits.detach(), cams


def gradcam(
    model: DDN, x: torch.Tensor, head: str, labels: Mapping[int, Sequence[int]] | None = None
) -> dict[tuple[int, int], torch.Tensor]:
    """Convenience: Grad-CAM maps (h, w) for a normalised batch ``x``; all labels by default."""
    model.eval()
    with torch.inference_mode():
        feats = model.features(x)
    n_labels = len(model.config.head(head).labels)
    wanted = [
        list(labels.get(b, [])) if labels is not None else list(range(n_labels))
        for b in range(x.shape[0])
    ]
    _, cams = logits_and_cams(model, feats, head, wanted)
    return cams
