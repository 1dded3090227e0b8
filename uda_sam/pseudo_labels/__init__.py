"""Pseudo labels, plain torch (no Lightning), usable offline.

- :mod:`uda_sam.pseudo_labels.thresholds`: the class-wise threshold rule (median confidence per predicted class,
  capped), its histogram estimator, the labelling itself and the per-class statistics of a label set.
- :mod:`uda_sam.pseudo_labels.generation`: one generation of labels for a target set (inference, thresholds,
  PNGs written atomically, reuse of a finished set), single process or summed across processes.
"""

from __future__ import annotations

from uda_sam.pseudo_labels.generation import GenerationResult, ProcessGroup, generate_pseudo_labels
from uda_sam.pseudo_labels.thresholds import (
    ClasswiseThresholdEstimator,
    PseudoLabelStatistics,
    make_pseudo_labels,
    save_label_png,
    threshold_predictions,
)

__all__ = [
    "ClasswiseThresholdEstimator",
    "GenerationResult",
    "ProcessGroup",
    "PseudoLabelStatistics",
    "generate_pseudo_labels",
    "make_pseudo_labels",
    "save_label_png",
    "threshold_predictions",
]
