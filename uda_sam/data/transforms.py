"""Joint image/mask transforms (albumentations) and conversion to the sample tensors.

Images are resized bilinearly, masks always with nearest neighbour. The optional augmentation is the usual UDA one:
random rescale, random crop (padding the mask with 255) and horizontal flip. Normalisation is either torchvision's
ImageNet convention (RGB, [0, 1] scale, mean/std) or the Caffe convention of DeepLab/BDL/ADVENT weights
(BGR order, 0-255 scale, mean subtracted, no std).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import albumentations as A
import cv2
import numpy as np
import torch

from uda_sam.data.labels import IGNORE_INDEX

Normalization = Literal["imagenet", "caffe"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Caffe mean in **BGR** order on the 0-255 scale (the value used by DeepLab/BDL/ADVENT).
CAFFE_MEAN_BGR: tuple[float, float, float] = (104.00698793, 116.66876762, 122.67891434)


#: The augmentation seed of the sample being loaded in this process (see :func:`augmentation_seed`).
_SAMPLE_SEED: ContextVar[int | None] = ContextVar("uda_sam_sample_seed", default=None)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the ``position``-th draw of an epoch: a function of the three numbers only.

    A training draw's random scale, crop and flip depend on nothing else (not the process, loader worker or rank
    that loads it, nor what was loaded before), so a resumed run augments each draw as an uninterrupted one does.
    """
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


@contextmanager
def augmentation_seed(seed: int | None) -> Iterator[None]:
    """Augment the samples loaded in this block from ``seed`` (``None``: the transform's own generator).

    Example::

        with augmentation_seed(sample_seed(seed, epoch, position)):
            sample = dataset[index]
    """
    token = _SAMPLE_SEED.set(seed)
    try:
        yield
    finally:
        _SAMPLE_SEED.reset(token)


def check_size(size: Sequence[int] | None, name: str) -> tuple[int, int] | None:
    """Validate a ``(width, height)`` pair of positive ints (or ``None``) and return it as a tuple.

    Raises:
        ValueError: naming ``name`` when the value is not two positive integers.
    """
    if size is None:
        return None
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be (width, height) or None, got {size!r}") from err
    if width <= 0 or height <= 0 or (width, height) != tuple(size):
        raise ValueError(f"{name} must be two positive integers (width, height), got {size!r}")
    return width, height


def check_normalization(normalization: str) -> Normalization:
    """Validate a normalisation name (``"imagenet"`` or ``"caffe"``)."""
    if normalization not in ("imagenet", "caffe"):
        raise ValueError(f"normalization must be 'imagenet' or 'caffe', got {normalization!r}")
    return normalization  # type: ignore[return-value]


def check_scale(random_scale: Sequence[float] | None) -> tuple[float, float] | None:
    """Validate a `(min, max)` random-scale range (or `None`)."""
    if random_scale is None:
        return None
    try:
        low, high = (float(v) for v in random_scale)
    except (TypeError, ValueError) as err:
        raise ValueError(f"random_scale must be (min, max) factors or None, got {random_scale!r}") from err
    if not 0 < low <= high:
        raise ValueError(f"random_scale must satisfy 0 < min <= max, got {random_scale!r}")
    return low, high


