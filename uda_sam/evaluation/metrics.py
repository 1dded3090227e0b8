"""Semantic-segmentation scores over the 19 Cityscapes trainIds: per-class IoU and mIoU (19/16/13 classes).

Everything is computed from one confusion matrix over the 19 trainIds (rows: ground truth, columns:
prediction). The 16- and 13-class means used for SYNTHIA -> Cityscapes average the IoUs of their classes
taken from that same 19-class matrix (the BDL convention), so a pixel of a SYNTHIA-absent class (terrain,
truck, train) predicted as, say, road still counts as a false positive of road. Codebases that remap to 16
compact indices and drop the other ground truth report a different number.

IoU follows the official Cityscapes script (``evalPixelLevelSemanticLabeling``): ``TP / (TP + FP + FN)``,
NaN when the denominator is zero, and means skip NaN. Ground-truth pixels labelled 255 never count; a
prediction outside ``0..C-1`` on a labelled pixel is a false negative of the ground-truth class and a false
positive of no class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from uda_sam.data.labels import CLASS_NAMES, CLASS_SUBSETS, IGNORE_INDEX, NUM_CLASSES

__all__ = [
    "SegmentationMetrics",
    "confusion_from_labels",
    "format_iou_table",
    "iou_from_confusion",
    "mean_iou",
    "pair_counts",
]


def _check_pair(preds: Tensor, target: Tensor) -> None:
    if preds.shape != target.shape:
        raise ValueError(
            f"preds and target must have the same shape, got {tuple(preds.shape)} and {tuple(target.shape)}"
        )
    if preds.is_floating_point() or target.is_floating_point():
        raise ValueError(
            "preds and target must be integer class maps (pass logits as (B, C, H, W) to SegmentationMetrics)"
        )


def _invalid_target_error(num_classes: int, ignore_index: int, detail: str) -> ValueError:
    return ValueError(
        f"target holds values outside 0..{num_classes - 1} and the ignore index {ignore_index}: {detail}"
    )


def _check_at_once(target: Tensor) -> bool:
    """Whether :meth:`SegmentationMetrics.update` checks the target itself: on the CPU reading the count costs no
    device synchronisation; elsewhere :meth:`SegmentationMetrics.compute` checks the summed count once."""
    return target.device.type == "cpu"


def _target_range(target: Tensor, ignore_index: int) -> str:
    labelled = target[target != ignore_index]
    return f"min {int(labelled.min())}, max {int(labelled.max())}"


def pair_counts(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """All the counts of one batch in one int64 ``(C * C + C + 2,)`` tensor, without a device synchronisation.

    Entries: the ``(C, C)`` confusion matrix (row-major, rows ground truth), then the ``C`` unmatched counts
    (labelled pixels predicted outside ``0..C-1``), then the unlabelled pixels, then the pixels whose ground truth
    is neither a class nor ``ignore_index``. Every pixel adds to one fixed-size bin (``scatter_add_``): no boolean
    indexing and no ``bincount``, whose output sizes need the data on the host.
    """
    target = target.reshape(-1).long()
    preds = preds.reshape(-1).to(target.device).long()
    pairs = num_classes * num_classes
    labelled = target != ignore_index
    known = labelled & (target >= 0) & (target < num_classes)
    predicted = (preds >= 0) & (preds < num_classes)
    index = torch.where(
        known,
        torch.where(predicted, target * num_classes + preds, pairs + target),
        torch.where(labelled, pairs + num_classes + 1, pairs + num_classes),
    )
    counts = torch.zeros(pairs + num_classes + 2, dtype=torch.long, device=target.device)
    return counts.scatter_add_(0, index, torch.ones_like(index))


def confusion_from_labels(
    preds: Tensor, target: Tensor, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Count (ground truth, prediction) pairs of one batch.

    Args:
        preds: Integer class predictions, any shape.
        target: Integer ground truth of the same shape; ``ignore_index`` marks unlabelled pixels. Every other
            value must lie in ``0..num_classes-1``.
        num_classes: Number of classes ``C``.
        ignore_index: Ground-truth value that is never scored.

    Returns:
        ``(confusion, unmatched)``: ``confusion`` is an int64 ``(C, C)`` matrix (rows ground truth, columns
        prediction) on the device of ``target``; ``unmatched`` is an int64 ``(C,)`` count, per ground-truth class,
        of labelled pixels whose prediction lies outside ``0..C-1`` (false negatives of no predicted class).

    Raises:
        ValueError: If the shapes differ, a tensor is not integer, or ``target`` holds a value that is neither a
            class nor ``ignore_index`` (this check reads one number from the device; :class:`SegmentationMetrics`
            makes it at :meth:`~SegmentationMetrics.compute` instead, for tensors on an accelerator).
    """
    _check_pair(preds, target)
    counts = pair_counts(preds, target, num_classes, ignore_index)
    pairs = num_classes * num_classes
    if int(counts[-1]):
        raise _invalid_target_error(num_classes, ignore_index, _target_range(target, ignore_index))
    return counts[:pairs].view(num_classes, num_classes), counts[pairs : pairs + num_classes]


