"""Predicting on one's own images: any folder tree of PNG/JPEG files, relative paths kept, each image's own size;
from a checkpoint alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_TOY_RUN, TOY_CONFIGS
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


# ----------------------------------------------------------------------------- predict from a checkpoint alone
TOY = TOY_CONFIGS
# The toy configs shrunk to the session toy set and two steps, without W&B.
SMALL = [*SMALL_TOY_RUN, "--trainer.logger=false"]
QUIET = ["--trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def toy_stages(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stages 0, 1 and 2 (Ours: pseudo labels and the stage-1 SAM's loss) of the toy method, two steps each,
    trained through the CLI in their own folder (the configs' relative paths: data/toy, runs/toy/...)."""
    from uda_sam.cli.entry_point import main

    work = tmp_path_factory.mktemp("stages")
    (work / "data").mkdir()
    (work / "data" / "toy").symlink_to(toy_root, target_is_directory=True)
    write_image(work / "frames" / "drive_a" / "0001.png", 50, 30, 4)
    write_image(work / "frames" / "0002.jpg", 70, 44, 5)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        for stage in ("no_pseudo", "sam_pretrain", "ours"):
            assert main(["fit", "--config", str(TOY / f"{stage}.yaml"), *SMALL]) == 0
    return work


def written_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


@pytest.mark.parametrize("stage", ["sam_pretrain", "ours"])
def test_predict_from_a_checkpoint_alone(toy_stages: Path, tmp_path: Path, stage: str) -> None:
    """`uda-sam predict --ckpt_path last.ckpt --data.predict_root DIR` writes what the full command writes, without
    the stage's config, its dataset roots, its network's initial weights (Ours starts from No Pseudo's) or its SAM
    file, and without warnings about them."""
    import warnings

    from uda_sam.cli.entry_point import main

    checkpoint = toy_stages / "runs" / "toy" / stage / "checkpoints" / "last.ckpt"
    frames = toy_stages / "frames"
    full = ["predict", "--config", str(TOY / f"{stage}.yaml"), "--ckpt_path", str(checkpoint), *SMALL]
    writer = [
        "--trainer.callbacks+=uda_sam.callbacks.PredictionWriter",
        f"--trainer.callbacks.output_dir={tmp_path / 'full'}",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(toy_stages)
        assert main([*full, f"--data.predict_root={frames}", *writer]) == 0
    expected = written_files(tmp_path / "full")
    assert sorted(expected) == [
        "color/0002_color.png",
        "color/drive_a/0001_color.png",
        "labelIds/0002_labelIds.png",
        "labelIds/drive_a/0001_labelIds.png",
    ]

    # Elsewhere (no data/, no runs/toy/no_pseudo for the network's `weights`), without the SAM file of stage 1.
    sam_file = toy_stages / "runs" / "toy" / "sam_pretrain" / "sam.pt"
    sam_file.rename(tmp_path / "sam.pt")
    (tmp_path / "elsewhere").mkdir()
    short = ["predict", "--ckpt_path", str(checkpoint), f"--data.predict_root={frames}", *QUIET]
    try:
        with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            patch.chdir(tmp_path / "elsewhere")
            assert main([*short, f"--trainer.default_root_dir={tmp_path / 'short'}"]) == 0
    finally:
        (tmp_path / "sam.pt").rename(sam_file)
    assert written_files(tmp_path / "short") == expected
    assert (tmp_path / "short" / "config.yaml").is_file()  # what the prediction ran with, beside its files
    assert not list((tmp_path / "elsewhere").iterdir())
    # Neither the SAM's attention nor the training callbacks whose states the checkpoint holds are reported.
    about = ("attention", "callbacks used to create the checkpoint")
    assert not [str(w.message) for w in caught if any(text in str(w.message) for text in about)]


def test_predict_from_a_checkpoint_alone_writes_into_predictions(toy_stages: Path, tmp_path: Path) -> None:
    """Without --trainer.default_root_dir the files go to predictions/; an own PredictionWriter is used instead."""
    from uda_sam.cli.entry_point import main

    checkpoint = toy_stages / "runs" / "toy" / "no_pseudo" / "checkpoints" / "last.ckpt"
    args = ["predict", "--ckpt_path", str(checkpoint), f"--data.predict_root={toy_stages / 'frames'}", *QUIET]
    writer = ["--trainer.callbacks+=uda_sam.callbacks.PredictionWriter", "--trainer.callbacks.train_ids=true"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert main(args) == 0
        own = ["--trainer.callbacks.output_dir=own", "--trainer.default_root_dir=own"]
        assert main([*args, *writer, *own]) == 0
    assert len(written_files(tmp_path / "predictions")) == 4
    assert len(written_files(tmp_path / "own")) == 6  # its trainId PNGs too: the only writer


def test_predict_from_a_foreign_checkpoint_says_to_pass_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from uda_sam.cli.entry_point import main

    foreign = tmp_path / "other_program.ckpt"
    torch.save({"state_dict": {"conv.weight": torch.zeros(2, 3, 1, 1)}}, foreign)
    assert main(["predict", "--ckpt_path", str(foreign), f"--data.predict_root={tmp_path}"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"uda-sam predict: error: --ckpt_path {foreign} lacks the task's class")
    assert f"pass the config it was trained with as well: --config CONFIG --ckpt_path {foreign}" in message
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    assert main(["predict", "--ckpt_path", str(tmp_path / "notes.ckpt")]) == 2
    assert f"--ckpt_path {tmp_path / 'notes.ckpt'} cannot be read as a checkpoint" in capsys.readouterr().err


def test_which_predict_commands_read_their_run_from_the_checkpoint(tmp_path: Path) -> None:
    from uda_sam.cli.checkpoint_config import checkpoint_to_predict_from

    (tmp_path / "trainer.yaml").write_text("trainer:\n  devices: 1\n")
    (tmp_path / "stage.yaml").write_text("model:\n  class_path: uda_sam.tasks.SelfTraining\n")
    trainer_only, stage = ["--config", str(tmp_path / "trainer.yaml")], ["-c", str(tmp_path / "stage.yaml")]
    assert checkpoint_to_predict_from(["predict", "--ckpt_path", "a.ckpt"]) == "a.ckpt"
    assert checkpoint_to_predict_from(["predict", *trainer_only, "--ckpt_path=a.ckpt"]) == "a.ckpt"
    assert (
        checkpoint_to_predict_from(["predict", "--ckpt_path", "a.ckpt", "--model.init_args.lr=1"]) == "a.ckpt"
    )
    assert checkpoint_to_predict_from(["predict", *stage, "--ckpt_path", "a.ckpt"]) is None
    assert checkpoint_to_predict_from(["predict", "--model=SelfTraining", "--ckpt_path", "a.ckpt"]) is None
    assert checkpoint_to_predict_from(["predict", "--data.predict_root", "frames"]) is None
    assert checkpoint_to_predict_from(["validate", "--ckpt_path", "a.ckpt"]) is None
