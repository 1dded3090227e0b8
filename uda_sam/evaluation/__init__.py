"""Scores and analyses, plain torch/numpy (no Lightning).

- :mod:`uda_sam.evaluation.metrics`: the confusion matrix, IoU and mIoU over 19/16/13 classes (torchmetrics).
- :mod:`uda_sam.evaluation.scoring`: a folder of prediction PNGs scored as the official Cityscapes script does.
- :mod:`uda_sam.evaluation.analysis`: the paper's analyses (entropy by correctness, attention and similarity maps,
  the SAM's attention quality) and the helpers that draw them.
"""

from __future__ import annotations

from uda_sam.evaluation.metrics import (
    SegmentationMetrics,
    confusion_from_labels,
    format_iou_table,
    iou_from_confusion,
    mean_iou,
)
from uda_sam.evaluation.scoring import EvaluationError, evaluate_folder

__all__ = [
    "EvaluationError",
    "SegmentationMetrics",
    "confusion_from_labels",
    "evaluate_folder",
    "format_iou_table",
    "iou_from_confusion",
    "mean_iou",
]
