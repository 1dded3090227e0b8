"""GTA5, SYNTHIA and Cityscapes readers on fake trees written in the exact formats; every bad-input case."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from uda_sam.data import GTA5, Cityscapes, SegmentationTransform, Synthia, denormalize

try:
    from tests.data import fake_datasets as fake
except ImportError:  # tests/ itself is on sys.path (no tests/__init__.py)
    from data import fake_datasets as fake  # type: ignore[no-redef]


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)


# --------------------------------------------------------------------------------------------------- GTA5
def test_gta5_exact_train_ids(tmp_path: Path) -> None:
    expected = fake.write_fake_gta5(tmp_path, mismatched=None)
    ds = GTA5(tmp_path)
    assert len(ds) == 3 and ds.names == ["00001", "00002", "00003"]
    for i, name in enumerate(ds.names):
        sample = ds[i]
        assert sample["name"] == name
        assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 32, 64)
        assert sample["mask"].dtype == torch.int64
        assert np.array_equal(sample["mask"].numpy(), expected[name])
    assert {0, 1, 2, 13, 18, 255} <= set(np.unique(ds[0]["mask"].numpy()).tolist())


def test_gta5_resize_and_normalisation(tmp_path: Path) -> None:
    expected = fake.write_fake_gta5(tmp_path, mismatched=None)
    ds = GTA5(tmp_path, transform=SegmentationTransform(size=(32, 16)))
    sample = ds[1]
    assert sample["image"].shape == (3, 16, 32)
    assert np.array_equal(sample["mask"].numpy(), resize_nearest(expected["00002"], (32, 16)))
    native = GTA5(tmp_path)[1]["image"]
    original = cv2.cvtColor(cv2.imread(str(tmp_path / "images" / "00002.png")), cv2.COLOR_BGR2RGB)
    assert np.abs(denormalize(native).astype(int) - original.astype(int)).max() <= 1


def test_gta5_size_mismatch_resizes_image_and_warns(tmp_path: Path) -> None:
    expected = fake.write_fake_gta5(tmp_path, mismatched="00003")
    ds = GTA5(tmp_path)
    with pytest.warns(UserWarning, match=r"00003\.png.*80x40.*64x32"):
        sample = ds[2]
    assert sample["image"].shape == (3, 32, 64)
    assert np.array_equal(sample["mask"].numpy(), expected["00003"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[2]  # once per file
        ds[0]  # matching pairs never warn


def test_gta5_translated_image_root(tmp_path: Path) -> None:
    expected = fake.write_fake_gta5(tmp_path / "gta5", mismatched=None)
    for name in expected:  # translated images at half size, same names
        fake.write_rgb(tmp_path / "translated" / f"{name}.png", fake.fake_image(32, 16, 0))
    ds = GTA5(tmp_path / "gta5", image_root=tmp_path / "translated")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample = ds[0]
    assert sample["image"].shape == (3, 16, 32)
    assert np.array_equal(sample["mask"].numpy(), resize_nearest(expected["00001"], (32, 16)))


def test_gta5_list_file_and_limit(tmp_path: Path) -> None:
    fake.write_fake_gta5(tmp_path / "gta5", mismatched=None)
    (tmp_path / "list.txt").write_text("00003.png\n\n# comment\n00001.png\n")
    assert GTA5(tmp_path / "gta5", list_file=tmp_path / "list.txt").names == ["00003", "00001"]
    assert GTA5(tmp_path / "gta5", limit=2).names == ["00001", "00002"]
    (tmp_path / "bad.txt").write_text("00001.png\n00009.png\n")
    with pytest.raises(FileNotFoundError, match="00009"):
        len(GTA5(tmp_path / "gta5", list_file=tmp_path / "bad.txt"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        len(GTA5(tmp_path / "gta5", list_file=tmp_path / "missing.txt"))


def test_gta5_bad_layouts(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist.*images/NNNNN\.png"):
        len(GTA5(tmp_path / "nowhere"))
    (tmp_path / "a" / "labels").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"image folder .*a/images"):
        len(GTA5(tmp_path / "a"))
    (tmp_path / "b" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"label folder .*b/labels"):
        len(GTA5(tmp_path / "b"))
    (tmp_path / "a" / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        len(GTA5(tmp_path / "a"))


def test_gta5_missing_label(tmp_path: Path) -> None:
    fake.write_fake_gta5(tmp_path)
    (tmp_path / "labels" / "00002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 GTA5 images have no label file .*: 00002"):
        len(GTA5(tmp_path))


@pytest.mark.parametrize("damage", [fake.corrupt, fake.truncate])
@pytest.mark.parametrize("which", ["images", "labels"])
def test_gta5_corrupt_or_truncated_png(tmp_path: Path, damage, which: str) -> None:
    fake.write_fake_gta5(tmp_path)
    damage(tmp_path / which / "00002.png")
    ds = GTA5(tmp_path)
    ds[0]
    with pytest.raises(ValueError, match=rf"{which}/00002\.png"):
        ds[1]


def test_gta5_label_not_palette(tmp_path: Path) -> None:
    fake.write_fake_gta5(tmp_path)
    Image.new("RGB", (64, 32)).save(tmp_path / "labels" / "00001.png")
    with pytest.raises(ValueError, match=r"00001\.png has PIL mode 'RGB'"):
        GTA5(tmp_path)[0]


# ------------------------------------------------------------------------------------------------ SYNTHIA
def test_synthia_exact_train_ids(tmp_path: Path) -> None:
    expected = fake.write_fake_synthia(tmp_path)
    ds = Synthia(tmp_path)
    assert ds.names == ["0000000", "0000001"]
    for i, name in enumerate(ds.names):
        assert np.array_equal(ds[i]["mask"].numpy(), expected[name])
    values = set(np.unique(np.concatenate([m.ravel() for m in expected.values()])).tolist())
    assert values == {0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18, 255}
    assert Synthia(tmp_path, transform=SegmentationTransform(size=(32, 16)))[0]["mask"].shape == (16, 32)


def test_synthia_bad_layouts(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"SYNTHIA root .*does not exist.*GT/LABELS"):
        len(Synthia(tmp_path / "nowhere"))
    (tmp_path / "GT" / "LABELS").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"image folder .*RGB"):
        len(Synthia(tmp_path))
    (tmp_path / "RGB").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no PNG images"):
        len(Synthia(tmp_path))
    (tmp_path / "GT" / "LABELS").rmdir()
    with pytest.raises(FileNotFoundError, match=r"label folder .*GT/LABELS"):
        len(Synthia(tmp_path))


def test_synthia_missing_label(tmp_path: Path) -> None:
    fake.write_fake_synthia(tmp_path)
    (tmp_path / "GT" / "LABELS" / "0000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="0000001"):
        len(Synthia(tmp_path))


def test_synthia_label_not_16_bit(tmp_path: Path) -> None:
    fake.write_fake_synthia(tmp_path)
    cv2.imwrite(str(tmp_path / "GT" / "LABELS" / "0000000.png"), np.zeros((32, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"0000000\.png has dtype uint8; expected a 16-bit PNG"):
        Synthia(tmp_path)[0]


def test_synthia_label_single_channel(tmp_path: Path) -> None:
    fake.write_fake_synthia(tmp_path)
    cv2.imwrite(str(tmp_path / "GT" / "LABELS" / "0000000.png"), np.zeros((32, 64), np.uint16))
    with pytest.raises(ValueError, match="expected 3 .* channels"):
        Synthia(tmp_path)[0]


def test_synthia_ids_out_of_range(tmp_path: Path) -> None:
    fake.write_fake_synthia(tmp_path)
    label = np.zeros((32, 64, 3), np.uint16)
    label[5, 5, 2] = 23  # R channel (BGR index 2)
    cv2.imwrite(str(tmp_path / "GT" / "LABELS" / "0000001.png"), label)
    ds = Synthia(tmp_path)
    ds[0]
    with pytest.raises(ValueError, match=r"0000001\.png holds class id 23; expected ids in 0\.\.22"):
        ds[1]


@pytest.mark.parametrize("damage", [fake.corrupt, fake.truncate])
def test_synthia_corrupt_label(tmp_path: Path, damage) -> None:
    fake.write_fake_synthia(tmp_path)
    damage(tmp_path / "GT" / "LABELS" / "0000000.png")
    with pytest.raises(ValueError, match=r"LABELS/0000000\.png"):
        Synthia(tmp_path)[0]


# --------------------------------------------------------------------------------------------- Cityscapes
def test_cityscapes_exact_train_ids_and_names(tmp_path: Path) -> None:
    expected = fake.write_fake_cityscapes(tmp_path)
    train = Cityscapes(tmp_path, "train")
    assert (
        train.names
        == sorted(expected["train"])
        == ["aachen/aachen_000000_000019", "aachen/aachen_000002_000019", "bochum/bochum_000001_000019"]
    )
    for i, name in enumerate(train.names):
        assert np.array_equal(train[i]["mask"].numpy(), expected["train"][name])
    val = Cityscapes(tmp_path, "val", transform=SegmentationTransform(size=(32, 16)))
    name = val.names[1]
    assert np.array_equal(val[1]["mask"].numpy(), resize_nearest(expected["val"][name], (32, 16)))


def test_cityscapes_full_size_labels(tmp_path: Path) -> None:
    expected = fake.write_fake_cityscapes(tmp_path)
    val = Cityscapes(tmp_path, "val", transform=SegmentationTransform(size=(32, 16), resize_mask=False))
    sample = val[0]
    assert sample["image"].shape == (3, 16, 32) and sample["mask"].shape == (32, 64)
    assert np.array_equal(sample["mask"].numpy(), expected["val"][val.names[0]])
    with pytest.raises(ValueError, match="label_size='full'"):
        SegmentationTransform(resize_mask=False, hflip=True)


def test_cityscapes_test_split_and_label_modes(tmp_path: Path) -> None:
    fake.write_fake_cityscapes(tmp_path)
    test = Cityscapes(tmp_path, "test", transform=SegmentationTransform(size=(32, 16)))
    assert (test[0]["mask"] == 255).all() and test[0]["mask"].shape == (16, 32)
    unlabeled = Cityscapes(tmp_path, "train", labels="none")
    assert all(s.label is None for s in unlabeled.samples) and (unlabeled[0]["mask"] == 255).all()
    (tmp_path / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 .* no label file .*aachen_000000_000019"):
        len(Cityscapes(tmp_path, "train"))
    optional = Cityscapes(tmp_path, "train", labels="optional")
    assert (optional[0]["mask"] == 255).all() and (optional[1]["mask"] != 255).any()


def test_cityscapes_bad_layouts(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Cityscapes root .*does not exist.*leftImg8bit"):
        len(Cityscapes(tmp_path / "nowhere"))
    (tmp_path / "gtFine" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"image folder .*leftImg8bit .*expected layout"):
        len(Cityscapes(tmp_path))
    (tmp_path / "leftImg8bit" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no images"):
        len(Cityscapes(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"val image folder .*leftImg8bit/val"):
        len(Cityscapes(tmp_path, "val"))
    fake.write_fake_cityscapes(tmp_path / "cs", {"val": 1})
    for path in sorted((tmp_path / "cs" / "gtFine").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    with pytest.raises(FileNotFoundError, match=r"label folder .*gtFine"):
        len(Cityscapes(tmp_path / "cs", "val"))
    assert len(Cityscapes(tmp_path / "cs", "val", labels="none")) == 1
    with pytest.raises(ValueError, match="split"):
        len(Cityscapes(tmp_path / "cs", "validation"))  # type: ignore[arg-type]


def test_cityscapes_list_file(tmp_path: Path) -> None:
    fake.write_fake_cityscapes(tmp_path / "cs")
    (tmp_path / "list.txt").write_text(
        "bochum/bochum_000001_000019_leftImg8bit.png\naachen/aachen_000000_000019\n"
    )
    ds = Cityscapes(tmp_path / "cs", list_file=tmp_path / "list.txt")
    assert ds.names == ["bochum/bochum_000001_000019", "aachen/aachen_000000_000019"]


def test_cityscapes_labels_of_another_size_are_named(tmp_path: Path) -> None:
    """A val label of the wrong size would break the collate (or, one image a batch, be scored resized)."""
    fake.write_fake_cityscapes(tmp_path / "cs")
    label = tmp_path / "cs" / "gtFine" / "val" / "frankfurt" / "frankfurt_000001_000019_gtFine_labelIds.png"
    Image.fromarray(np.full((16, 32), 7, np.uint8), mode="L").save(label)
    for label_size in ("full", "resized"):
        with pytest.raises(
            ValueError,
            match=rf"1 of 2 Cityscapes val gtFine labels .*{label} is 32x16, its image "
            r"frankfurt_000001_000019_leftImg8bit\.png 64x32",
        ):
            transform = SegmentationTransform(size=(32, 16), resize_mask=label_size == "resized")
            len(Cityscapes(tmp_path / "cs", "val", transform=transform))
    assert len(Cityscapes(tmp_path / "cs", "val", labels="none")) == 2

    # Pseudo labels may be stored at the training size, not at another aspect ratio.
    names = Cityscapes(tmp_path / "cs", labels="none").names
    fake.write_pseudo_labels(tmp_path / "pl", names, size=(32, 16))
    Image.fromarray(np.zeros((16, 16), np.uint8), mode="L").save(tmp_path / "pl" / f"{names[1]}.png")
    with pytest.raises(
        ValueError, match=rf"pseudo-label labels do not have the aspect ratio .*{names[1]}\.png is 16x16"
    ):
        len(Cityscapes(tmp_path / "cs", pseudo_label_root=tmp_path / "pl"))


def test_synthia_label_of_another_size_is_named(tmp_path: Path) -> None:
    fake.write_fake_synthia(tmp_path, num_images=2)
    fake.write_rgb(tmp_path / "RGB" / "0000001.png", fake.fake_image(32, 16, seed=0))
    with pytest.raises(
        ValueError, match=r"1 of 2 SYNTHIA labels .*0000001\.png is 64x32, its image 0000001\.png 32x16"
    ):
        len(Synthia(tmp_path))


@pytest.mark.parametrize("damage", [fake.corrupt, fake.truncate])
def test_cityscapes_corrupt_image(tmp_path: Path, damage) -> None:
    fake.write_fake_cityscapes(tmp_path)
    damage(tmp_path / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000001_000019_leftImg8bit.png")
    ds = Cityscapes(tmp_path, "val")
    with pytest.raises(ValueError, match=r"frankfurt_000001_000019_leftImg8bit\.png"):
        ds[1]


def test_cityscapes_pseudo_labels(tmp_path: Path) -> None:
    fake.write_fake_cityscapes(tmp_path / "cs")
    names = Cityscapes(tmp_path / "cs", labels="none").names
    pseudo = fake.write_pseudo_labels(tmp_path / "pl", names, size=(32, 16))
    ds = Cityscapes(
        tmp_path / "cs", pseudo_label_root=tmp_path / "pl", transform=SegmentationTransform(size=(32, 16))
    )
    for i, name in enumerate(names):
        assert np.array_equal(ds[i]["mask"].numpy(), pseudo[name])
    # pseudo labels at the training size are brought to a larger image size by nearest neighbour
    native = Cityscapes(tmp_path / "cs", pseudo_label_root=tmp_path / "pl")
    assert np.array_equal(native[0]["mask"].numpy(), np.kron(pseudo[names[0]], np.ones((2, 2), np.uint8)))


def test_cityscapes_pseudo_labels_missing_or_invalid(tmp_path: Path) -> None:
    fake.write_fake_cityscapes(tmp_path / "cs")
    names = Cityscapes(tmp_path / "cs", labels="none").names
    fake.write_pseudo_labels(tmp_path / "pl", names[:1], size=(32, 16))
    with pytest.raises(FileNotFoundError, match=r"2 of 3 .*no pseudo-label file .*aachen_000002_000019"):
        len(Cityscapes(tmp_path / "cs", pseudo_label_root=tmp_path / "pl"))
    with pytest.raises(FileNotFoundError, match="pseudo_label_root .*does not exist"):
        len(Cityscapes(tmp_path / "cs", pseudo_label_root=tmp_path / "absent"))
    fake.write_pseudo_labels(tmp_path / "pl", names, size=(32, 16))
    Image.fromarray(np.full((16, 32), 19, np.uint8), mode="L").save(tmp_path / "pl" / f"{names[2]}.png")
    ds = Cityscapes(tmp_path / "cs", pseudo_label_root=tmp_path / "pl")
    with pytest.raises(ValueError, match=r"bochum_000001_000019\.png holds value 19"):
        ds[2]


# ---------------------------------------------------------------------------------------------- transforms
def test_transform_caffe_bgr_mean() -> None:
    image = np.zeros((4, 6, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 200, 100, 50  # R, G, B
    out, mask = SegmentationTransform(size=None, normalization="caffe")(image, np.zeros((4, 6), np.uint8))
    assert torch.allclose(
        out[:, 0, 0], torch.tensor([50 - 104.00698793, 100 - 116.66876762, 200 - 122.67891434])
    )
    assert mask.dtype == torch.int64
    assert np.array_equal(denormalize(out, "caffe"), image)


def test_transform_crop_pads_mask_with_ignore_and_flip_is_joint() -> None:
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 19, (8, 12)).astype(np.uint8)
    image = np.repeat(mask[:, :, None] * 10, 3, axis=2).astype(np.uint8)  # the mask, readable from the image
    transform = SegmentationTransform(size=None, crop_size=(16, 10), hflip=True, random_scale=(1.0, 1.0))
    for _ in range(6):
        out, out_mask = transform(image, mask)
        assert out.shape == (3, 10, 16) and out_mask.shape == (10, 16)
        pixels = denormalize(out)[..., 0].astype(int)
        valid = out_mask != 255
        assert valid.sum() == 8 * 12
        assert np.array_equal(pixels[valid.numpy()] // 10, out_mask[valid].numpy())


def test_transform_random_scale_range() -> None:
    transform = SegmentationTransform(size=(40, 20), random_scale=(0.5, 2.0))
    shapes = {
        transform(np.zeros((20, 40, 3), np.uint8), np.zeros((20, 40), np.uint8))[1].shape for _ in range(8)
    }
    assert all(10 <= h <= 40 for h, _ in shapes) and len(shapes) > 1
    with pytest.raises(ValueError, match="random_scale"):
        SegmentationTransform(random_scale=(2.0, 1.0))
    with pytest.raises(ValueError, match="crop_size"):
        SegmentationTransform(crop_size=(0, 5))
    with pytest.raises(ValueError, match="normalization"):
        SegmentationTransform(normalization="bgr")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "image_size", [(64, 32), (50, 27)]
)  # twice the training size, and not a multiple of it
def test_mask_at_the_training_size_is_taken_as_it_is(image_size: tuple[int, int]) -> None:
    """Pseudo labels stored at the training size: the image alone is resized, the mask is not resized at all."""
    rng = np.random.default_rng(0)
    width, height = image_size
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = rng.integers(0, 19, (16, 32), dtype=np.uint8)
    transform = SegmentationTransform(size=(32, 16))
    assert transform.takes_mask_at_size(mask.shape, image.shape)
    assert not transform.takes_mask_at_size((20, 40), image.shape)
    image_t, mask_t = transform(image, mask)
    assert np.array_equal(mask_t.numpy(), mask)
    # The image equals the one resized together with a mask of its own size.
    full_mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
    reference_image, _ = transform(image, full_mask)
    assert torch.equal(image_t, reference_image)
    with pytest.raises(ValueError, match="neither of the image's size"):
        transform(image, np.zeros((20, 40), dtype=np.uint8))
    # Augmented: the image and the mask keep moving together (a flip of both or of neither).
    flipping = SegmentationTransform(size=(32, 16), hflip=True)
    torch.manual_seed(1)
    for _ in range(6):
        image_t, mask_t = flipping(image, mask)
        plain, _ = transform(image, mask)
        flipped = torch.equal(image_t, plain.flip(-1))
        assert flipped or torch.equal(image_t, plain)
        assert np.array_equal(mask_t.numpy(), mask[:, ::-1] if flipped else mask)


# ------------------------------------------------------------------------------------------------ readers
def test_readers_find_their_files_on_first_use(tmp_path: Path) -> None:
    """A reader names a dataset without reading the disk; its files are found (and checked) when first used."""
    reader = GTA5(tmp_path / "gta5")  # nothing there yet
    assert repr(reader).startswith(f"GTA5(root='{tmp_path / 'gta5'}', image_root=None")
    with pytest.raises(FileNotFoundError, match="GTA5 root .*does not exist"):
        len(reader)
    fake.write_fake_gta5(tmp_path / "gta5", mismatched=None)
    assert len(GTA5(tmp_path / "gta5")) == 3


def test_replace_makes_a_reader_with_other_arguments(tmp_path: Path) -> None:
    fake.write_fake_cityscapes(tmp_path / "cs")
    train = Cityscapes(tmp_path / "cs", labels="none", limit=2)
    transform = SegmentationTransform(size=(32, 16), resize_mask=False)
    val = train.replace(split="val", labels="gt", limit=None, transform=transform)
    assert (val.split, val.labels, val.root, val.transform) == ("val", "gt", tmp_path / "cs", transform)
    assert val.names == ["frankfurt/frankfurt_000000_000019", "frankfurt/frankfurt_000001_000019"]
    assert val[0]["mask"].shape == (32, 64) and val.size == (32, 16) and val.normalization == "imagenet"
    assert (train.split, len(train)) == ("train", 2)  # unchanged
    with pytest.raises(TypeError, match="GTA5 takes no argument split"):
        GTA5(tmp_path).replace(split="val")
    assert GTA5(tmp_path / "gta5", limit=2).as_config() == {
        "class_path": "uda_sam.data.gta5.GTA5",
        "init_args": {"root": str(tmp_path / "gta5"), "image_root": None, "list_file": None, "limit": 2},
    }
