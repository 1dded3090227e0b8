"""Cityscapes class tables, id lookups for GTA5/Cityscapes/SYNTHIA, class subsets and a mask colouriser.

Class order everywhere in this package is the Cityscapes *trainId* order (19 classes); 255 is the ignore label.
GTA5 and Cityscapes label files store Cityscapes *labelIds*, SYNTHIA-RAND-CITYSCAPES stores its own ids; the uint8
lookup tables below map any of them to trainIds with one fancy-indexing operation (``table[label]``).
"""

from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES: int = 19
IGNORE_INDEX: int = 255

CLASS_NAMES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),  # sky; some codebases have the typo (0, 130, 180)
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)

#: Cityscapes labelId of each trainId (index = trainId).
TRAIN_ID_LABEL_IDS: tuple[int, ...] = (
    7,
    8,
    11,
    12,
    13,
    17,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
    26,
    27,
    28,
    31,
    32,
    33,
)

#: SYNTHIA-RAND-CITYSCAPES class id of each trainId it annotates (terrain, truck and train never occur).
SYNTHIA_ID_TO_TRAIN_ID_PAIRS: tuple[tuple[int, int], ...] = (
    (3, 0),  # road
    (4, 1),  # sidewalk
    (2, 2),  # building
    (21, 3),  # wall
    (5, 4),  # fence
    (7, 5),  # pole
    (15, 6),  # traffic light
    (9, 7),  # traffic sign
    (6, 8),  # vegetation
    (1, 10),  # sky
    (10, 11),  # pedestrian -> person
    (17, 12),  # rider
    (8, 13),  # car
    (19, 15),  # bus
    (12, 17),  # motorcycle
    (11, 18),  # bicycle
)

#: Largest valid SYNTHIA class id (ids 0..22 exist; larger values mean a wrong file or channel).
SYNTHIA_MAX_ID: int = 22


def _lookup(pairs: list[tuple[int, int]] | tuple[tuple[int, int], ...], fill: int) -> np.ndarray:
    table = np.full(256, fill, dtype=np.uint8)
    for src, dst in pairs:
        table[src] = dst
    table.setflags(write=False)  # shared module-level constant
    return table


#: labelId -> trainId (uint8, length 256); every id outside the 19 evaluated classes maps to 255.
LABEL_ID_TO_TRAIN_ID: np.ndarray = _lookup(
    [(label_id, train_id) for train_id, label_id in enumerate(TRAIN_ID_LABEL_IDS)], IGNORE_INDEX
)
#: trainId -> labelId (uint8, length 256) for official-format predictions; 255 (and anything else) -> 0 (unlabeled).
TRAIN_ID_TO_LABEL_ID: np.ndarray = _lookup(list(enumerate(TRAIN_ID_LABEL_IDS)), 0)
#: SYNTHIA id -> trainId (uint8, length 256); ids 0, 13, 14, 16, 18, 20, 22 and ids > 22 map to 255.
SYNTHIA_ID_TO_TRAIN_ID: np.ndarray = _lookup(SYNTHIA_ID_TO_TRAIN_ID_PAIRS, IGNORE_INDEX)

#: The 16 trainIds annotated in SYNTHIA (sorted).
SYNTHIA_16_CLASSES: list[int] = sorted(train_id for _, train_id in SYNTHIA_ID_TO_TRAIN_ID_PAIRS)
#: The 13-class subset (mIoU*): SYNTHIA's 16 without wall, fence and pole.
SYNTHIA_13_CLASSES: list[int] = [c for c in SYNTHIA_16_CLASSES if c not in (3, 4, 5)]

CLASS_SUBSETS: dict[str, list[int]] = {
    "19": list(range(NUM_CLASSES)),
    "16": SYNTHIA_16_CLASSES,
    "13": SYNTHIA_13_CLASSES,
}

_TRAIN_ID_PALETTE = np.zeros((256, 3), dtype=np.uint8)  # 255 and unknown ids -> black
_TRAIN_ID_PALETTE[:NUM_CLASSES] = np.asarray(CLASS_COLORS, dtype=np.uint8)
_TRAIN_ID_PALETTE.setflags(write=False)


def label_id_palette() -> list[int]:
    """A flat 768-entry PIL palette that colours each Cityscapes labelId index with its class colour.

    GTA5 label files are palette PNGs whose *indices* are labelIds; this palette makes such files look like
    the originals when viewed (ids outside the 19 classes are black).

    Returns:
        ``[r0, g0, b0, r1, g1, b1, ...]`` for indices 0..255.
    """
    palette = np.zeros((256, 3), dtype=np.uint8)
    for train_id, label_id in enumerate(TRAIN_ID_LABEL_IDS):
        palette[label_id] = CLASS_COLORS[train_id]
    return palette.reshape(-1).tolist()


def colorize(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """Colour a trainId mask with the Cityscapes colours.

    Args:
        mask: integer array or tensor of trainIds, shape (H, W); 255 (and any id >= 19) is drawn black.

    Returns:
        uint8 array (H, W, 3), RGB.

    Raises:
        ValueError: if ``mask`` is not two-dimensional or not of an integer type.
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"colorize: mask must have shape (H, W), got {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"colorize: mask must hold integer trainIds, got dtype {mask.dtype}")
    # Negative or >255 ids have no colour: clip into the black part of the palette.
    index = np.where((mask < 0) | (mask > 255), 255, mask).astype(np.intp)
    return _TRAIN_ID_PALETTE[index]
