"""DivergenceMonitor: a run whose loss or logits run away stops with a clear message and its last good checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from uda_sam.callbacks import DivergenceError, DivergenceMonitor, SelfAttentionLossCallback
from uda_sam.nn import SelfAttentionLoss, SelfAttentionModule, logit_norm
from uda_sam.tasks import SelfTraining


class Exploding(LightningModule):
    """A loss that is flat for ``flat_steps`` steps, then grows ``factor`` times per step (or turns NaN)."""

    def __init__(self, flat_steps: int = 6, factor: float = 10.0, nan: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.flat_steps, self.factor, self.nan = flat_steps, factor, nan

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        growth = max(0, self.global_step - self.flat_steps + 1)
        scale = float("nan") if self.nan and growth else self.factor**growth
        loss = self.weight.square() * scale
        self.log("train/loss_seg_source", loss.detach())
        self.log("train/logit_norm", torch.tensor(3.0))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.zeros(64, 1), batch_size=1)


def fit(tmp_path: Path, module: LightningModule, monitor: DivergenceMonitor, steps: int = 20) -> Trainer:
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[
            monitor,
            ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1, save_last=True),
        ],
    )
    trainer.fit(module)
    return trainer


def test_exploding_loss_stops_with_message_and_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(DivergenceError) as raised:
        fit(tmp_path, Exploding(flat_steps=6), DivergenceMonitor(max_loss_growth=100, reference_steps=5))
    message = str(raised.value)
    # Steps 0-5 give 1, step 6 gives 10, step 7 100, step 8 1000 > 100 x the reference 1.
    assert "train/loss grew to 1000 at step 8," in message
    assert "max_loss_growth" in message and "loss_seg_source=1000" in message
    assert "logit norm (train/logit_norm): 3" in message
    assert "the segmentation loss itself diverged" in message  # no self-attention term: the generic cause
    assert "DivergenceMonitor.action: warn" in message
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (
        last["global_step"] == 8
    )  # written after step 7 (index 7 ends with global_step 8), the last good one


def test_nonfinite_loss_stops_at_once(tmp_path: Path) -> None:
    with pytest.raises(DivergenceError, match="the training loss is nan at step 3"):
        fit(tmp_path, Exploding(flat_steps=3, nan=True), DivergenceMonitor())


def test_warn_only_lets_the_fit_finish(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="Training diverged") as record:
        trainer = fit(tmp_path, Exploding(flat_steps=6), DivergenceMonitor(action="warn"), steps=12)
    assert trainer.global_step == 12
    assert sum("Training diverged" in str(w.message) for w in record) == 1  # once


def test_reference_survives_resume(tmp_path: Path) -> None:
    monitor = DivergenceMonitor(reference_steps=2)
    fit(tmp_path, Exploding(flat_steps=100), monitor, steps=3)
    assert monitor.reference == {"loss": 1.0, "logit_norm": 3.0}
    fresh = DivergenceMonitor(reference_steps=2)
    fresh.load_state_dict(monitor.state_dict())
    assert fresh.reference == monitor.reference


@pytest.mark.parametrize(
    "kwargs",
    [{"action": "abort"}, {"max_loss_growth": 1.0}, {"max_logit_norm_growth": 0}, {"reference_steps": 0}],
)
def test_bad_options(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="DivergenceMonitor"):
        DivergenceMonitor(**kwargs)


def test_self_training_logs_the_target_logit_norm(tiny_network) -> None:
    task = SelfTraining(tiny_network())
    logged: dict[str, torch.Tensor] = {}
    task.log_dict = lambda values, **_: logged.update(values)  # type: ignore[method-assign]
    task.log = lambda name, value, **_: logged.update({name: value})  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(0)
    batch = {
        domain: {
            "image": torch.randn(2, 3, 32, 64, generator=g),
            "mask": torch.zeros(2, 32, 64, dtype=torch.long),
        }
        for domain in ("source", "target")
    }
    task.training_step(batch, 0)
    expected = logit_norm(task.network(batch["target"]["image"]))
    torch.testing.assert_close(logged["train/logit_norm"], expected)


def test_residual_loss_blow_up_stops_with_the_self_attention_cause(
    tmp_path: Path, tiny_network, toy_datamodule
) -> None:
    """Eq. (8) at a far too large lambda x learning rate: the logits run away and the monitor names the cause."""
    task = SelfTraining(
        tiny_network(),
        # A parameter-free SAM ("No Conv"): no file needed.
        self_attention=SelfAttentionLoss(SelfAttentionModule(19, use_conv=False), weight=1000.0),
        use_target=False,
        optimizer="sgd",
        lr=0.05,
        weight_decay=0.0,
        lr_schedule="constant",
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=100,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[DivergenceMonitor()],
    )
    with pytest.raises(DivergenceError) as raised:
        trainer.fit(task, datamodule=toy_datamodule())
    message = str(raised.value)
    assert "the self-attention terms dominate the loss (SelfAttentionLoss.weight=1000.0)" in message
    assert "residual target (8)" in message and "loss_sa_source=" in message
    assert trainer.global_step < 100


class ExplodingLogits(LightningModule):
    """A host whose logits grow ``factor`` times per step after ``flat_steps`` steps; its own loss stays 1."""

    def __init__(self, flat_steps: int = 6, factor: float = 10.0) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.flat_steps, self.factor = flat_steps, factor
        self.pattern = torch.randn(1, 5, 4, 4, generator=torch.Generator().manual_seed(0))

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        scale = self.factor ** max(0, self.global_step - self.flat_steps + 1)
        return {"loss": self.weight.square(), "sam_logits": self.weight * scale * self.pattern}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.zeros(64, 1), batch_size=1)


def test_the_cause_comes_from_the_callbacks_loss_module(tmp_path: Path) -> None:
    """The monitor finds the self-attention terms in the callback's SelfAttentionLoss, whatever they are logged as."""
    callback = SelfAttentionLossCallback(
        SelfAttentionModule(5, use_conv=False), weight=0.5, target="attended", log_name="train/my_term"
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=20,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, DivergenceMonitor(reference_steps=5)],
    )
    with pytest.raises(DivergenceError) as raised:
        trainer.fit(ExplodingLogits())
    message = str(raised.value)
    assert "the self-attention terms dominate the loss (SelfAttentionLoss.weight=0.5)" in message
    assert "residual target (8)" not in message  # the attended form (9) gets no advice about (8)
