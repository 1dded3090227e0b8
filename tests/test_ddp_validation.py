"""Validation under DDP: 2 CPU processes (gloo) give exactly the single-process mIoU on the same weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import Callback, LightningModule, Trainer

from uda_sam.data import GTA5, Cityscapes
from uda_sam.data.toy import make_toy_data
from uda_sam.datamodules import UDADataModule
from uda_sam.tasks import SelfTraining


class WriteMetrics(Callback):
    """Rank 0 writes the validation metrics to a file (objects do not come back from ddp_spawn)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.path.write_text(json.dumps({"world_size": trainer.world_size, "metrics": metrics}))


@pytest.mark.slow
def test_two_process_validation_equals_one(tmp_path: Path, tiny_network: Callable) -> None:
    # 3 validation images on 2 processes: a padding DistributedSampler would evaluate one of them twice.
    root = make_toy_data(
        tmp_path / "toy", num_source=2, num_target_train=2, num_val=3, size=(64, 32), source_size=(72, 40)
    )
    network = tiny_network(seed=7)
    results: dict[int, Any] = {}
    for devices in (1, 2):
        out = tmp_path / f"metrics_{devices}.json"
        trainer = Trainer(
            accelerator="cpu",
            devices=devices,
            strategy="ddp_spawn" if devices == 2 else "auto",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[WriteMetrics(out)],
            default_root_dir=str(tmp_path),
        )
        datamodule = UDADataModule(
            source=GTA5(root / "gta5"),
            target=Cityscapes(root / "cityscapes"),
            source_size=(72, 40),
            target_size=(64, 32),
            num_workers=0,
            persistent_workers=False,
        )
        trainer.validate(SelfTraining(network=network), datamodule=datamodule)
        results[devices] = json.loads(out.read_text())
    assert [results[d]["world_size"] for d in (1, 2)] == [1, 2]
    one, two = results[1]["metrics"], results[2]["metrics"]
    assert one.keys() == two.keys() and "val/mIoU" in one
    for key in one:
        assert one[key] == pytest.approx(two[key], nan_ok=True, abs=1e-7), key
