"""The embedded toy domain pair: formats, determinism, class coverage, and the safe/idempotent writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uda_sam.data import GTA5, Cityscapes, make_toy_data
from uda_sam.data import toy as toy_module
from uda_sam.data.labels import LABEL_ID_TO_TRAIN_ID

SMALL = dict(num_source=3, num_target_train=4, num_val=2, num_test=2, size=(64, 32), source_size=(72, 40))


def test_layout_and_formats(tmp_path: Path) -> None:
    root = make_toy_data(tmp_path / "toy", **SMALL)
    assert root == tmp_path / "toy"
    assert sorted(p.name for p in (root / "gta5" / "images").iterdir()) == [
        "00001.png",
        "00002.png",
        "00003.png",
    ]
    label = Image.open(root / "gta5" / "labels" / "00002.png")
    assert label.mode == "P" and label.size == (72, 40)
    palette = np.asarray(label.getpalette()[: 3 * 256]).reshape(-1, 3)
    assert tuple(palette[7]) == (128, 64, 128)  # Cityscapes colours at the labelId indices
    assert Image.open(root / "gta5" / "images" / "00002.png").mode == "RGB"
    train = sorted(
        p.relative_to(root / "cityscapes" / "leftImg8bit" / "train").as_posix()
        for p in (root / "cityscapes" / "leftImg8bit" / "train").rglob("*.png")
    )
    assert train == [
        "arcadia/arcadia_000000_000019_leftImg8bit.png",
        "arcadia/arcadia_000001_000019_leftImg8bit.png",
        "brickton/brickton_000000_000019_leftImg8bit.png",
        "brickton/brickton_000001_000019_leftImg8bit.png",
    ]
    gt = Image.open(
        root / "cityscapes" / "gtFine" / "val" / "cobbleford" / "cobbleford_000000_000019_gtFine_labelIds.png"
    )
    assert gt.mode == "L" and gt.size == (64, 32)
    manifest = json.loads((root / "toy_manifest.json").read_text())
    assert manifest["parameters"]["size"] == [64, 32] and manifest["parameters"]["seed"] == 0

    # the package's own readers take the set as it is
    source = GTA5(root / "gta5")
    assert len(source) == 3 and source[0]["mask"].shape == (40, 72)
    val = Cityscapes(root / "cityscapes", "val")
    assert val.names == ["cobbleford/cobbleford_000000_000019", "dunmore/dunmore_000000_000019"]
    mask = val[0]["mask"].numpy()
    assert np.array_equal(mask, LABEL_ID_TO_TRAIN_ID[np.asarray(gt)])
    # a labelled test split of its own scenes and cities, for reporting on images nothing was chosen on
    test = Cityscapes(root / "cityscapes", "test", labels="gt")
    assert test.names == ["eastholm/eastholm_000000_000019", "fairhaven/fairhaven_000000_000019"]
    assert not np.array_equal(test[0]["image"].numpy(), val[0]["image"].numpy())
    gt_test = Image.open(
        root / "cityscapes" / "gtFine" / "test" / "eastholm" / "eastholm_000000_000019_gtFine_labelIds.png"
    )
    assert np.array_equal(test[0]["mask"].numpy(), LABEL_ID_TO_TRAIN_ID[np.asarray(gt_test)])
    assert (test[0]["mask"] != 255).any()
    assert not list(tmp_path.glob(".toy.*"))  # no temporary folder left behind


def test_scenes_cover_many_classes_in_both_domains() -> None:
    for domain, size in (("source", (288, 160)), ("target", (256, 128))):
        classes: set[int] = set()
        for i in range(8):
            image, label = toy_module.render_scene((0, 5, i), size, domain)
            assert image.shape == (size[1], size[0], 3) and image.dtype == np.uint8
            classes |= set(np.unique(LABEL_ID_TO_TRAIN_ID[label]).tolist())
        classes.discard(255)
        assert len(classes) >= 10, (domain, sorted(classes))
        assert {0, 1, 2, 5, 8, 10, 11, 13} <= classes


def test_domains_differ_in_style() -> None:
    source = np.stack([toy_module.render_scene((1, 0, i), (128, 64), "source")[0] for i in range(6)]).astype(
        float
    )
    target = np.stack([toy_module.render_scene((1, 0, i), (128, 64), "target")[0] for i in range(6)]).astype(
        float
    )

    # the game is flatter: smaller differences between neighbouring pixels inside regions
    def roughness(images: np.ndarray) -> float:
        return float(np.median(np.abs(np.diff(images, axis=2))))

    assert roughness(target) > roughness(source)
    _, hood = toy_module.render_scene((1, 0, 0), (128, 64), "target")
    assert (hood[-1] == toy_module.EGO).mean() > 0.5  # the ego vehicle's hood, ignored in evaluation
    with pytest.raises(ValueError, match="domain"):
        toy_module.render_scene(0, (64, 32), "cartoon")


def test_deterministic(tmp_path: Path) -> None:
    a = make_toy_data(tmp_path / "a", **SMALL)
    b = make_toy_data(tmp_path / "b", **SMALL)
    c = make_toy_data(tmp_path / "c", **{**SMALL, "seed": 1})
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_idempotent_and_refuses_foreign_folders(tmp_path: Path) -> None:
    root = make_toy_data(tmp_path / "toy", **SMALL)
    stamp = (root / "toy_manifest.json").stat().st_mtime_ns
    assert make_toy_data(root, **SMALL) == root
    assert (root / "toy_manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other parameters"):
        make_toy_data(root, **{**SMALL, "num_val": 3})

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="non-empty folder"):
        make_toy_data(tmp_path / "busy", **SMALL)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"

    (tmp_path / "empty").mkdir()
    assert (make_toy_data(tmp_path / "empty", **SMALL) / "toy_manifest.json").is_file()

    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        make_toy_data(tmp_path / "file", **SMALL)
    with pytest.raises(ValueError, match="num_source"):
        make_toy_data(tmp_path / "bad", num_source=0)
    with pytest.raises(ValueError, match="size"):
        make_toy_data(tmp_path / "bad", size=(16, 8))


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy_module, "_write_cityscapes", boom)
    with pytest.raises(KeyboardInterrupt):
        make_toy_data(tmp_path / "toy", **SMALL)
    assert list(tmp_path.iterdir()) == []
