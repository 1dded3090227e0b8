"""examples/mean_teacher: a method written outside uda-sam gains the self-attention loss through the callback."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import REPO_ROOT, TOY_SIZE, TOY_SOURCE_SIZE

from uda_sam import SelfAttentionLossCallback, SelfAttentionModule, save_sam

EXAMPLE = REPO_ROOT / "examples" / "mean_teacher"


def load_example_cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mean_teacher_train", EXAMPLE / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def example_args(toy_root: Path, out: Path, steps: int = 3) -> list[str]:
    return [
        "--config",
        str(EXAMPLE / "toy.yaml"),
        "--trainer.logger=false",
        f"--trainer.default_root_dir={out}",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--model.init_checkpoint=null",
        f"--data.source.root={toy_root / 'gta5'}",
        f"--data.target.root={toy_root / 'cityscapes'}",
        f"--data.source_size=[{TOY_SOURCE_SIZE[0]}, {TOY_SOURCE_SIZE[1]}]",
        f"--data.target_size=[{TOY_SIZE[0]}, {TOY_SIZE[1]}]",
        "--data.batch_size=2",  # the session toy set has 4 source images
    ]


@pytest.mark.slow
def test_mean_teacher_trains_with_the_sam_loss_from_the_shipped_configs(
    toy_root: Path, tmp_path: Path
) -> None:
    sam_file = save_sam(SelfAttentionModule(19), tmp_path / "sam.pt")
    frozen = {k: v.clone() for k, v in torch.load(sam_file, weights_only=True)["state_dict"].items()}
    args = example_args(toy_root, tmp_path / "run") + [
        "--config",
        str(EXAMPLE / "sam_loss.yaml"),
        f"--trainer.callbacks.init_args.sam={sam_file}",
    ]
    cli = load_example_cli().main(args=["fit", *args])
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, SelfAttentionLossCallback)]
    assert len(callbacks) == 1 and callbacks[0].loss.weight == 0.1
    assert cli.trainer.global_step == 3
    metrics = cli.trainer.callback_metrics
    assert {"train/loss_sa", "train/loss_source", "train/loss_target", "val/mIoU"} <= set(metrics)
    assert float(metrics["train/loss_sa"]) > 0
    for key, value in callbacks[0].sam.state_dict().items():
        assert torch.equal(value, frozen[key])
    assert list((tmp_path / "run").rglob("*.ckpt"))
    # The teacher followed the student by EMA, and never received a gradient.
    model = cli.model
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert any(
        not torch.equal(t, s)
        for t, s in zip(model.teacher.parameters(), model.student.parameters(), strict=True)
    )


def test_mean_teacher_without_the_callback_ignores_the_logits(toy_root: Path, tmp_path: Path) -> None:
    cli = load_example_cli().main(args=["fit", *example_args(toy_root, tmp_path / "run", steps=2)])
    assert cli.trainer.global_step == 2
    assert "train/loss_sa" not in cli.trainer.callback_metrics
    assert not any(isinstance(c, SelfAttentionLossCallback) for c in cli.trainer.callbacks)
