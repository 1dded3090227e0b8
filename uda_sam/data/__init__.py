"""Data: label tables, dataset readers (GTA5, SYNTHIA, Cityscapes), transforms, the UDA datamodule and the toy pair.

Everything but :class:`UDADataModule` is plain Python and torch; the datamodule (the one part that needs Lightning)
is imported on first use, so the label tables and readers load without Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uda_sam.data.cityscapes import Cityscapes
from uda_sam.data.gta5 import GTA5
from uda_sam.data.image_folder import ImageFolder
from uda_sam.data.labels import (
    CLASS_COLORS,
    CLASS_NAMES,
    CLASS_SUBSETS,
    IGNORE_INDEX,
    LABEL_ID_TO_TRAIN_ID,
    NUM_CLASSES,
    SYNTHIA_13_CLASSES,
    SYNTHIA_16_CLASSES,
    SYNTHIA_ID_TO_TRAIN_ID,
    TRAIN_ID_TO_LABEL_ID,
    colorize,
)
from uda_sam.data.synthia import Synthia
from uda_sam.data.toy import make_toy_data
from uda_sam.data.transforms import SegmentationTransform, denormalize

__all__ = [
    "CLASS_COLORS",
    "CLASS_NAMES",
    "CLASS_SUBSETS",
    "GTA5",
    "IGNORE_INDEX",
    "LABEL_ID_TO_TRAIN_ID",
    "NUM_CLASSES",
    "SYNTHIA_13_CLASSES",
    "SYNTHIA_16_CLASSES",
    "SYNTHIA_ID_TO_TRAIN_ID",
    "TRAIN_ID_TO_LABEL_ID",
    "Cityscapes",
    "ImageFolder",
    "SegmentationTransform",
    "Synthia",
    "UDADataModule",
    "colorize",
    "denormalize",
    "make_toy_data",
]

if TYPE_CHECKING:
    from uda_sam.data.datamodule import UDADataModule


def __getattr__(name: str) -> Any:
    """Import :class:`UDADataModule` (and with it Lightning) on first use (PEP 562)."""
    if name == "UDADataModule":
        from uda_sam.data.datamodule import UDADataModule

        return UDADataModule
    raise AttributeError(f"module 'uda_sam.data' has no attribute {name!r}")
