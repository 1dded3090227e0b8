"""A 2-process DDP fit (gloo, CPU) killed by SIGKILL and resumed ends with the weights of an uninterrupted one.

The processes are forked (``ddp_fork``): they start in milliseconds instead of importing everything anew. That 2
processes make the pseudo labels 1 process makes is ``test_two_process_ddp_equals_one_process`` in
``test_pseudo_label_generation.py``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from PIL import Image
from torch.multiprocessing import ProcessExitedException

from uda_sam.callbacks import LastStepCheckpoint, PseudoLabelRegeneration
from uda_sam.tasks import SelfTraining

try:
    from tests.conftest import TinySegNet
except ImportError:  # tests/ itself is on sys.path (no tests/__init__.py)
    from conftest import TinySegNet  # type: ignore[no-redef]

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread while processes are forked: a child of a process whose OpenMP pool ran with more threads
    hangs at its first parallel operation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class OneThreadPerRank(Callback):
    """Each forked rank sets its torch threads in its main thread first (Lightning does so only when
    ``OMP_NUM_THREADS`` is unset): threads that start torch's thread pool at once after a fork fail."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        torch.set_num_threads(1)


class KillAt(Callback):
    """Every process sends itself SIGKILL before the step after ``step`` (whose checkpoint was written)."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def read_labels(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.array(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def fit(run: Path, teacher: Path, datamodule: Any, kill_at: int | None = None) -> None:
    """Two generations of 4 steps on 2 processes (2 steps an epoch), resumed from last.ckpt when there is one."""
    last = run / "checkpoints" / "last.ckpt"
    callbacks = [
        PseudoLabelRegeneration(
            teacher_checkpoint=str(teacher),
            output_dir=str(run / "labels"),
            num_generations=2,
            steps_per_generation=4,
            num_workers=0,
        ),
        LastStepCheckpoint(dirpath=str(run / "checkpoints"), every_n_train_steps=1),
        KillAt(kill_at),
        OneThreadPerRank(),
    ]
    torch.manual_seed(0)
    task = SelfTraining(network=TinySegNet(), lr=1e-2)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_steps=8,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(run),
        callbacks=callbacks,
    )
    trainer.fit(task, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_two_process_fit_killed_mid_generation_resumes_exactly(
    tmp_path: Path, toy_datamodule: Callable
) -> None:
    """Killed mid-epoch in generation 1, after generation 2's labels were made, and mid-epoch in generation 2,
    with random scale, crop and flip on: the same weights and pseudo labels as an uninterrupted 2-process fit."""
    teacher = tmp_path / "teacher.ckpt"
    torch.manual_seed(5)
    state = TinySegNet().state_dict()
    torch.save({"state_dict": {f"network.{k}": v for k, v in state.items()}}, teacher)

    def datamodule() -> Any:
        return toy_datamodule(random_scale=(0.75, 1.5), crop_size=(48, 24), hflip=True)

    fit(tmp_path / "a", teacher, datamodule())
    run = tmp_path / "b"
    for step in (3, 4, 7):
        with pytest.raises(ProcessExitedException, match="SIGKILL"):
            fit(run, teacher, datamodule(), kill_at=step)
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step
    fit(run, teacher, datamodule())

    weights = [torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (tmp_path / "a", run)]
    assert [w["global_step"] for w in weights] == [8, 8]
    uninterrupted, resumed = (w["state_dict"] for w in weights)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    for generation in ("generation_1", "generation_2"):
        a, b = (read_labels(r / "labels" / generation) for r in (tmp_path / "a", run))
        assert len(a) == 4 and a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert sorted(p.name for p in (run / "labels").iterdir()) == ["generation_1", "generation_2"]
