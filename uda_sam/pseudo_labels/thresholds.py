"""Class-wise confidence thresholds for pseudo labels, in memory independent of the number of images.

docs/METHOD.md, "Losses of plain self-training" and Appendix C: for every class ``c``, ``tau[c]`` is the median
confidence of all target pixels predicted as ``c`` (over the whole target set), capped at 0.9; a class that is
never predicted gets 0.9. A pixel keeps its predicted class when ``conf >= tau[class]`` and becomes 255 otherwise.

The reference script (BDL ``SSL.py``) keeps every confidence in memory (about 25 GB for Cityscapes).
:class:`ClasswiseThresholdEstimator` keeps a per-class histogram of confidences instead: a fixed
``(C, num_bins)`` int64 tensor, filled by one vectorised bincount (``scatter_add_``) per batch, exact to one
bin width, and summable across processes. Plain torch, usable without Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "ClasswiseThresholdEstimator",
    "PseudoLabelStatistics",
    "ReduceSum",
    "all_reduce_sum",
    "make_pseudo_labels",
    "save_label_png",
    "threshold_predictions",
]

IGNORE_INDEX = 255

#: Returns the element-wise sum of a tensor over all processes (every process calls it).
ReduceSum = Callable[[Tensor], Tensor]


def _sum_over_processes(
    tensor: Tensor, reduce_sum: ReduceSum | None, device: torch.device | str | None
) -> Tensor:
    """``tensor`` summed over the processes, on ``tensor``'s device (see :meth:`ClasswiseThresholdEstimator.sync`)."""
    if reduce_sum is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return tensor
        reduce_sum = all_reduce_sum
    home = tensor.device
    return reduce_sum(tensor.to(device if device is not None else home)).to(home)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """A copy of ``tensor`` summed over the processes of the default ``torch.distributed`` group."""
    tensor = tensor.clone()
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def _check_probs(probs: Tensor, num_classes: int, name: str = "probs") -> None:
    if not isinstance(probs, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(probs).__name__}")
    if probs.ndim != 4:
        raise ValueError(
            f"{name} must have shape (B, C, H, W) (softmax over C), got shape {tuple(probs.shape)}"
        )
    if probs.shape[1] != num_classes:
        raise ValueError(
            f"{name} has {probs.shape[1]} classes on axis 1, expected {num_classes} (shape (B, {num_classes}, H, W))"
        )
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be floating-point softmax probabilities, got dtype {probs.dtype}")


