"""GTA5 reader (source domain): ``{root}/images/NNNNN.png`` and palette-index ``{root}/labels/NNNNN.png``."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np

from uda_sam.data.base import (
    SampleFiles,
    SegmentationDataset,
    check_limit,
    paired_samples,
    require_dir,
    select_names,
)
from uda_sam.data.io import read_palette_indices, read_rgb
from uda_sam.data.labels import LABEL_ID_TO_TRAIN_ID
from uda_sam.data.transforms import SegmentationTransform

LAYOUT = "{root}/images/NNNNN.png (RGB) and {root}/labels/NNNNN.png (palette PNGs whose indices are Cityscapes labelIds)"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Files already reported in this process (each worker warns at most once per file).
_warned_mismatch: set[str] = set()


class GTA5(SegmentationDataset):
    """GTA5 images with Cityscapes trainId masks.

    Labels are palette PNGs whose *indices* are Cityscapes labelIds; they are mapped to trainIds (other ids -> 255).

    Some GTA5 images differ in size from their label files. Such an image is resized (bilinear) to its label's size,
    so pixels never silently misalign, and a warning names the file once per process. With ``image_root``
    (style-translated images, e.g. BDL's CycleGAN "GTA5 as Cityscapes" set, about 1024 px wide) the labels are
    instead resized (nearest) to each image's size, silently since the size difference is by design.

    Args:
        root: GTA5 root holding ``images/`` and ``labels/``.
        image_root: folder of translated images with the same file names (``.png`` or ``.jpg``); labels still
            come from ``root/labels``. ``None`` reads ``root/images``.
        list_file: optional text file with one image name per line (``00001.png``); default: all images, sorted.
        limit: keep only the first ``limit`` samples (after sorting).
        transform: resize, augmentation and normalisation (see :class:`SegmentationDataset`).

    Raises:
        FileNotFoundError: on first use: missing root/sub-folder/list entries, no images, or images without a
            label file.
        ValueError: invalid arguments. (Reading a corrupt file later raises ValueError naming it.)
    """

    def __init__(
        self,
        root: str | Path,
        image_root: str | Path | None = None,
        list_file: str | Path | None = None,
        limit: int | None = None,
        transform: SegmentationTransform | None = None,
    ) -> None:
        super().__init__(transform)
        self.root = Path(root)
        self.image_root = Path(image_root) if image_root is not None else None
        self.list_file = list_file
        self.limit = check_limit(limit)

    @property
    def translated(self) -> bool:
        """Whether the images are style-translated ones from ``image_root``."""
        return self.image_root is not None

    @property
    def image_dir(self) -> Path:
        """The folder the images are read from: ``image_root``, else ``root/images``."""
        return self.image_root if self.image_root is not None else self.root / "images"

    def find_samples(self) -> list[SampleFiles]:
        """Every image of ``images/`` (or ``image_root``) with its label file."""
        require_dir(self.root, "GTA5 root", LAYOUT)
        label_dir = require_dir(self.root / "labels", "GTA5 label folder", LAYOUT)
        if self.image_root is None:
            image_dir = require_dir(self.image_dir, "GTA5 image folder", LAYOUT)
        else:
            image_dir = require_dir(
                self.image_dir,
                "GTA5 image_root",
                "a folder of translated images named like root/images (NNNNN.png)",
            )

        images = {
            p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        }
        names = select_names(
            images,
            image_dir,
            self.list_file,
            IMAGE_SUFFIXES,
            self.limit,
            f"GTA5 image folder {image_dir} holds no images; expected layout: {LAYOUT}",
        )
        return paired_samples(names, images, label_dir, "GTA5", LAYOUT)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read one image (RGB) and its trainId mask, aligned to a common size."""
        sample = self.samples[index]
        assert sample.label is not None
        image = read_rgb(sample.image)
        label = read_palette_indices(sample.label)
        # Translated images differ in size by design: SegmentationDataset brings their labels to the image grid.
        if image.shape[:2] != label.shape and not self.translated:
            height, width = image.shape[:2]
            if str(sample.image) not in _warned_mismatch:
                _warned_mismatch.add(str(sample.image))
                warnings.warn(
                    f"GTA5 image {sample.image} is {width}x{height} but its label {sample.label} is "
                    f"{label.shape[1]}x{label.shape[0]}; resizing the image to the label size",
                    stacklevel=2,
                )
            image = cv2.resize(image, (label.shape[1], label.shape[0]), interpolation=cv2.INTER_LINEAR)
        return image, LABEL_ID_TO_TRAIN_ID[label]
