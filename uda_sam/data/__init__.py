"""Data: label tables, dataset readers (GTA5, SYNTHIA, Cityscapes), transforms and the toy pair (plain Python and torch).

The UDA datamodule, the one part that needs Lightning, is :class:`uda_sam.data.datamodule.UDADataModule`; it is not
imported here, so the label tables and readers load without Lightning.
"""

from __future__ import annotations

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
    "colorize",
    "denormalize",
    "make_toy_data",
]