def iou_from_confusion(confusion: Tensor, unmatched: Tensor | None = None) -> Tensor:
    """Per-class IoU ``TP / (TP + FP + FN)`` from a confusion matrix.

    Args:
        confusion: ``(C, C)`` counts, rows ground truth, columns prediction.
        unmatched: Optional ``(C,)`` counts of labelled pixels per ground-truth class whose prediction was no
            class at all; they add to that class's false negatives.

    Returns:
        float64 ``(C,)`` IoU in ``[0, 1]``, NaN for a class that is neither in the ground truth nor predicted.

    Raises:
        ValueError: If ``confusion`` is not square or ``unmatched`` has the wrong shape.
    """
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square (C, C) matrix, got shape {tuple(confusion.shape)}")
    confusion = confusion.to(torch.float64)
    tp = confusion.diagonal()
    fn = confusion.sum(dim=1) - tp
    fp = confusion.sum(dim=0) - tp
    if unmatched is not None:
        if unmatched.shape != tp.shape:
            raise ValueError(f"unmatched must have shape {tuple(tp.shape)}, got {tuple(unmatched.shape)}")
        fn = fn + unmatched.to(device=confusion.device, dtype=torch.float64)
    denominator = tp + fp + fn
    # 0/0 -> NaN marks "undefined", which the means below skip, as the official script does.
    return torch.where(denominator > 0, tp / denominator.clamp_min(1), torch.full_like(tp, math.nan))


def mean_iou(iou: Tensor, classes: Sequence[int] | None = None) -> Tensor:
    """NaN-skipping mean of ``iou`` over ``classes`` (all classes when ``None``); NaN when all are NaN."""
    values = (
        iou if classes is None else iou[torch.as_tensor(list(classes), dtype=torch.long, device=iou.device)]
    )
    defined = ~torch.isnan(values)
    if not bool(defined.any()):
        return torch.tensor(math.nan, dtype=iou.dtype, device=iou.device)
    return values[defined].mean()


