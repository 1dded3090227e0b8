"""Cityscapes reader (target domain): ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and ``gtFine`` labelIds."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from uda_sam.data.base import (
    SampleFiles,
    SegmentationDataset,
    check_label_sizes,
    check_limit,
    paired_samples,
    require_dir,
    select_names,
)
from uda_sam.data.io import read_label_uint8, read_rgb
from uda_sam.data.labels import IGNORE_INDEX, LABEL_ID_TO_TRAIN_ID, NUM_CLASSES
from uda_sam.data.transforms import SegmentationTransform

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
LAYOUT = (
    "{root}/leftImg8bit/{split}/{city}/{city}_{seq:06}_{frame:06}_leftImg8bit.png and "
    "{root}/gtFine/{split}/{city}/{city}_{seq:06}_{frame:06}_gtFine_labelIds.png"
)
PSEUDO_LAYOUT = (
    "{pseudo_label_root}/{city}/{city}_{seq:06}_{frame:06}.png (single-channel uint8 trainIds, 255 ignore)"
)

Split = Literal["train", "val", "test"]
LabelMode = Literal["gt", "optional", "none"]


class Cityscapes(SegmentationDataset):
    """Cityscapes images with trainId masks from ground truth, from pseudo-label files, or all 255.

    Sample names are ``"{city}/{city}_{seq}_{frame}"`` (path relative to ``leftImg8bit/{split}`` without the
    ``_leftImg8bit.png`` suffix); a pseudo label for name ``n`` is ``{pseudo_label_root}/{n}.png``.

    Args:
        root: Cityscapes root holding ``leftImg8bit/`` (and ``gtFine/`` when ground truth is read).
        split: ``"train"``, ``"val"`` or ``"test"``. Cityscapes' public test labels are placeholders (they map to
            all 255): read that split with ``labels="none"``, which needs no ``gtFine/``; a labelled test split
            (the toy pair's) is read like ``val``.
        labels: where masks come from when ``pseudo_label_root`` is ``None``: ``"gt"`` (``gtFine`` labelIds
            mapped to trainIds; every image must have its label file), ``"optional"`` (ground truth where the
            file exists, else all 255), ``"none"`` (all 255, e.g. unlabeled target training images).
        pseudo_label_root: folder of pseudo labels; when given, masks come from there (overriding ``labels``)
            and every image must have its file.
        list_file: optional text file with one name per line (``aachen/aachen_000000_000019_leftImg8bit.png``
            as in the ADVENT/BDL lists, or without the suffix); default: all images of the split, sorted.
        limit: keep only the first ``limit`` samples.
        transform: resize, augmentation and normalisation (see :class:`SegmentationDataset`); a transform
            that keeps the mask at its native size (``resize_mask=False``) evaluates at full label resolution.

    Raises:
        FileNotFoundError: on first use: missing root/sub-folders, no images, images without their label or
            pseudo-label file.
        ValueError: invalid arguments; on first use: ground-truth labels not of their image's size, or pseudo
            labels not of its aspect ratio (read from the file headers).
    """

    def __init__(
        self,
        root: str | Path,
        split: Split = "train",
        labels: LabelMode = "gt",
        pseudo_label_root: str | Path | None = None,
        list_file: str | Path | None = None,
        limit: int | None = None,
        transform: SegmentationTransform | None = None,
    ) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if labels not in ("gt", "optional", "none"):
            raise ValueError(f"labels must be 'gt', 'optional' or 'none', got {labels!r}")
        super().__init__(transform)
        self.root = Path(root)
        self.split = split
        self.labels = labels
        self.pseudo_label_root = Path(pseudo_label_root) if pseudo_label_root is not None else None
        self.list_file = list_file
        self.limit = check_limit(limit)

    def find_samples(self) -> list[SampleFiles]:
        """Every image of the split with its mask file (ground truth, pseudo label or none)."""
        split, labels = self.split, self.labels
        require_dir(self.root, "Cityscapes root", LAYOUT)
        require_dir(self.root / "leftImg8bit", "Cityscapes image folder", LAYOUT)
        image_dir = require_dir(self.root / "leftImg8bit" / split, f"Cityscapes {split} image folder", LAYOUT)
        label_dir = self.root / "gtFine" / split
        if labels == "gt" and self.pseudo_label_root is None:
            require_dir(self.root / "gtFine", "Cityscapes label folder", LAYOUT)
            require_dir(label_dir, f"Cityscapes {split} label folder", LAYOUT)

        # Sample name = path below leftImg8bit/{split} without the suffix: "{city}/{city}_{seq}_{frame}".
        images = {
            p.relative_to(image_dir).as_posix()[: -len(IMAGE_SUFFIX)]: p
            for p in image_dir.glob(f"*/*{IMAGE_SUFFIX}")
        }
        names = select_names(
            images,
            image_dir,
            self.list_file,
            (IMAGE_SUFFIX, ".png"),
            self.limit,
            f"Cityscapes {split} image folder {image_dir} holds no images; expected layout: {LAYOUT}",
        )
        what = f"Cityscapes {split}"
        if self.pseudo_label_root is not None:
            pseudo_dir = require_dir(self.pseudo_label_root, "pseudo_label_root", PSEUDO_LAYOUT)
            samples = paired_samples(
                names, images, pseudo_dir, what, PSEUDO_LAYOUT, label_kind="pseudo-label file"
            )
        elif labels == "gt":
            samples = paired_samples(names, images, label_dir, what, LAYOUT, label_suffix=LABEL_SUFFIX)
        else:  # "optional": ground truth where its file exists; "none": no labels
            label_files = [label_dir / f"{n}{LABEL_SUFFIX}" if labels == "optional" else None for n in names]
            samples = [
                SampleFiles(n, images[n], file if file is not None and file.is_file() else None)
                for n, file in zip(names, label_files, strict=True)
            ]
        pseudo = self.pseudo_label_root is not None
        check_label_sizes(samples, f"{what} {'pseudo-label' if pseudo else 'gtFine'}", scaled=pseudo)
        return samples

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read one image (RGB) and its trainId mask (all 255 when the sample has no label)."""
        sample = self.samples[index]
        image = read_rgb(sample.image)
        if sample.label is None:
            return image, np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        label = read_label_uint8(sample.label)
        if self.pseudo_label_root is None:
            if label.shape != image.shape[:2]:  # changed since the dataset was built
                raise ValueError(
                    f"label {sample.label} is {label.shape[1]}x{label.shape[0]} but its image {sample.image} is "
                    f"{image.shape[1]}x{image.shape[0]}"
                )
            return image, LABEL_ID_TO_TRAIN_ID[label]
        invalid = (label >= NUM_CLASSES) & (label != IGNORE_INDEX)
        if invalid.any():
            raise ValueError(
                f"pseudo label {sample.label} holds value {int(label[invalid][0])}; expected trainIds "
                f"0..{NUM_CLASSES - 1} or {IGNORE_INDEX}"
            )
        return image, label
