"""Image and label file readers shared by the datasets.

Each reader either returns a well-formed array or raises ``ValueError`` naming the file, so a corrupt or truncated
download surfaces as a readable message instead of an OpenCV assertion deep inside a data-loader worker.
"""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from uda_sam.data.labels import SYNTHIA_MAX_ID

# Data-loader workers already parallelise; OpenCV's own thread pool would oversubscribe the cores.
cv2.setNumThreads(0)


def _read_bytes(path: Path) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as err:  # unreadable file (permissions, vanished since discovery)
        raise ValueError(f"cannot read file {path}: {err}") from err


def _decode(path: Path, flags: int, what: str) -> np.ndarray:
    data = _read_bytes(path)
    # imdecode (instead of imread) handles non-ASCII paths and reports failure as None instead of printing only.
    array = cv2.imdecode(data, flags) if data.size else None
    if array is None:
        raise ValueError(f"cannot decode {what} {path}: the file is empty, truncated or not an image")
    return array


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB.

    Args:
        path: PNG/JPEG file.

    Returns:
        uint8 array (H, W, 3), RGB channel order (alpha dropped, grey expanded).

    Raises:
        ValueError: if the file cannot be decoded (corrupt or truncated), naming the file.
    """
    path = Path(path)
    image = _decode(path, cv2.IMREAD_COLOR, "image")
    if image.dtype != np.uint8:  # 16-bit colour images are not used by any supported dataset
        raise ValueError(f"image {path} has dtype {image.dtype}; expected an 8-bit RGB image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_palette_indices(path: str | Path) -> np.ndarray:
    """Read the palette *indices* of a palette-mode PNG (GTA5 labels), not the colours they stand for.

    Single-channel 8-bit files (mode ``L``) are accepted too and read as they are.

    Args:
        path: palette (``P``) or greyscale (``L``) PNG.

    Returns:
        uint8 array (H, W).

    Raises:
        ValueError: if the file is corrupt/truncated or is neither a palette nor an 8-bit single-channel image.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise ValueError(
                    f"label {path} has PIL mode {img.mode!r}; expected a palette ('P') PNG whose indices are "
                    "Cityscapes labelIds (or an 8-bit single-channel 'L' PNG)"
                )
            img.load()
            return np.array(img, dtype=np.uint8)
    except ValueError:
        raise
    except (OSError, SyntaxError) as err:  # PIL raises these for truncated/corrupt files
        raise ValueError(f"cannot decode label {path}: the file is truncated or not a PNG ({err})") from err


def read_label_uint8(path: str | Path) -> np.ndarray:
    """Read a single-channel 8-bit label file (Cityscapes ``_labelIds.png``, pseudo labels).

    Args:
        path: 8-bit greyscale PNG.

    Returns:
        uint8 array (H, W).

    Raises:
        ValueError: if the file is corrupt or not an 8-bit single-channel image.
    """
    path = Path(path)
    label = _decode(path, cv2.IMREAD_UNCHANGED, "label")
    if label.ndim != 2 or label.dtype != np.uint8:
        shape = "x".join(map(str, label.shape))
        raise ValueError(
            f"label {path} is {label.dtype} with shape {shape}; expected a single-channel 8-bit PNG of ids"
        )
    return label


def read_synthia_label(path: str | Path) -> np.ndarray:
    """Read the class ids of a SYNTHIA-RAND-CITYSCAPES 16-bit label file.

    OpenCV returns the channels in BGR order; the class id is the first (R) channel of the file, i.e. index 2.

    Args:
        path: 16-bit, 3- or 4-channel PNG from ``GT/LABELS``.

    Returns:
        uint8 array (H, W) of SYNTHIA ids in 0..22.

    Raises:
        ValueError: if the file is corrupt, not 16-bit, not multi-channel, or holds ids outside 0..22.
    """
    path = Path(path)
    label = _decode(path, cv2.IMREAD_UNCHANGED, "SYNTHIA label")
    if label.dtype != np.uint16:
        raise ValueError(
            f"SYNTHIA label {path} has dtype {label.dtype}; expected a 16-bit PNG (class id in the R channel, "
            "instance id in G) as shipped in GT/LABELS"
        )
    if label.ndim != 3 or label.shape[2] < 3:
        raise ValueError(
            f"SYNTHIA label {path} has shape {label.shape}; expected 3 (or 4) channels with the class id in R"
        )
    ids = label[:, :, 2]
    top = int(ids.max())
    if top > SYNTHIA_MAX_ID:
        raise ValueError(
            f"SYNTHIA label {path} holds class id {top}; expected ids in 0..{SYNTHIA_MAX_ID} in the R channel "
            "(is this a GT/COLOR or Depth file?)"
        )
    return ids.astype(np.uint8)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_size(path: str | Path) -> tuple[int, int] | None:
    """``(width, height)`` of an image from its file header, without decoding the pixels.

    PNG headers (8- and 16-bit alike) are parsed directly; other formats through PIL.

    Returns:
        The size, or ``None`` when the header cannot be read (reading the pixels reports such a file).
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(24)
        if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
            width, height = struct.unpack(">II", head[16:24])
            return int(width), int(height)
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, struct.error):
        return None
