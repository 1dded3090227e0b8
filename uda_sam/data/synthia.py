"""SYNTHIA-RAND-CITYSCAPES reader (source domain): ``{root}/RGB/*.png`` and 16-bit ``{root}/GT/LABELS/*.png``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from uda_sam.data.base import (
    SegmentationDataset,
    check_label_sizes,
    paired_samples,
    require_dir,
    select_names,
)
from uda_sam.data.io import read_rgb, read_synthia_label
from uda_sam.data.labels import SYNTHIA_ID_TO_TRAIN_ID
from uda_sam.data.transforms import Normalization

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
        size: ``(width, height)`` (the usual 1280x760 is the native size), ``None`` = native.
        list_file: optional text file with one image name per line (``0000000.png``); default: all, sorted.
        normalization: ``"imagenet"`` or ``"caffe"``.
        random_scale: optional ``(min, max)`` random rescale factors.
        crop_size: optional random crop ``(width, height)``.
        hflip: random horizontal flip.
        limit: keep only the first ``limit`` samples.

    Raises:
        FileNotFoundError: missing root/sub-folder/list entries, no images, or images without a label file.
        ValueError: labels not of their image's size (read from the file headers).
    """

    def __init__(
        self,
        root: str | Path,
        size: Sequence[int] | None = (1280, 760),
        list_file: str | Path | None = None,
        normalization: Normalization = "imagenet",
        random_scale: Sequence[float] | None = None,
        crop_size: Sequence[int] | None = None,
        hflip: bool = False,
        limit: int | None = None,
    ) -> None:
        super().__init__(size, normalization, random_scale, crop_size, hflip)
        self.root = Path(root)
        require_dir(self.root, "SYNTHIA root", LAYOUT)
        image_dir = require_dir(self.root / "RGB", "SYNTHIA image folder", LAYOUT)
        label_dir = require_dir(self.root / "GT" / "LABELS", "SYNTHIA label folder", LAYOUT)

        images = {p.stem: p for p in image_dir.glob("*.png") if p.is_file()}
        names = select_names(
            images,
            image_dir,
            list_file,
            (".png",),
            limit,
            f"SYNTHIA image folder {image_dir} holds no PNG images; expected layout: {LAYOUT}",
        )
        self.samples = paired_samples(names, images, label_dir, "SYNTHIA", LAYOUT)
        check_label_sizes(self.samples, "SYNTHIA")

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
