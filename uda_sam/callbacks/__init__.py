"""Lightning callbacks of the package."""

from __future__ import annotations

from uda_sam.callbacks.attention import AttentionVisualization
from uda_sam.callbacks.checkpoint import LastStepCheckpoint
from uda_sam.callbacks.divergence import DivergenceError, DivergenceMonitor
from uda_sam.callbacks.entropy import EntropyAnalysisCallback
from uda_sam.callbacks.prediction_writer import PredictionWriter
from uda_sam.callbacks.pseudo_labels import PseudoLabelRegeneration
from uda_sam.callbacks.self_attention_loss import SelfAttentionLossCallback

__all__ = [
    "AttentionVisualization",
    "DivergenceError",
    "DivergenceMonitor",
    "EntropyAnalysisCallback",
    "LastStepCheckpoint",
    "PredictionWriter",
    "PseudoLabelRegeneration",
    "SelfAttentionLossCallback",
]
