"""Predicting on one's own images: any folder tree of PNG/JPEG files, relative paths kept, each image's own size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uda_sam.data import GTA5, Cityscapes, SegmentationTransform
from uda_sam.data.image_folder import ImageFolder
from uda_sam.datamodules import UDADataModule


def write_image(path: Path, width: int, height: int, seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three images of three sizes at three depths, and files the reader must skip."""
    root = tmp_path / "frames"
    write_image(root / "drive_01" / "night" / "frame_000001.png", 40, 20, 0)
    write_image(root / "drive_02" / "frame_000002.jpg", 30, 50, 1)
    write_image(root / "cover.JPEG", 24, 24, 2)
    write_image(root / ".thumbnails" / "cover.png", 8, 8, 3)
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_tree_with_images_of_different_sizes(folder: Path) -> None:
    options = {
        "source": GTA5("unused"),
        "target": Cityscapes("unused"),
        "num_workers": 0,
        "val_batch_size": 2,
    }
    datamodule = UDADataModule(**options, target_size=(32, 16), predict_root=str(folder))
    datamodule.setup("predict")
    batches = list(datamodule.predict_dataloader())  # one image per batch: their sizes differ
    names = [name for batch in batches for name in batch["name"]]
    assert names == ["cover", "drive_01/night/frame_000001", "drive_02/frame_000002"]
    for batch, size in zip(batches, [(24, 24), (20, 40), (50, 30)], strict=True):
        assert batch["image"].shape == (1, 3, 16, 32)  # the network's input size
        assert batch["mask"].shape == (1, *size)  # the image's own size: predictions are upsampled to it
        assert bool((batch["mask"] == 255).all())


def test_caffe_normalisation_and_native_size(folder: Path) -> None:
    dataset = ImageFolder(folder, transform=SegmentationTransform(normalization="caffe", resize_mask=False))
    assert dataset[dataset.names.index("drive_02/frame_000002")]["image"].shape == (3, 50, 30)
    sample = dataset[dataset.names.index("drive_01/night/frame_000001")]
    pixels = np.asarray(Image.open(folder / "drive_01" / "night" / "frame_000001.png"), dtype=np.float32)
    assert sample["image"].shape == (3, 20, 40)
    blue = torch.from_numpy(pixels[..., 2]) - 104.00698793
    torch.testing.assert_close(sample["image"][0], blue, rtol=0, atol=1e-3)  # BGR, 0-255, mean subtracted


def test_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ImageFolder root .*nowhere does not exist"):
        len(ImageFolder(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        len(ImageFolder(tmp_path / "empty"))
    write_image(tmp_path / "clash" / "a.png", 4, 4, 0)
    write_image(tmp_path / "clash" / "a.jpg", 4, 4, 0)
    with pytest.raises(ValueError, match=r"differ only in their suffix.*a\.jpg, a\.png"):
        len(ImageFolder(tmp_path / "clash"))
