"""Lightning training tasks: the shared base, SAM pretraining (stage 1) and self-training (stages 0 and 2)."""

from __future__ import annotations

from uda_sam.tasks.base import SegmentationTask
from uda_sam.tasks.sam_pretraining import SAMPretraining
from uda_sam.tasks.self_training import SelfTraining

__all__ = ["SAMPretraining", "SegmentationTask", "SelfTraining"]
