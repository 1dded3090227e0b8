"""Datasets in plain torch: label tables, the readers (GTA5, SYNTHIA, Cityscapes, a folder of images), transforms, toy pair.

A reader is one module: a :class:`~uda_sam.data.base.SegmentationDataset` subclass that knows its dataset's on-disk
layout and label mapping. The Lightning datamodule that pairs a source and a target reader is
:class:`uda_sam.datamodules.UDADataModule`.
"""

from __future__ import annotations

from uda_sam.data.base import SegmentationDataset
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
    "SegmentationDataset",
    "SegmentationTransform",
    "Synthia",
    "colorize",
    "denormalize",
    "make_toy_data",
]
