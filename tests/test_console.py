"""A quiet console: notices a user cannot act on are filtered where they arise; real warnings still show."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from uda_sam.cli.console import quiet_console
from uda_sam.nn import SelfAttentionLoss, SelfAttentionModule
from uda_sam.tasks import SelfTraining


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_lightning_tips_and_its_own_deprecation_are_filtered_other_notices_are_not() -> None:
    quiet_console()
    quiet_console()  # idempotent: one filter
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert sum(type(f).__name__ == "_DropTips" for f in log.filters) == 1
    records = _Records()
    log.addHandler(records)
    try:
        rank_zero_info("\N{ELECTRIC LIGHT BULB} Tip: try installing something else")
        rank_zero_info("GPU available: False, used: False")
    finally:
        log.removeHandler(records)
    assert records.messages == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_console()  # its filter goes in front of "default"
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use ... instead.", FutureWarning, stacklevel=1
        )
        warnings.warn("pseudo_label_root: 3 of 3 images have no pseudo-label file", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["pseudo_label_root: 3 of 3 images have no pseudo-label file"]


def _fit_warnings(tmp_path: Path, task: SelfTraining, datamodule: object) -> list[str]:
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, datamodule=datamodule)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("by_mistake", [False, True])
def test_frozen_sam_raises_no_eval_mode_warning(
    tmp_path: Path, tiny_network, toy_datamodule, by_mistake: bool
) -> None:
    """The frozen SAM (eval mode on purpose) raises none; a module left in eval mode by mistake still does."""
    no_conv = SelfAttentionLoss(SelfAttentionModule(19, use_conv=False), weight=0.1)
    task = SelfTraining(network=tiny_network(), self_attention=no_conv, lr=1e-3)
    if by_mistake:
        task.extra = torch.nn.Linear(2, 2).eval()
    assert no_conv.sam is not None and not no_conv.sam.training
    messages = [m for m in _fit_warnings(tmp_path, task, toy_datamodule()) if "in eval mode" in m]
    if by_mistake:
        assert messages and messages[0].startswith(f"Found {len(list(no_conv.sam.modules())) + 1} module(s)")
    else:
        assert messages == []