class ClasswiseThresholdEstimator:
    """Per-class median confidence of the predicted class, from a histogram, capped at ``cap``.

    Feed softmax probabilities batch by batch with :meth:`update` (each pixel adds its max probability to the
    histogram row of its argmax class), then read the thresholds with :meth:`compute`.

    Median convention: for the ``n`` confidences of a class sorted ascending, the median is the element at
    0-based index ``n // 2`` (``np.sort(x)[len(x) // 2]``; the upper median for even ``n``). BDL ``SSL.py``
    takes ``x[round(n * 0.5)]``, the same element for even ``n`` and at most one element higher for odd ``n``.
    :meth:`compute` returns the lower edge of the bin holding that element, so
    ``tau <= exact median < tau + 1 / num_bins``: every pixel at least as confident as the exact median keeps its
    label. Confidences are binned as ``floor(conf * num_bins)`` in float32; give float32 probabilities, since
    bfloat16 cannot resolve ``1e-3`` near 1.

    The histogram follows the device of the probabilities it is fed (no host transfer per batch on a GPU).
    Across processes, call :meth:`sync` (an all-reduce sum; with NCCL the histogram must be on the GPU) or add
    the ``histogram`` tensors yourself: the sum of histograms equals the histogram of the union of the inputs.

    Args:
        num_classes: Number of classes ``C``.
        num_bins: Number of equal-width confidence bins over ``[0, 1]``; at least 1000 (bin width <= 1e-3).
        cap: Upper bound of every threshold, and the threshold of a never-predicted class.

    Attributes:
        histogram: int64 ``(C, num_bins)`` counts; ``histogram[c, b]`` counts pixels predicted as ``c`` with
            confidence in ``[b / num_bins, (b + 1) / num_bins)`` (confidence 1.0 falls in the last bin).
    """

    def __init__(self, num_classes: int = 19, num_bins: int = 1000, cap: float = 0.9) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if num_bins < 1000:
            raise ValueError(f"num_bins must be >= 1000 (bin width <= 1e-3), got {num_bins}")
        if not 0.0 < cap <= 1.0:
            raise ValueError(f"cap must lie in (0, 1], got {cap}")
        self.num_classes = num_classes
        self.num_bins = num_bins
        self.cap = float(cap)
        self.histogram = torch.zeros(num_classes, num_bins, dtype=torch.long)

    @property
    def counts(self) -> Tensor:
        """int64 ``(C,)`` number of pixels predicted as each class so far."""
        return self.histogram.sum(dim=1)

    def to(self, device: torch.device | str) -> ClasswiseThresholdEstimator:
        """Move the histogram to ``device`` (e.g. the GPU before :meth:`sync` under NCCL); returns ``self``."""
        self.histogram = self.histogram.to(device)
        return self

    @torch.no_grad()
    def update(self, probs: Tensor) -> None:
        """Add a batch of softmax probabilities.

        Args:
            probs: ``(B, C, H, W)`` floating-point probabilities (softmax over ``C``).

        Raises:
            ValueError: If ``probs`` is not a 4-D float tensor with ``C`` classes on axis 1.
        """
        _check_probs(probs, self.num_classes)
        confidence, predicted = probs.max(dim=1)
        self._accumulate(confidence, predicted)  # argmax classes are in range: no check, no device sync

    @torch.no_grad()
    def update_from_predictions(self, confidence: Tensor, predicted: Tensor) -> None:
        """Add pixels given as their max probability and argmax class (when those were computed already).

        Args:
            confidence: Float tensor, any shape, values in ``[0, 1]``.
            predicted: Integer tensor of the same shape, values in ``0..C-1``.

        Raises:
            ValueError: On mismatched shapes or a class outside ``0..C-1``.
        """
        if confidence.shape != predicted.shape:
            raise ValueError(
                f"confidence and predicted must have the same shape, got {tuple(confidence.shape)} and {tuple(predicted.shape)}"
            )
        if predicted.is_floating_point():
            raise ValueError(f"predicted must hold integer classes, got dtype {predicted.dtype}")
        predicted = predicted.to(confidence.device)
        if predicted.numel() and (int(predicted.min()) < 0 or int(predicted.max()) >= self.num_classes):
            raise ValueError(f"predicted holds classes outside 0..{self.num_classes - 1}")
        self._accumulate(confidence, predicted)

    def bin_index(self, confidence: Tensor) -> Tensor:
        """The histogram bin of each confidence, ``floor(confidence * num_bins)`` (1.0 falls in the last bin)."""
        return (confidence.float() * self.num_bins).long().clamp_(0, self.num_bins - 1)

    @torch.no_grad()
    def update_from_bins(self, bins: Tensor, predicted: Tensor) -> None:
        """Add pixels given as their confidence bin (:meth:`bin_index`) and argmax class, unchecked.

        For callers that keep the bins themselves (the pseudo-label generation caches them); nothing is checked,
        so nothing waits for the device.
        """
        if self.histogram.device != bins.device:
            self.histogram = self.histogram.to(bins.device)
        # A bincount over class * num_bins + bin, written as scatter_add_: one vectorised pass on any device, and
        # unlike torch.bincount on CUDA (which reads the max index back to the host) no device synchronisation.
        index = predicted.reshape(-1).long() * self.num_bins + bins.reshape(-1)
        ones = torch.ones((), dtype=torch.long, device=index.device).expand(index.numel())
        self.histogram.view(-1).scatter_add_(0, index, ones)

    def _accumulate(self, confidence: Tensor, predicted: Tensor) -> None:
        self.update_from_bins(self.bin_index(confidence), predicted)

    def compute(self) -> Tensor:
        """Thresholds ``tau[c] = min(cap, median of class c)``, ``cap`` for classes never predicted.

        Returns:
            float32 ``(C,)`` tensor on the CPU.
        """
        histogram = self.histogram.cpu()
        counts = histogram.sum(dim=1)
        median_rank = counts // 2  # 0-based rank of np.sort(x)[len(x) // 2]
        cumulative = histogram.cumsum(dim=1)
        # The median lies in the first bin whose cumulative count exceeds its rank.
        median_bin = (cumulative <= median_rank[:, None]).sum(dim=1)
        thresholds = median_bin.to(torch.float64) / self.num_bins
        thresholds = torch.where(
            counts > 0, thresholds.clamp(max=self.cap), torch.full_like(thresholds, self.cap)
        )
        return thresholds.float()

    def reset(self) -> None:
        """Forget every update (keeps the histogram's device)."""
        self.histogram.zero_()

    def sync(self, reduce_sum: ReduceSum | None = None, device: torch.device | str | None = None) -> None:
        """Sum the histogram over all processes, in place.

        Every rank must call it (it is a collective). The histogram has the same fixed shape on every rank.

        Args:
            reduce_sum: Returns the element-wise sum of a tensor over the processes (e.g.
                :attr:`uda_sam.pseudo_labels.ProcessGroup.reduce_sum`, or Lightning's ``strategy.reduce``);
                default: ``torch.distributed.all_reduce`` when it is initialised, else nothing to do.
            device: Where the tensor must be for ``reduce_sum`` (the GPU under NCCL); the histogram keeps its own
                device.
        """
        self.histogram = _sum_over_processes(self.histogram, reduce_sum, device)

    def state_dict(self) -> dict[str, Any]:
        """Settings and a CPU copy of the histogram, for checkpoints."""
        return {
            "num_classes": self.num_classes,
            "num_bins": self.num_bins,
            "cap": self.cap,
            "histogram": self.histogram.detach().cpu().clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            ValueError: If a key is missing or the classes/bins/cap differ from this estimator's.
        """
        missing = {"num_classes", "num_bins", "cap", "histogram"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks the keys {sorted(missing)}")
        expected = (self.num_classes, self.num_bins, self.cap)
        got = (int(state_dict["num_classes"]), int(state_dict["num_bins"]), float(state_dict["cap"]))
        if got != expected:
            raise ValueError(
                f"state_dict has (num_classes, num_bins, cap) = {got}, this estimator has {expected}"
            )
        histogram = torch.as_tensor(state_dict["histogram"])
        if histogram.shape != (self.num_classes, self.num_bins):
            raise ValueError(
                f"state_dict histogram has shape {tuple(histogram.shape)}, expected {(self.num_classes, self.num_bins)}"
            )
        self.histogram = histogram.to(device=self.histogram.device, dtype=torch.long).clone()


def threshold_predictions(
    confidence: Tensor, predicted: Tensor, thresholds: Tensor | Sequence[float]
) -> Tensor:
    """Pseudo labels from max probabilities and argmax classes: the class, or 255 where ``conf < tau[class]``.

    Args:
        confidence: Float tensor, any shape.
        predicted: Integer classes of the same shape, values in ``0..len(thresholds)-1`` (at most 255 classes).
        thresholds: ``(C,)`` per-class thresholds.

    Returns:
        uint8 tensor of the same shape, on the device of ``confidence``.
    """
    if confidence.shape != predicted.shape:
        raise ValueError(
            f"confidence and predicted must have the same shape, got {tuple(confidence.shape)} and {tuple(predicted.shape)}"
        )
    thresholds = torch.as_tensor(thresholds, dtype=torch.float32, device=confidence.device).reshape(-1)
    if thresholds.numel() > IGNORE_INDEX:
        raise ValueError(
            f"at most {IGNORE_INDEX} classes fit a uint8 label map with 255 ignore, got {thresholds.numel()}"
        )
    predicted = predicted.to(confidence.device).long()
    labels = predicted.to(torch.uint8)
    labels[confidence.float() < thresholds[predicted]] = IGNORE_INDEX
    return labels


@torch.no_grad()
def make_pseudo_labels(probs: Tensor, thresholds: Tensor | Sequence[float]) -> Tensor:
    """Pseudo-label maps (trainIds) from softmax probabilities and class-wise thresholds (docs/METHOD.md eq. 2).

    Args:
        probs: ``(B, C, H, W)`` softmax probabilities.
        thresholds: ``(C,)`` thresholds, e.g. from :meth:`ClasswiseThresholdEstimator.compute`.

    Returns:
        uint8 ``(B, H, W)``: ``argmax`` class where its probability is ``>= tau[class]``, else 255; on the device
        of ``probs``.

    Raises:
        ValueError: If ``probs`` is not ``(B, C, H, W)`` with ``C == len(thresholds)``.
    """
    thresholds = torch.as_tensor(thresholds, dtype=torch.float32)
    if thresholds.ndim != 1:
        raise ValueError(f"thresholds must be a (C,) vector, got shape {tuple(thresholds.shape)}")
    _check_probs(probs, thresholds.numel())
    confidence, predicted = probs.max(dim=1)
    return threshold_predictions(confidence, predicted, thresholds)


def save_label_png(label: np.ndarray | Tensor, path: str | os.PathLike[str], compress_level: int = 1) -> Path:
    """Write a label map as a single-channel 8-bit PNG (mode ``L``), creating parent folders.

    Args:
        label: ``(H, W)`` array or tensor of values in ``0..255`` (uint8 preferred; other integer types are checked
            and converted).
        path: Destination file (should end in ``.png``).
        compress_level: zlib level 0..9. The default 1 encodes about 4x faster than PIL's default 6 for files
            about 15% larger, which matters when a generation writes thousands of maps. zlib releases the GIL,
            so a thread pool can write several maps at once.

    Returns:
        The path written.

    Raises:
        ValueError: If ``label`` is not 2-D integer data within ``0..255``.
    """
    if isinstance(label, Tensor):
        label = label.detach().cpu().numpy()
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be an (H, W) map, got shape {label.shape}")
    if label.dtype != np.uint8:
        if not np.issubdtype(label.dtype, np.integer):
            raise ValueError(
                f"label must hold integers (uint8 trainIds with 255 ignore), got dtype {label.dtype}"
            )
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"label values must lie in 0..255, got {label.min()}..{label.max()}")
        label = label.astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a uint8 (H, W) array becomes a mode "L" image
    Image.fromarray(np.ascontiguousarray(label)).save(path, compress_level=compress_level)
    return path


def _f64(tensor: Tensor) -> Tensor:
    return tensor.to(torch.float64)


class PseudoLabelStatistics:
    """Per-class statistics of one generation of pseudo labels, accumulated in fixed-size counters.

    For each class ``c``: the share of all pixels labelled ``c`` and, where ground truth is given and is not 255,
    the agreement (precision) ``#(pseudo == c and gt == c) / #(pseudo == c and gt != 255)``. A diagnostic only:
    training never reads the ground truth. Counters are int64 and sum across processes (:meth:`sync`).

    Args:
        num_classes: Number of classes ``C``.
        ignore_index: Value of unlabelled pixels, in pseudo labels and ground truth alike.
    """

    def __init__(self, num_classes: int = 19, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(4, num_classes, dtype=torch.long)  # labelled, evaluated, correct, gt_pixels
        self.total_pixels = torch.zeros((), dtype=torch.long)

    @torch.no_grad()
    def update(self, pseudo_labels: Tensor, gt: Tensor | None = None) -> None:
        """Add a batch of pseudo labels and, optionally, the matching ground truth.

        Args:
            pseudo_labels: Integer ``(B, H, W)`` (or any shape) label maps, ``ignore_index`` where unlabelled.
            gt: Ground truth of the same shape (trainIds, ``ignore_index`` unlabelled), or ``None``.

        Raises:
            ValueError: On mismatched shapes or labels outside ``0..C-1`` and ``ignore_index``.
        """
        if pseudo_labels.is_floating_point():
            raise ValueError(f"pseudo_labels must hold integer classes, got dtype {pseudo_labels.dtype}")
        device = pseudo_labels.device
        if self.counts.device != device:
            self.counts = self.counts.to(device)
            self.total_pixels = self.total_pixels.to(device)
        labels = pseudo_labels.reshape(-1).long()
        self.total_pixels += labels.numel()
        labelled = labels != self.ignore_index
        labels_l = labels[labelled]
        if labels_l.numel() and (int(labels_l.min()) < 0 or int(labels_l.max()) >= self.num_classes):
            raise ValueError(
                f"pseudo_labels hold values outside 0..{self.num_classes - 1} and {self.ignore_index}"
            )
        c = self.num_classes
        self.counts[0] += torch.bincount(labels_l, minlength=c)
        if gt is None:
            return
        if gt.shape != pseudo_labels.shape:
            raise ValueError(
                f"gt must have the shape of pseudo_labels {tuple(pseudo_labels.shape)}, got {tuple(gt.shape)}"
            )
        gt = gt.to(device).reshape(-1).long()
        gt_valid = gt != self.ignore_index
        gt_v = gt[gt_valid]
        if gt_v.numel() and (int(gt_v.min()) < 0 or int(gt_v.max()) >= c):
            raise ValueError(f"gt holds values outside 0..{c - 1} and {self.ignore_index}")
        self.counts[3] += torch.bincount(gt_v, minlength=c)
        both = labelled & gt_valid
        self.counts[1] += torch.bincount(labels[both], minlength=c)
        self.counts[2] += torch.bincount(labels[both & (labels == gt)], minlength=c)

    def compute(self) -> dict[str, Tensor]:
        """Statistics so far, on the CPU.

        Returns:
            ``{"share": (C,) float64 fraction of all pixels labelled c, "labelled_share": scalar fraction of all
            pixels with a label, "precision": (C,) float64 agreement with the ground truth (NaN without evaluated
            pixels), "recall": (C,) float64 fraction of GT pixels of class c that got pseudo label c (NaN without GT
            pixels of c), "labelled": (C,) int64, "evaluated": (C,) int64, "correct": (C,) int64,
            "gt_pixels": (C,) int64, "total_pixels": scalar int64}``.
        """
        labelled, evaluated, correct, gt_pixels = self.counts.cpu()
        total = int(self.total_pixels)
        nan = torch.full((self.num_classes,), float("nan"), dtype=torch.float64)
        return {
            "share": _f64(labelled) / total if total else nan.clone(),
            "labelled_share": torch.tensor(
                labelled.sum().item() / total if total else float("nan"), dtype=torch.float64
            ),
            "precision": torch.where(evaluated > 0, _f64(correct) / _f64(evaluated).clamp_min(1), nan),
            "recall": torch.where(gt_pixels > 0, _f64(correct) / _f64(gt_pixels).clamp_min(1), nan),
            "labelled": labelled.clone(),
            "evaluated": evaluated.clone(),
            "correct": correct.clone(),
            "gt_pixels": gt_pixels.clone(),
            "total_pixels": torch.tensor(total, dtype=torch.long),
        }

    def as_records(
        self, thresholds: Tensor | Sequence[float] | None = None, class_names: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """One JSON-ready dict per class: name, threshold (if given), share, precision, recall (``None`` for NaN)."""
        stats = self.compute()
        names = list(class_names) if class_names is not None else [str(c) for c in range(self.num_classes)]
        taus = (
            None
            if thresholds is None
            else torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1).tolist()
        )

        def clean(value: float) -> float | None:
            return None if value != value else float(value)

        records = []
        for c in range(self.num_classes):
            record: dict[str, Any] = {"class": names[c]}
            if taus is not None:
                record["threshold"] = float(taus[c])
            record.update(
                share=clean(float(stats["share"][c])),
                precision=clean(float(stats["precision"][c])),
                recall=clean(float(stats["recall"][c])),
                labelled_pixels=int(stats["labelled"][c]),
            )
            records.append(record)
        return records

    def reset(self) -> None:
        """Zero every counter."""
        self.counts.zero_()
        self.total_pixels.zero_()

    def sync(self, reduce_sum: ReduceSum | None = None, device: torch.device | str | None = None) -> None:
        """Sum the counters over all processes, in place (arguments as for
        :meth:`ClasswiseThresholdEstimator.sync`)."""
        self.counts = _sum_over_processes(self.counts, reduce_sum, device)
        self.total_pixels = _sum_over_processes(self.total_pixels, reduce_sum, device)
