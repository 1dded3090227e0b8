"""Losses of docs/METHOD.md: segmentation cross-entropy (1)/(3) and the self-attention loss (8)/(9) with its variants."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sam import _no_autocast

__all__ = [
    "SelfAttentionDistance",
    "SelfAttentionTarget",
    "logit_norm",
    "segmentation_loss",
    "self_attention_loss",
]

SelfAttentionTarget = Literal["residual", "attended"]
SelfAttentionDistance = Literal["l2", "kl", "cosine"]


def _check_logits(logits: Tensor, name: str = "logits") -> None:
    if logits.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, h, w); got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {logits.dtype}")


def logit_norm(logits: Tensor) -> Tensor:
    """The mean L2 norm of a pixel's logit row, ``mean_i |P_i|`` over the ``B * h * w`` pixels (no gradient).

    The scale of the logits: it grows a few times while a network becomes confident and by orders of magnitude when
    a loss drives the logits away (docs/METHOD.md, "Stability of the residual form (8)"). Logged as
    ``train/logit_norm``.

    Args:
        logits: ``(B, C, h, w)`` logits.

    Returns:
        A float32 scalar tensor on the logits' device.
    """
    _check_logits(logits)
    with torch.no_grad():
        return logits.detach().float().norm(dim=1).mean()


def segmentation_loss(
    logits: Tensor, labels: Tensor, ignore_index: int = 255, align_corners: bool = True
) -> Tensor:
    """Pixel-wise cross-entropy of ``softmax(up(P))`` against labels, docs/METHOD.md (1) and (3).

    The logits are upsampled bilinearly to the label size when the sizes differ. The mean runs over the labelled
    (not ``ignore_index``) pixels of the whole batch; a batch with no labelled pixel gives 0 (still attached to the
    graph, with zero gradient) instead of PyTorch's NaN. Label values outside ``[0, C)`` other than ``ignore_index``
    are not checked here (that would force a device sync every step); ``F.cross_entropy`` rejects them.

    Args:
        logits: ``(B, C, h, w)`` pre-upsample logits.
        labels: ``(B, H, W)`` integer class indices, ``ignore_index`` for unlabelled pixels.
        ignore_index: Label value that contributes nothing.
        align_corners: Passed to the bilinear upsampling (DeepLab UDA code uses ``True``).

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: If ``logits`` is not ``(B, C, h, w)`` floating point, ``labels`` is not a ``(B, H, W)`` integer
            tensor, or the batch sizes differ.
    """
    _check_logits(logits)
    if labels.dim() != 3:
        raise ValueError(f"labels must have shape (B, H, W); got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of class indices; got dtype {labels.dtype}")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"logits and labels must have the same batch size; got logits {tuple(logits.shape)} and labels "
            f"{tuple(labels.shape)}"
        )
    labels = labels.long()
    with _no_autocast(logits.device):
        logits = logits.float()
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(
                logits, size=labels.shape[-2:], mode="bilinear", align_corners=align_corners
            )
        summed = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
        num_labelled = (labels != ignore_index).sum()
        return summed / num_labelled.clamp_min(1)


def self_attention_loss(
    logits: Tensor,
    sam: nn.Module,
    target: SelfAttentionTarget = "residual",
    distance: SelfAttentionDistance = "l2",
) -> Tensor:
    """Self-attention loss of docs/METHOD.md (8)/(9): pull ``P`` towards what a frozen SAM makes of it.

    The target is ``sg(P + SAM(P))`` for ``"residual"`` (8) or ``sg(SAM(P))`` for ``"attended"`` (9), computed under
    ``torch.no_grad()`` from a detached ``P``: the gradient reaches the network only through the first argument
    ``P`` and ``sam`` receives none (its train/eval mode is left as the caller set it). Distances (Tab. A.5):

    - ``"l2"``: mean squared error over all elements of ``P`` (docs/METHOD.md's ``||.||^2``).
    - ``"kl"``: ``KL(softmax(target_i) || softmax(P_i))`` over classes for each pixel row ``i``, mean over the
      ``B * h * w`` pixels.
    - ``"cosine"``: ``1 - cos(P_i, target_i)`` per pixel row, mean over pixels (the paper's negative cosine
      similarity shifted by 1, so 0 is a perfect match; the gradient is the same).

    Computed in float32. The feature-layer variant is the same call with the classifier's input features ``F`` and a
    SAM built with ``num_classes = F.shape[1]``.

    Args:
        logits: ``P``, ``(B, C, h, w)`` pre-upsample logits (or features).
        sam: A module mapping ``(B, C, h, w)`` to ``(B, C, h, w)``, normally a trained, frozen ``SelfAttentionModule``.
        target: ``"residual"`` (8) or ``"attended"`` (9).
        distance: ``"l2"``, ``"kl"`` or ``"cosine"``.

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: On ``logits`` that are not ``(B, C, h, w)`` floating point, a channel count different from
            ``sam.num_classes``, an unknown ``target``/``distance``, or a SAM output of another shape.
    """
    _check_logits(logits)
    if target not in get_args(SelfAttentionTarget):
        raise ValueError(f"target must be one of {list(get_args(SelfAttentionTarget))}; got {target!r}")
    if distance not in get_args(SelfAttentionDistance):
        raise ValueError(f"distance must be one of {list(get_args(SelfAttentionDistance))}; got {distance!r}")
    expected = getattr(sam, "num_classes", None)
    if expected is not None and logits.shape[1] != expected:
        raise ValueError(
            f"logits have {logits.shape[1]} channels but sam expects num_classes={expected} "
            f"(logits shape {tuple(logits.shape)})"
        )
    with torch.no_grad():
        detached = logits.detach()
        attended = sam(detached)
        if attended.shape != logits.shape:
            raise ValueError(
                f"sam must return the shape of its input {tuple(logits.shape)}; got {tuple(attended.shape)}"
            )
        goal = (detached.float() + attended.float()) if target == "residual" else attended.float()
    with _no_autocast(logits.device):
        pred = logits.float()
        if distance == "l2":
            return F.mse_loss(pred, goal)
        if distance == "kl":
            log_p = F.log_softmax(pred, dim=1)
            log_q = F.log_softmax(goal, dim=1)
            # kl_div(input=log p, target=log q) = sum_c q_c (log q_c - log p_c) = KL(q || p) per element.
            return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(dim=1).mean()
        return (1.0 - F.cosine_similarity(pred, goal, dim=1, eps=1e-8)).mean()