class SegmentationTransform:
    """Callable ``(image RGB uint8 (H,W,3), mask uint8 (H,W)) -> (image float32 (3,h,w), mask int64 (h',w'))``.

    Args:
        size: ``(width, height)`` to resize to first, or ``None`` to keep the native size.
        normalization: ``"imagenet"`` (RGB, mean/std) or ``"caffe"`` (BGR, 0-255, Caffe mean, no std).
        random_scale: ``(min, max)`` factor range for a random rescale after the resize, or ``None``.
        crop_size: ``(width, height)`` of a random crop (the image is padded with 0 and the mask with 255
            when smaller), or ``None``.
        hflip: random horizontal flip with probability 0.5.
        resize_mask: when ``False`` only the image is resized and the mask keeps its native size (evaluation
            at full label resolution); incompatible with any augmentation.

    Inside :func:`augmentation_seed` (the training loaders of :class:`~uda_sam.datamodules.UDADataModule` load every
    sample so), a sample's augmentation is drawn from that seed alone. Elsewhere it comes from one generator per
    process, seeded from ``torch.initial_seed()``: data-loader workers then draw different (and, under
    ``seed_everything``, reproducible) augmentations instead of copies of the parent's generator state. Either
    way the transforms share one stream of random numbers, so that no two of them draw the same numbers.
    """

    def __init__(
        self,
        size: Sequence[int] | None = None,
        normalization: Normalization = "imagenet",
        random_scale: Sequence[float] | None = None,
        crop_size: Sequence[int] | None = None,
        hflip: bool = False,
        resize_mask: bool = True,
    ) -> None:
        self.size = check_size(size, "size")
        self.crop_size = check_size(crop_size, "crop_size")
        self.random_scale = check_scale(random_scale)
        self.normalization = check_normalization(normalization)
        self.hflip = bool(hflip)
        self.resize_mask = bool(resize_mask)
        self.augments = self.random_scale is not None or self.crop_size is not None or self.hflip
        if not self.resize_mask and self.augments:
            raise ValueError(
                "a mask kept at its native size (label_size='full') cannot be combined with random_scale, "
                "crop_size or hflip"
            )

        geometric: list[A.BasicTransform] = []
        if self.size is not None:
            width, height = self.size
            geometric.append(
                A.Resize(height, width, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)
            )
        if self.random_scale is not None:
            low, high = self.random_scale
            geometric.append(
                A.RandomScale(
                    scale_limit=(low - 1.0, high - 1.0),
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    p=1.0,
                )
            )
        if self.crop_size is not None:
            width, height = self.crop_size
            geometric.append(
                A.PadIfNeeded(
                    min_height=height,
                    min_width=width,
                    position="top_left",
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=IGNORE_INDEX,
                )
            )
            geometric.append(A.RandomCrop(height, width))
        if self.hflip:
            geometric.append(A.HorizontalFlip(p=0.5))

        if normalization == "imagenet":
            normalize = A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0)
        else:
            # (x - mean_255) / 1, computed in RGB order; channels are flipped to BGR after the transform.
            mean_rgb = tuple(m / 255.0 for m in CAFFE_MEAN_BGR[::-1])
            normalize = A.Normalize(mean=mean_rgb, std=(1 / 255.0,) * 3, max_pixel_value=255.0)

        if self.resize_mask:
            self._joint = A.Compose([*geometric, normalize])
            # For masks already at ``size`` (pseudo labels stored at the training size): only the image is
            # resized, then the same augmentation; the mask is not brought to the image grid and back.
            self._after_resize = A.Compose([*geometric[1:], normalize]) if self.size is not None else None
        else:
            self._joint = A.Compose([normalize])
            self._image_only = A.Compose(geometric)  # only a resize: no randomness here
            self._after_resize = None
        self._seeded_for: tuple[int, int] | None = None

    def _seed(self, seed: int) -> None:
        # One numpy and one Python generator for every transform: albumentations' set_random_seed would give
        # each transform its own generator with the same seed, and the scale and the crop offset the same number.
        numpy_generator, python_generator = np.random.default_rng(seed), random.Random(seed)
        for pipeline in (self._joint, self._after_resize):
            if pipeline is not None:
                pipeline.set_random_state(numpy_generator, python_generator)

    def _reseed(self) -> None:
        seed = _SAMPLE_SEED.get()
        if seed is not None:
            self._seed(seed)
            self._seeded_for = None  # the per-process stream starts again if a sample comes without a seed
            return
        key = (os.getpid(), torch.initial_seed())
        if key != self._seeded_for:
            self._seed(torch.initial_seed() % 2**32)
            self._seeded_for = key

    def takes_mask_at_size(self, mask_shape: Sequence[int], image_shape: Sequence[int]) -> bool:
        """Whether :meth:`__call__` takes a mask of ``mask_shape`` ``(h, w)`` as it is, for an image of
        ``image_shape``: a mask of the image's size, or (when the mask is resized) of the output ``size``."""
        if tuple(mask_shape[:2]) == tuple(image_shape[:2]):
            return True
        return self._after_resize is not None and tuple(mask_shape[:2]) == (self.size[1], self.size[0])

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform one image/mask pair.

        Args:
            image: uint8 RGB array (H, W, 3).
            mask: uint8 trainId array of the image's size (H, W), or, when the mask is resized, of the output
                ``size`` already (the image alone is resized then; see :meth:`takes_mask_at_size`).

        Returns:
            ``(image, mask)``: float32 tensor (3, h, w) and int64 tensor (h, w) (native (H, W) when
            ``resize_mask`` is ``False``).
        """
        if self.augments:
            self._reseed()
        if self._after_resize is not None and mask.shape[:2] != image.shape[:2]:
            if not self.takes_mask_at_size(mask.shape, image.shape):
                raise ValueError(
                    f"mask of {mask.shape[1]}x{mask.shape[0]} is neither of the image's size "
                    f"{image.shape[1]}x{image.shape[0]} nor of the output size {self.size[0]}x{self.size[1]}"
                )
            width, height = self.size  # type: ignore[misc]
            resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
            out = self._after_resize(image=resized, mask=mask)
            image_out, mask_out = out["image"], out["mask"]
        elif self.resize_mask:
            out = self._joint(image=image, mask=mask)
            image_out, mask_out = out["image"], out["mask"]
        else:
            resized = self._image_only(image=image)["image"]
            image_out, mask_out = self._joint(image=resized)["image"], mask
        if self.normalization == "caffe":
            image_out = image_out[:, :, ::-1]
        image_t = torch.from_numpy(np.ascontiguousarray(image_out.transpose(2, 0, 1), dtype=np.float32))
        mask_t = torch.from_numpy(np.ascontiguousarray(mask_out, dtype=np.int64))
        return image_t, mask_t

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, normalization={self.normalization!r}, "
            f"random_scale={self.random_scale}, crop_size={self.crop_size}, hflip={self.hflip}, "
            f"resize_mask={self.resize_mask})"
        )


def denormalize(image: torch.Tensor, normalization: Normalization = "imagenet") -> np.ndarray:
    """Invert the normalisation of one image tensor for display.

    Args:
        image: float tensor (3, H, W) as produced by :class:`SegmentationTransform`.
        normalization: the convention it was normalised with.

    Returns:
        uint8 RGB array (H, W, 3).
    """
    array = image.detach().cpu().float().numpy().transpose(1, 2, 0)
    if normalization == "imagenet":
        array = (array * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)) * 255.0
    elif normalization == "caffe":
        array = (array + np.asarray(CAFFE_MEAN_BGR))[:, :, ::-1]
    else:
        raise ValueError(f"normalization must be 'imagenet' or 'caffe', got {normalization!r}")
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)
