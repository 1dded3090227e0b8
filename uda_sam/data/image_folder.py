"""A folder tree of one's own images (PNG / JPEG), read without labels for predictions at each image's resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from uda_sam.data.base import SampleFiles, SegmentationDataset, require_dir, summarize
from uda_sam.data.io import read_rgb
from uda_sam.data.labels import IGNORE_INDEX
from uda_sam.data.transforms import SegmentationTransform

__all__ = ["IMAGE_SUFFIXES", "ImageFolder"]

#: File suffixes read as images (case-insensitive).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
LAYOUT = "{root}/**/*.png, *.jpg or *.jpeg (any depth of sub-folders)"


class ImageFolder(SegmentationDataset):
    """Every PNG / JPEG image below ``root``, at any depth, sorted by path; no labels.

    A sample's name is its path relative to ``root`` without the suffix (``"seq_01/frame_000042"``), so that
    :class:`~uda_sam.callbacks.PredictionWriter` writes its files under the same relative paths. The image is
    resized to ``size`` (the resolution the network was trained at) while the mask, all 255, keeps the image's
    own size: predictions are upsampled back to each image's resolution. Images may differ in size, so batches
    hold one image each. Hidden files and folders (names starting with ``.``) are skipped.

    Args:
        root: The folder to read.
        transform: The resize (to the resolution the network was trained at) and normalisation; it must keep
            the mask at its native size (``resize_mask=False``). ``None``: each image at its own size, ImageNet
            normalisation.

    Raises:
        ValueError: If ``transform`` resizes the mask.
        FileNotFoundError: On first use, if ``root`` is not a folder or holds no image.
        ValueError: On first use, if two files differ only in their suffix (``a.png`` and ``a.jpg``: one output
            name).
    """

    def __init__(self, root: str | Path, transform: SegmentationTransform | None = None) -> None:
        super().__init__(transform if transform is not None else SegmentationTransform(resize_mask=False))
        if self.transform.resize_mask:
            raise ValueError(
                "ImageFolder needs a transform that keeps the mask at the image's size (resize_mask=False)"
            )
        self.root = Path(root)

    def find_samples(self) -> list[SampleFiles]:
        """Every image below ``root``, sorted by path."""
        require_dir(self.root, "ImageFolder root", LAYOUT)
        files: dict[str, list[Path]] = {}
        for path in sorted(self.root.rglob("*")):
            relative = path.relative_to(self.root)
            if path.suffix.lower() not in IMAGE_SUFFIXES or any(p.startswith(".") for p in relative.parts):
                continue
            if path.is_file():
                files.setdefault(relative.with_suffix("").as_posix(), []).append(path)
        clashes = sorted(name for name, paths in files.items() if len(paths) > 1)
        if clashes:
            raise ValueError(
                f"ImageFolder root {self.root} holds images that differ only in their suffix, which would write the "
                f"same prediction files: {summarize([', '.join(p.name for p in files[n]) for n in clashes])}"
            )
        if not files:
            raise FileNotFoundError(
                f"ImageFolder root {self.root} holds no images; expected layout: {LAYOUT}"
            )
        return [SampleFiles(name, paths[0], None) for name, paths in sorted(files.items())]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read one image (RGB) and an all-255 mask of its size."""
        image = read_rgb(self.samples[index].image)
        return image, np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
