"""SYNTHIA-RAND-CITYSCAPES reader (source domain): ``{root}/RGB/*.png`` and 16-bit ``{root}/GT/LABELS/*.png``."""

from __future__ import annotations

from pathlib import Path

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
from uda_sam.data.io import read_rgb, read_synthia_label
from uda_sam.data.labels import SYNTHIA_ID_TO_TRAIN_ID
from uda_sam.data.transforms import SegmentationTransform

LAYOUT = (
    "{root}/RGB/NNNNNNN.png (RGB) and {root}/GT/LABELS/NNNNNNN.png "
    "(16-bit PNGs, class id 0..22 in the R channel)"
)


class Synthia(SegmentationDataset):
    """SYNTHIA-RAND-CITYSCAPES images with Cityscapes trainId masks.

    The label files are 16-bit PNGs read with OpenCV (PIL cannot); the class id is the R channel (index 2 of
    OpenCV's BGR array) and must lie in 0..22, else reading the sample raises ValueError naming the file.
    SYNTHIA ids are mapped to the 16 Cityscapes trainIds they cover; everything else becomes 255.

    Args:
        root: SYNTHIA root holding ``RGB/`` and ``GT/LABELS/``.
        list_file: optional text file with one image name per line (``0000000.png``); default: all, sorted.
        limit: keep only the first ``limit`` samples.
        transform: resize, augmentation and normalisation (see :class:`SegmentationDataset`).

    Raises:
        FileNotFoundError: on first use: missing root/sub-folder/list entries, no images, or images without a
            label file.
        ValueError: on first use: labels not of their image's size (read from the file headers).
    """

    def __init__(
        self,
        root: str | Path,
        list_file: str | Path | None = None,
        limit: int | None = None,
        transform: SegmentationTransform | None = None,
    ) -> None:
        super().__init__(transform)
        self.root = Path(root)
        self.list_file = list_file
        self.limit = check_limit(limit)

    def find_samples(self) -> list[SampleFiles]:
        """Every image of ``RGB/`` with its label file."""
        require_dir(self.root, "SYNTHIA root", LAYOUT)
        image_dir = require_dir(self.root / "RGB", "SYNTHIA image folder", LAYOUT)
        label_dir = require_dir(self.root / "GT" / "LABELS", "SYNTHIA label folder", LAYOUT)

        images = {p.stem: p for p in image_dir.glob("*.png") if p.is_file()}
        names = select_names(
            images,
            image_dir,
            self.list_file,
            (".png",),
            self.limit,
            f"SYNTHIA image folder {image_dir} holds no PNG images; expected layout: {LAYOUT}",
        )
        samples = paired_samples(names, images, label_dir, "SYNTHIA", LAYOUT)
        check_label_sizes(samples, "SYNTHIA")
        return samples

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read one image (RGB) and its trainId mask."""
        sample = self.samples[index]
        assert sample.label is not None
        image = read_rgb(sample.image)
        ids = read_synthia_label(sample.label)
        if ids.shape != image.shape[:2]:
            raise ValueError(
                f"SYNTHIA label {sample.label} is {ids.shape[1]}x{ids.shape[0]} but image {sample.image} is "
                f"{image.shape[1]}x{image.shape[0]}; expected equal sizes"
            )
        return image, SYNTHIA_ID_TO_TRAIN_ID[ids]
