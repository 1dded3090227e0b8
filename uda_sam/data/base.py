"""Shared machinery of the dataset readers: layout checks, list files, and the sample pipeline."""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from uda_sam.data.io import image_size
from uda_sam.data.transforms import Normalization, SegmentationTransform


@dataclass(frozen=True)
class SampleFiles:
    """The files behind one sample.

    Attributes:
        name: relative name without suffix (e.g. ``"00001"`` or ``"aachen/aachen_000000_000019"``).
        image: image file.
        label: label file, or ``None`` when the sample has no label (mask all 255).
    """

    name: str
    image: Path
    label: Path | None


def require_dir(path: Path, what: str, layout: str) -> Path:
    """Return ``path`` if it is a directory, else raise FileNotFoundError naming it and the expected layout."""
    if not path.is_dir():
        state = "is not a directory" if path.exists() else "does not exist"
        raise FileNotFoundError(f"{what} {path} {state}; expected layout: {layout}")
    return path


def summarize(names: Sequence[str], limit: int = 5) -> str:
    """``"a, b, c, ... (and N more)"`` for error messages."""
    shown = ", ".join(names[:limit])
    return shown + (f" ... (and {len(names) - limit} more)" if len(names) > limit else "")


def read_list_file(list_file: str | Path, strip_suffixes: Sequence[str]) -> list[str]:
    """Read a split list (one relative file name per line, ADVENT/BDL style) into sample names.

    Blank lines and lines starting with ``#`` are skipped; the first matching suffix of ``strip_suffixes`` is
    removed from each entry (so ``"00001.png"`` and ``"00001"`` both give ``"00001"``).

    Raises:
        FileNotFoundError: if the list file does not exist.
        ValueError: if it lists no names or the same name twice.
    """
    path = Path(list_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"list_file {path} does not exist; expected a text file with one image name per line"
        )
    names = []
    for line in path.read_text().splitlines():
        entry = line.strip().replace("\\", "/")
        if not entry or entry.startswith("#"):
            continue
        for suffix in strip_suffixes:
            if entry.endswith(suffix):
                entry = entry[: -len(suffix)]
                break
        names.append(entry)
    if not names:
        raise ValueError(f"list_file {path} lists no images; expected one image name per line")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"list_file {path} lists some names more than once: {summarize(duplicates)}")
    return names


def select_names(
    images: dict[str, Path],
    image_dir: Path,
    list_file: str | Path | None,
    suffixes: Sequence[str],
    limit: int | None,
    empty_message: str,
) -> list[str]:
    """The sample names to use: those of ``list_file`` (all must exist), else every image sorted; then ``limit``.

    Raises:
        FileNotFoundError: if listed images are missing, or there is no image at all (``empty_message``).
    """
    if list_file is not None:
        names = read_list_file(list_file, suffixes)
        absent = [n for n in names if n not in images]
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} of {len(names)} images named in list_file {list_file} are missing from "
                f"{image_dir}: {summarize(absent)}"
            )
    else:
        names = sorted(images)
    if not names:
        raise FileNotFoundError(empty_message)
    return names[: check_limit(limit)]


def paired_samples(
    names: Sequence[str],
    images: dict[str, Path],
    label_dir: Path,
    what: str,
    layout: str,
    label_suffix: str = ".png",
    label_kind: str = "label file",
) -> list[SampleFiles]:
    """One :class:`SampleFiles` per name with its label ``label_dir/{name}{label_suffix}``, which must exist.

    Raises:
        FileNotFoundError: naming how many (and which) images lack their label file (``label_kind``).
    """
    samples = [SampleFiles(n, images[n], label_dir / f"{n}{label_suffix}") for n in names]
    unlabeled = [s.name for s in samples if not s.label.is_file()]  # type: ignore[union-attr]
    if unlabeled:
        raise FileNotFoundError(
            f"{len(unlabeled)} of {len(names)} {what} images have no {label_kind} in {label_dir}: "
            f"{summarize(unlabeled)}; expected layout: {layout}"
        )
    return samples


def _same_aspect(label: tuple[int, int], image: tuple[int, int]) -> bool:
    # Within the rounding of a resize: w / h == W / H up to about one pixel.
    return abs(label[0] * image[1] - label[1] * image[0]) < max(image)


