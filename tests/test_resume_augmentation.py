"""Random scale, crop and flip resume exactly: each draw's augmentation depends on (seed, epoch, position) only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from uda_sam.callbacks import LastStepCheckpoint
from uda_sam.data.transforms import augmentation_seed
from uda_sam.tasks import SelfTraining

try:
    from tests.conftest import TinySegNet
except ImportError:  # tests/ itself is on sys.path (no tests/__init__.py)
    from conftest import TinySegNet  # type: ignore[no-redef]

#: All three augmentations, on the session toy set (target 64x32, source 72x40).
AUGMENTED: dict[str, Any] = {"random_scale": (0.75, 1.5), "crop_size": (48, 24), "hflip": True}


def source_batches(datamodule: Any, loader_state: dict[str, int] | None = None) -> list[torch.Tensor]:
    """The source images of one epoch of the datamodule's train loader (after ``loader_state``, if given)."""
    datamodule.setup("fit")
    loader = datamodule.train_dataloader().iterables["source"]
    if loader_state is not None:
        loader.load_state_dict(loader_state)
    return [batch["image"] for batch in loader]


def test_a_draw_is_augmented_alike_whoever_loads_it(toy_datamodule: Callable) -> None:
    """The same images from the main process, from two workers, and after a resume mid-epoch; an image drawn
    twice in an epoch is augmented twice, differently."""

    def make(**kwargs: Any) -> Any:
        datamodule = toy_datamodule(**AUGMENTED, steps_per_epoch=8, **kwargs)
        datamodule.sampler_seed = 3  # as a checkpoint restores it
        return datamodule

    main = source_batches(make())
    assert len(main) == 8 and main[0].shape == (1, 3, 24, 48)
    workers = source_batches(make(num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(main, workers, strict=True))
    resumed = source_batches(make(num_workers=2), {"epoch": 0, "batches": 5})
    assert len(resumed) == 3 and all(torch.equal(a, b) for a, b in zip(main[5:], resumed, strict=True))
    # 4 source images, 8 draws: every image twice, never augmented twice alike.
    assert len({tuple(image.flatten()[:64].tolist()) for image in main}) == 8


def test_augmentation_seed_decides_the_augmentation(toy_datamodule: Callable) -> None:
    datamodule = toy_datamodule(**AUGMENTED)
    datamodule.setup("fit")
    dataset = datamodule.target_train

    def load(seed: int | None) -> torch.Tensor:
        with augmentation_seed(seed):
            return dataset[0]["image"]

    assert torch.equal(load(11), load(11))
    assert len({tuple(load(seed).flatten().tolist()) for seed in range(6)}) > 1


class Killed(Exception):
    """Stands for the run being killed."""


class KillAt(Callback):
    """Raises before the step after ``step``, whose checkpoint was written."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed after step {self.step}")


def fit(run: Path, datamodule: Any, kill_at: int | None = None) -> SelfTraining:
    """A target-supervised fit of 6 steps, resumed from ``run``'s last.ckpt when there is one."""
    last = run / "checkpoints" / "last.ckpt"
    torch.manual_seed(0)
    task = SelfTraining(network=TinySegNet(), lr=1e-2)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(run),
        callbacks=[
            LastStepCheckpoint(dirpath=str(run / "checkpoints"), every_n_train_steps=1),
            KillAt(kill_at),
        ],
    )
    trainer.fit(task, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
    return task


def test_killed_fit_with_random_scale_crop_and_flip_resumes_exactly(
    tmp_path: Path, toy_datamodule: Callable
) -> None:
    """Killed mid-epoch and at an epoch's end, resumed with loader workers the first run did not have: the weights
    equal those of an uninterrupted run, bit for bit (both domains' augmented images reach the loss)."""

    def datamodule(num_workers: int = 0) -> Any:
        return toy_datamodule(
            **AUGMENTED,
            target_labels="gt",
            steps_per_epoch=2,
            num_workers=num_workers,
            persistent_workers=False,
        )

    uninterrupted = fit(tmp_path / "a", datamodule()).network.state_dict()
    run = tmp_path / "b"
    for step, workers in ((3, 0), (4, 2)):
        with pytest.raises(Killed):
            fit(run, datamodule(workers), kill_at=step)
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step
    resumed = fit(run, datamodule(num_workers=2)).network.state_dict()
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