class SegmentationMetrics(Metric):
    """Per-class IoU and mIoU over class subsets, accumulated in a confusion matrix that DDP sums across ranks.

    The 16- and 13-class means are computed from the 19-class confusion matrix (BDL convention; see the module
    docstring). Pixels whose prediction is outside ``0..C-1`` are false negatives of their ground-truth class,
    as in the official Cityscapes script.

    Args:
        num_classes: Number of classes ``C``.
        ignore_index: Ground-truth value that is never scored.
        class_subsets: Mapping from a subset name to its class indices; ``compute`` reports ``mIoU_<name>`` for each.
            Defaults to ``{"19", "16", "13"}`` from :mod:`uda_sam.data.labels` when ``num_classes`` is 19, else to
            one subset with every class, named ``str(num_classes)``.
        **kwargs: Passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).

    Example:
        >>> metric = SegmentationMetrics()
        >>> metric.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long))
        >>> float(metric.compute()["mIoU_19"])
        1.0
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confusion: Tensor
    unmatched: Tensor
    invalid: Tensor

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        ignore_index: int = IGNORE_INDEX,
        class_subsets: Mapping[str, Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if class_subsets is None:
            class_subsets = (
                CLASS_SUBSETS if num_classes == NUM_CLASSES else {str(num_classes): range(num_classes)}
            )
        for name, classes in class_subsets.items():
            if not classes or any(not 0 <= int(c) < num_classes for c in classes):
                raise ValueError(
                    f"class_subsets[{name!r}] must be a non-empty list of classes in 0..{num_classes - 1}"
                )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_subsets = {str(name): [int(c) for c in classes] for name, classes in class_subsets.items()}
        self.add_state(
            "confusion", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )
        self.add_state("unmatched", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        # Ground-truth pixels that are neither a class nor ignore_index: compute() refuses to score them.
        self.add_state("invalid", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch.

        Args:
            preds: ``(B, H, W)`` integer class predictions, or ``(B, C, H, W)`` float scores (logits or
                probabilities), reduced with ``argmax`` over ``C``.
            target: ``(B, H, W)`` integer ground truth (trainIds, ``ignore_index`` unlabelled).

        Raises:
            ValueError: On mismatched shapes, a wrong class axis, or ground-truth values outside the classes.
        """
        if preds.is_floating_point():
            if preds.ndim != 4 or preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"float preds must be scores of shape (B, {self.num_classes}, H, W), got {tuple(preds.shape)}"
                )
            preds = preds.argmax(dim=1)
        if target.ndim != 3:
            raise ValueError(f"target must have shape (B, H, W), got {tuple(target.shape)}")
        _check_pair(preds, target)
        counts = pair_counts(preds, target, self.num_classes, self.ignore_index)
        if _check_at_once(target) and int(counts[-1]):
            raise _invalid_target_error(
                self.num_classes, self.ignore_index, _target_range(target, self.ignore_index)
            )
        counts = counts.to(self.confusion.device)
        pairs, classes = self.num_classes * self.num_classes, self.num_classes
        self.confusion += counts[:pairs].view(classes, classes)
        self.unmatched += counts[pairs : pairs + classes]
        self.invalid += counts[-1]

    def compute(self) -> dict[str, Tensor]:
        """Scores of everything added since the last reset.

        Returns:
            ``{"iou": (C,) float32 IoU (NaN where undefined), "mIoU_<subset>": scalar float32 for each subset,
            "confusion": (C, C) int64}``.

        Raises:
            ValueError: When a target added on an accelerator held values that are neither a class nor
                ``ignore_index`` (targets on the CPU are refused by :meth:`update` already).
        """
        if int(self.invalid):
            raise _invalid_target_error(
                self.num_classes, self.ignore_index, f"{int(self.invalid)} such pixels were added"
            )
        iou = iou_from_confusion(self.confusion, self.unmatched)
        result: dict[str, Tensor] = {"iou": iou.float()}
        for name, classes in self.class_subsets.items():
            result[f"mIoU_{name}"] = mean_iou(iou, classes).float()
        result["confusion"] = self.confusion.clone()
        return result


def format_iou_table(
    iou: Tensor | Sequence[float] | Mapping[str, float],
    subset: str | Sequence[int] = "19",
    digits: int = 1,
    class_names: Sequence[str] = CLASS_NAMES,
) -> str:
    """Markdown table of per-class IoU in percent, in the papers' column order (trainId order), then the mIoU.

    Args:
        iou: Per-class IoU in ``[0, 1]`` for all classes, in trainId order (tensor or sequence), or a mapping from
            class name to IoU (as returned by :func:`uda_sam.evaluation.scoring.evaluate_folder`).
        subset: A key of ``CLASS_SUBSETS`` (``"19"``, ``"16"``, ``"13"``) or an explicit list of class indices.
            Only those columns are shown, and the mIoU is their NaN-skipping mean.
        digits: Decimal places of the percentages.
        class_names: Names of all classes, in index order.

    Returns:
        A two-row Markdown table; undefined (NaN) entries are shown as ``n/a``.

    Raises:
        ValueError: On an unknown subset name or a length that does not match ``class_names``.
    """
    if isinstance(iou, Mapping):
        missing = [name for name in class_names if name not in iou]
        if missing:
            raise ValueError(f"iou mapping lacks the classes {missing}")
        values = torch.tensor([float(iou[name]) for name in class_names], dtype=torch.float64)
    else:
        values = torch.as_tensor(iou, dtype=torch.float64).detach().cpu().reshape(-1)
    if values.numel() != len(class_names):
        raise ValueError(f"iou must hold {len(class_names)} values (one per class), got {values.numel()}")
    if isinstance(subset, str):
        if subset not in CLASS_SUBSETS:
            raise ValueError(
                f"subset must be one of {sorted(CLASS_SUBSETS)} or a list of class indices, got {subset!r}"
            )
        classes = list(CLASS_SUBSETS[subset])
    else:
        classes = [int(c) for c in subset]

    def cell(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{100.0 * value:.{digits}f}"

    header = [class_names[c] for c in classes] + [f"mIoU ({len(classes)})"]
    row = [cell(float(values[c])) for c in classes] + [cell(float(mean_iou(values, classes)))]
    return "\n".join(
        [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---:" for _ in header) + "|",
            "| " + " | ".join(row) + " |",
        ]
    )
