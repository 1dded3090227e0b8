"""uda-sam: unsupervised domain adaptation for semantic segmentation with a self-attention module (SAM).

The public API is the names in ``__all__``; each is importable from the top level::

    from uda_sam import SelfAttentionModule, SelfAttentionLoss, load_sam, self_attention_loss

Names are resolved on first use, so ``import uda_sam`` stays light: the plain-PyTorch parts (the SAM, its losses,
:func:`load_sam`, the networks, the threshold estimator) never import Lightning; the datamodule, the tasks and the
callbacks do. The sub-packages hold the rest:

- :mod:`uda_sam.nn`: the SAM, its losses, the segmentation networks and their weights files (plain PyTorch).
- :mod:`uda_sam.data`: label tables, the dataset readers, transforms and the toy domain pair (plain torch).
- :mod:`uda_sam.datamodules`: the Lightning datamodule pairing a source and a target reader.
- :mod:`uda_sam.pseudo_labels`: the class-wise threshold rule and one generation of labels (plain torch).
- :mod:`uda_sam.evaluation`: mIoU, official-format scoring and the paper's analyses (plain torch/numpy).
- :mod:`uda_sam.tasks`: the Lightning training tasks; :mod:`uda_sam.callbacks`: the Lightning callbacks.
- :mod:`uda_sam.cli`: the ``uda-sam`` command, one module per command.

Layers, highest first (an arrow: "imports only what is below it"):
``cli -> tasks, callbacks, datamodules -> media -> evaluation, pseudo_labels -> data, nn``. Layers on one floor never
import each other: ``data`` and ``nn`` are two ground floors, ``evaluation`` and ``pseudo_labels`` import ``data``
(and ``evaluation`` ``nn``), :mod:`uda_sam.media` holds the W&B media the tasks and the callbacks share, and
:mod:`uda_sam.datamodules` reads only ``data``. Under them all, two helpers that import nothing of the package:
:mod:`uda_sam.files` and :mod:`uda_sam.checks`.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__: str = version("uda-sam")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from uda_sam.callbacks import (
        AttentionVisualization,
        DivergenceMonitor,
        EntropyAnalysisCallback,
        LastStepCheckpoint,
        PredictionWriter,
        PseudoLabelRegeneration,
        SelfAttentionLossCallback,
    )
    from uda_sam.data import (
        CLASS_NAMES,
        GTA5,
        IGNORE_INDEX,
        NUM_CLASSES,
        Cityscapes,
        ImageFolder,
        SegmentationTransform,
        Synthia,
        make_toy_data,
    )
    from uda_sam.datamodules import UDADataModule
    from uda_sam.evaluation import SegmentationMetrics
    from uda_sam.nn import (
        DeepLabV2,
        DilatedFCN,
        FCN8s,
        SegmentationNetwork,
        SelfAttentionLoss,
        SelfAttentionModule,
        load_network_weights,
        load_sam,
        logit_norm,
        network_state_dict,
        relu_cosine_similarity,
        save_sam,
        segmentation_loss,
        self_attention_loss,
    )
    from uda_sam.pseudo_labels import ClasswiseThresholdEstimator, PseudoLabelStatistics, make_pseudo_labels
    from uda_sam.tasks import SAMPretraining, SegmentationTask, SelfTraining

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    # The self-attention module and its losses (plain PyTorch).
    "SelfAttentionModule": "uda_sam.nn",
    "SelfAttentionLoss": "uda_sam.nn",
    "self_attention_loss": "uda_sam.nn",
    "segmentation_loss": "uda_sam.nn",
    "logit_norm": "uda_sam.nn",
    "relu_cosine_similarity": "uda_sam.nn",
    "load_sam": "uda_sam.nn",
    "save_sam": "uda_sam.nn",
    "network_state_dict": "uda_sam.nn",
    "load_network_weights": "uda_sam.nn",
    # Networks.
    "SegmentationNetwork": "uda_sam.nn",
    "DeepLabV2": "uda_sam.nn",
    "DilatedFCN": "uda_sam.nn",
    "FCN8s": "uda_sam.nn",
    # Data.
    "GTA5": "uda_sam.data",
    "Synthia": "uda_sam.data",
    "Cityscapes": "uda_sam.data",
    "ImageFolder": "uda_sam.data",
    "UDADataModule": "uda_sam.datamodules",
    "SegmentationTransform": "uda_sam.data",
    "make_toy_data": "uda_sam.data",
    "CLASS_NAMES": "uda_sam.data",
    "NUM_CLASSES": "uda_sam.data",
    "IGNORE_INDEX": "uda_sam.data",
    # Pseudo labels.
    "ClasswiseThresholdEstimator": "uda_sam.pseudo_labels",
    "make_pseudo_labels": "uda_sam.pseudo_labels",
    "PseudoLabelStatistics": "uda_sam.pseudo_labels",
    # Metrics.
    "SegmentationMetrics": "uda_sam.evaluation",
    # Lightning: tasks and callbacks.
    "SegmentationTask": "uda_sam.tasks",
    "SAMPretraining": "uda_sam.tasks",
    "SelfTraining": "uda_sam.tasks",
    "SelfAttentionLossCallback": "uda_sam.callbacks",
    "PseudoLabelRegeneration": "uda_sam.callbacks",
    "PredictionWriter": "uda_sam.callbacks",
    "EntropyAnalysisCallback": "uda_sam.callbacks",
    "AttentionVisualization": "uda_sam.callbacks",
    "DivergenceMonitor": "uda_sam.callbacks",
    "LastStepCheckpoint": "uda_sam.callbacks",
}

__all__ = [
    "__version__",
    "SelfAttentionModule",
    "SelfAttentionLoss",
    "self_attention_loss",
    "segmentation_loss",
    "logit_norm",
    "relu_cosine_similarity",
    "load_sam",
    "save_sam",
    "network_state_dict",
    "load_network_weights",
    "SegmentationNetwork",
    "DeepLabV2",
    "DilatedFCN",
    "FCN8s",
    "GTA5",
    "Synthia",
    "Cityscapes",
    "ImageFolder",
    "UDADataModule",
    "SegmentationTransform",
    "make_toy_data",
    "CLASS_NAMES",
    "NUM_CLASSES",
    "IGNORE_INDEX",
    "ClasswiseThresholdEstimator",
    "make_pseudo_labels",
    "PseudoLabelStatistics",
    "SegmentationMetrics",
    "SegmentationTask",
    "SAMPretraining",
    "SelfTraining",
    "SelfAttentionLossCallback",
    "PseudoLabelRegeneration",
    "PredictionWriter",
    "EntropyAnalysisCallback",
    "AttentionVisualization",
    "DivergenceMonitor",
    "LastStepCheckpoint",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'uda_sam' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