def check_label_sizes(samples: Sequence[SampleFiles], what: str, scaled: bool = False) -> None:
    """Check, from the file headers only, that every label has its image's size (or aspect ratio, ``scaled``).

    A label of another size would either break the batch collation or be scored against a resized prediction;
    pseudo labels (``scaled=True``) may be stored at the training size. Files whose header cannot be read are
    left to the readers, which name them.

    Raises:
        ValueError: naming how many labels, and which, do not fit their images.
    """
    bad = []
    for sample in samples:
        if sample.label is None:
            continue
        label, image = image_size(sample.label), image_size(sample.image)
        if label is None or image is None or label == image or (scaled and _same_aspect(label, image)):
            continue
        bad.append(
            f"{sample.label} is {label[0]}x{label[1]}, its image {sample.image.name} {image[0]}x{image[1]}"
        )
    if bad:
        expected = "the aspect ratio of their image" if scaled else "the size of their image"
        raise ValueError(
            f"{len(bad)} of {len(samples)} {what} labels do not have {expected}: {summarize(bad, limit=3)}"
        )


def check_limit(limit: int | None, name: str = "limit") -> int | None:
    """Validate a count option named ``name``: ``None`` or a positive int."""
    if limit is not None and (not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"{name} must be a positive integer or None, got {limit!r}")
    return limit


_Reader = TypeVar("_Reader", bound="SegmentationDataset")


class SegmentationDataset(Dataset):
    """Base class of the readers: the samples of one dataset on disk, read through a :class:`SegmentationTransform`.

    A reader's constructor only records its arguments (each kept as the attribute of its name, so that
    :meth:`replace` can make a changed copy); the files are found, and their layout checked, on first use of
    :attr:`samples` (``len``, indexing, :attr:`names`). So a config can name a dataset that the command at hand
    never reads (e.g. the source domain of ``uda-sam predict``). Subclasses implement :meth:`find_samples` and
    :meth:`load`, which returns the raw RGB image and the uint8 trainId mask. ``__getitem__`` applies the
    transform and returns ``{"image": float32 (3, H, W), "mask": int64 (H, W), "name": str}``.

    Args:
        transform: The resize, augmentation and normalisation of every sample (the datamodule builds it);
            ``None``: native size, ImageNet normalisation, no augmentation.
    """

    def __init__(self, transform: SegmentationTransform | None = None) -> None:
        self.transform = transform if transform is not None else SegmentationTransform()

    @property
    def size(self) -> tuple[int, int] | None:
        """``(width, height)`` the images are resized to (``None``: native)."""
        return self.transform.size

    @property
    def normalization(self) -> Normalization:
        """The normalisation convention of the images."""
        return self.transform.normalization

    @cached_property
    def samples(self) -> list[SampleFiles]:
        """The samples in index order, found and checked on first use (see :meth:`find_samples`)."""
        return self.find_samples()

    def find_samples(self) -> list[SampleFiles]:
        """Find the dataset's files and check its layout.

        Raises:
            FileNotFoundError: naming the missing folder or files and the expected layout.
            ValueError: naming files that do not fit (e.g. labels not of their image's size).
        """
        raise NotImplementedError

    def replace(self: _Reader, **changes: Any) -> _Reader:
        """A reader of the same kind and arguments but for ``changes`` (e.g. another ``transform`` or ``split``)."""
        parameters = inspect.signature(type(self)).parameters
        unknown = sorted(set(changes) - set(parameters))
        if unknown:
            raise TypeError(f"{type(self).__name__} takes no argument {', '.join(unknown)}")
        return type(self)(**{name: getattr(self, name) for name in parameters} | changes)

    def as_config(self) -> dict[str, Any]:
        """The reader as a config entry, ``{"class_path": ..., "init_args": ...}`` in plain values (no transform)."""
        init_args = {}
        for name in inspect.signature(type(self)).parameters:
            value = getattr(self, name)
            if name == "transform":
                continue  # the datamodule's to set
            init_args[name] = str(value) if isinstance(value, Path) else value
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": init_args}

    @property
    def names(self) -> list[str]:
        """Sample names in index order."""
        return [s.name for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw sample: RGB uint8 image (H, W, 3) and uint8 trainId mask with 255 ignore."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        image, mask = self.load(index)
        if self.transform.resize_mask and not self.transform.takes_mask_at_size(mask.shape, image.shape):
            # A label of another size than the image and the training size: to the image grid (nearest) first.
            # Pseudo labels stored at the training size skip this: the transform resizes the image alone.
            mask = cv2.resize(mask, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
        image_t, mask_t = self.transform(image, mask)
        return {"image": image_t, "mask": mask_t, "name": self.samples[index].name}

    def __repr__(self) -> str:
        # From the arguments alone: no need to read the disk to show a reader.
        shown = ", ".join(f"{k}={v!r}" for k, v in self.as_config()["init_args"].items())
        return f"{type(self).__name__}({shown}, transform={self.transform!r})"
