"""Write tiny fake GTA5, SYNTHIA and Cityscapes trees in their exact on-disk formats.

Each writer returns the expected trainId mask of every sample (keyed by sample name), computed here from the
tables of docs/DATASETS.md written out by hand, independently of ``uda_sam.data.labels``. Labels are 8x8-pixel blocks
of ids, so a 2x nearest downscale keeps every block. Run as a script to write all three under a folder::

    python tests/data/fake_datasets.py OUT_DIR
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# Cityscapes labelId -> trainId (docs/DATASETS.md); ids not listed -> 255.
LABEL_TO_TRAIN = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
# SYNTHIA id -> trainId (docs/DATASETS.md); ids not listed -> 255.
SYNTHIA_TO_TRAIN = {
    3: 0,
    4: 1,
    2: 2,
    21: 3,
    5: 4,
    7: 5,
    15: 6,
    9: 7,
    6: 8,
    1: 10,
    10: 11,
    17: 12,
    8: 13,
    19: 15,
    12: 17,
    11: 18,
}
# Ids drawn into fake labels: every class plus ignored ones (0 unlabeled, 1 ego vehicle, 4 static, 9, 14, 34, 255).
LABEL_IDS = (
    7,
    0,
    8,
    11,
    1,
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
    4,
    9,
    14,
    34,
    255,
)
SYNTHIA_IDS = tuple(range(23))
CS_CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",), "test": ("berlin",)}


def id_blocks(width: int, height: int, ids: Sequence[int], offset: int, block: int = 8) -> np.ndarray:
    """(height, width) uint16 map of ``block``-sized squares cycling through ``ids``."""
    rows, cols = np.mgrid[0:height, 0:width]
    index = (rows // block) * ((width + block - 1) // block) + cols // block + offset
    return np.asarray(ids, dtype=np.uint16)[index % len(ids)]


def to_train(ids: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = np.full(ids.shape, 255, np.uint8)
    for src, dst in table.items():
        out[ids == src] = dst
    return out


def fake_image(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth RGB uint8 image: a gradient plus seeded noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    base = np.stack(
        [cols * 255 // max(width - 1, 1), rows * 255 // max(height - 1, 1), (rows + cols) % 256], -1
    )
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def write_rgb(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def cityscapes_palette() -> list[int]:
    """A palette with a distinct colour at every index (the indices are what matters)."""
    return [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 173) % 256)]


def write_fake_gta5(
    root: str | Path, num_images: int = 3, size: tuple[int, int] = (64, 32), mismatched: str | None = "00003"
) -> dict[str, np.ndarray]:
    """Write ``root/images/NNNNN.png`` (RGB) and ``root/labels/NNNNN.png`` (palette PNG, indices = labelIds).

    The image of ``mismatched`` is written 1.25x larger than its label (the GTA5 size-mismatch defect).

    Returns:
        name -> expected trainId mask (label size).
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    width, height = size
    expected = {}
    for i in range(num_images):
        name = f"{i + 1:05d}"
        ids = id_blocks(width, height, LABEL_IDS, offset=i).astype(np.uint8)
        label = Image.fromarray(ids, mode="P")
        label.putpalette(cityscapes_palette())
        label.save(root / "labels" / f"{name}.png")
        img_w, img_h = (width * 5 // 4, height * 5 // 4) if name == mismatched else (width, height)
        write_rgb(root / "images" / f"{name}.png", fake_image(img_w, img_h, seed=i))
        expected[name] = to_train(ids, LABEL_TO_TRAIN)
    return expected


def write_fake_synthia(
    root: str | Path, num_images: int = 2, size: tuple[int, int] = (64, 32)
) -> dict[str, np.ndarray]:
    """Write ``root/RGB/NNNNNNN.png`` and 16-bit 3-channel ``root/GT/LABELS/NNNNNNN.png`` (class id in R).

    Returns:
        name -> expected trainId mask.
    """
    root = Path(root)
    (root / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
    width, height = size
    expected = {}
    for i in range(num_images):
        name = f"{i:07d}"
        classes = id_blocks(width, height, SYNTHIA_IDS, offset=3 * i)
        instances = id_blocks(width, height, (0, 300, 1000, 65535), offset=i)  # genuinely 16-bit values
        rgb16 = np.stack([classes, instances, np.zeros_like(classes)], -1)  # R, G, B
        assert cv2.imwrite(
            str(root / "GT" / "LABELS" / f"{name}.png"), rgb16[:, :, ::-1].copy()
        )  # cv2 wants BGR
        write_rgb(root / "RGB" / f"{name}.png", fake_image(width, height, seed=100 + i))
        expected[name] = to_train(classes, SYNTHIA_TO_TRAIN)
    return expected


def write_fake_cityscapes(
    root: str | Path, counts: dict[str, int] | None = None, size: tuple[int, int] = (64, 32)
) -> dict[str, dict[str, np.ndarray]]:
    """Write ``leftImg8bit/{split}/{city}/..._leftImg8bit.png`` and ``gtFine/{split}/{city}/..._gtFine_*`` files.

    Every split gets ``_gtFine_labelIds.png`` (uint8 'L'), ``_gtFine_color.png`` and ``_gtFine_instanceIds.png``
    (16-bit), as shipped (the test split's labels are placeholders of ids 0 and 255).

    Returns:
        split -> name ("city/city_seq_frame") -> expected trainId mask.
    """
    root = Path(root)
    counts = counts if counts is not None else {"train": 3, "val": 2, "test": 1}
    width, height = size
    expected: dict[str, dict[str, np.ndarray]] = {}
    for split, count in counts.items():
        expected[split] = {}
        for i in range(count):
            cities = CS_CITIES[split]
            city = cities[i % len(cities)]
            stem = f"{city}_{i:06d}_{19:06d}"
            write_rgb(
                root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                fake_image(width, height, 200 + i),
            )
            label_dir = root / "gtFine" / split / city
            label_dir.mkdir(parents=True, exist_ok=True)
            if split == "test":
                ids = np.where(id_blocks(width, height, (0, 255), offset=i) > 0, 255, 0).astype(np.uint8)
            else:
                ids = id_blocks(width, height, LABEL_IDS, offset=5 * i + len(split)).astype(np.uint8)
            Image.fromarray(ids, mode="L").save(label_dir / f"{stem}_gtFine_labelIds.png")
            Image.fromarray(ids * 3, mode="L").convert("RGB").save(label_dir / f"{stem}_gtFine_color.png")
            assert cv2.imwrite(
                str(label_dir / f"{stem}_gtFine_instanceIds.png"), ids.astype(np.uint16) * 1000
            )
            expected[split][f"{city}/{stem}"] = (
                np.full((height, width), 255, np.uint8) if split == "test" else to_train(ids, LABEL_TO_TRAIN)
            )
    return expected


def write_pseudo_labels(
    root: str | Path, names: Sequence[str], size: tuple[int, int], seed: int = 0
) -> dict[str, np.ndarray]:
    """Write ``root/{name}.png`` single-channel uint8 trainIds (with 255) for each name; returns them."""
    rng = np.random.default_rng(seed)
    width, height = size
    out = {}
    for name in names:
        values = np.asarray([*range(19), 255], np.uint8)[rng.integers(0, 20, (height // 8, width // 8))]
        mask = np.kron(values, np.ones((8, 8), np.uint8))
        path = Path(root) / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask, mode="L").save(path)
        out[name] = mask
    return out


def corrupt(path: str | Path) -> None:
    """Overwrite a file with bytes that are not an image."""
    Path(path).write_bytes(b"this is not a PNG file" * 10)


def truncate(path: str | Path) -> None:
    """Cut a file to half its length (a broken download)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "fake_data")
    write_fake_gta5(out / "gta5")
    write_fake_synthia(out / "synthia")
    write_fake_cityscapes(out / "cityscapes")
    print(f"wrote fake GTA5, SYNTHIA and Cityscapes trees under {out}")
