"""Entropy analysis during training (Fig. 4, eq. 12): mean entropy of correct and incorrect validation pixels."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Subset

from uda_sam.evaluation.analysis import EntropyAnalysis, eval_mode

__all__ = ["EntropyAnalysisCallback"]

CSV_FIELDS = ("step", "entropy_correct", "entropy_incorrect", "num_images")


def shard_loader(loader: DataLoader, rank: int, world_size: int, max_images: int | None = None) -> DataLoader:
    """A one-pass copy of ``loader`` over this process's share of its (first ``max_images``) samples.

    Indices are split as ``indices[rank::world_size]`` so that every image is seen exactly once across processes
    (a ``DistributedSampler`` would pad by repeating samples).
    """
    count = len(loader.dataset)  # type: ignore[arg-type]
    if max_images is not None:
        count = min(count, max_images)
    subset = Subset(loader.dataset, list(range(count))[rank::world_size])
    return DataLoader(
        subset,
        batch_size=loader.batch_size or 1,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )


def validation_loader(trainer: Trainer) -> DataLoader | None:
    """The datamodule's validation loader (the first one if it returns several), or ``None``."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not hasattr(datamodule, "val_dataloader"):
        return None
    loader = datamodule.val_dataloader()
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    return loader if isinstance(loader, DataLoader) else None


class EntropyAnalysisCallback(Callback):
    """The entropy analysis of Fig. 4 (eq. 12) on the validation passes of a fit, from their own logits.

    A validation pass during training is analysed when at least ``every_n_steps`` steps separate it from the last
    analysed one (the first pass at or after each multiple of ``every_n_steps``): the callback reads the logits the
    validation step computed (``outputs["logits"]`` of :class:`~uda_sam.tasks.SegmentationTask`: upsampled to the
    mask size, float32) and runs no pass of its own. For a LightningModule whose ``validation_step`` returns no
    logits, it runs ``pl_module.network`` on the batch (upsampled with ``network.upsample_logits``). When training
    ends at a step no validation pass analysed, one pass over the validation images is run for the final weights.
    Probabilities are the softmax in float32; per image, the pixels are split into correctly and incorrectly
    classified ones (255 ignored), the mean entropy (nats) of each group is taken, and these are averaged over
    images, skipping images without such pixels.

    Under DDP every validation image is seen by one process (the datamodule's validation sampler does not repeat
    images; the final pass takes ``indices[rank::world_size]``) and the sums are reduced across processes. Results
    go to every logger as ``analysis/entropy_correct`` and ``analysis/entropy_incorrect`` (at the trainer's global
    step), and a CSV with columns ``step, entropy_correct, entropy_incorrect, num_images`` (appended to, written
    by rank 0).

    Args:
        every_n_steps: Least interval in optimizer steps between analysed validation passes (the paper: 2000;
            validate at least that often).
        output_csv: CSV path; ``None`` means ``entropy.csv`` in ``trainer.log_dir`` (else ``default_root_dir``).
        max_images: Use only the first ``max_images`` validation images (``None``: all; the paper uses 500).

    Raises:
        ValueError: If ``every_n_steps`` or ``max_images`` is not positive.
    """

    def __init__(
        self, every_n_steps: int = 2000, output_csv: str | None = None, max_images: int | None = None
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer; got {every_n_steps}")
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be a positive integer or None; got {max_images}")
        self.every_n_steps = int(every_n_steps)
        self.output_csv = output_csv
        self.max_images = max_images
        self._last_step: int | None = None
        self._warned = False
        self._pass: EntropyAnalysis | None = None  # the analysis of the validation pass under way
        self._images_seen = 0

    # ----------------------------------------------------------------------------------------------- hooks
    def _due(self, step: int) -> bool:
        if step < self.every_n_steps:
            return False
        return self._last_step is None or step // self.every_n_steps > self._last_step // self.every_n_steps

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start analysing this validation pass when it is a training one that is due."""
        during_fit = trainer.state.fn == "fit" and not trainer.sanity_checking
        self._pass = EntropyAnalysis() if during_fit and self._due(trainer.global_step) else None
        self._images_seen = 0

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Add the batch's images (up to ``max_images`` over all processes) to the analysis of the pass."""
        if self._pass is None or dataloader_idx != 0:
            return
        mask = batch["mask"]
        # This process holds images rank, rank + world_size, ... of the validation set.
        keep = len(mask)
        if self.max_images is not None:
            first = self._images_seen * trainer.world_size + trainer.global_rank
            keep = max(0, min(keep, -(-(self.max_images - first) // trainer.world_size)))
        self._images_seen += len(mask)
        if keep == 0:
            return
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
        if logits is None:  # a module that returns no logits: run its network on the batch
            network = pl_module.network
            logits = network.upsample_logits(network(batch["image"][:keep]).float(), tuple(mask.shape[-2:]))
        self._pass.update(logits[:keep].float().softmax(dim=1), mask[:keep])

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sum the pass's analysis over processes, log it and append it to the CSV."""
        if self._pass is None:
            return
        analysis, self._pass = self._pass, None
        self._report(trainer, self._reduce(trainer, pl_module, analysis))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Analyse the final weights with a pass of its own unless a validation pass did at this step."""
        if trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The last analysed step (so a resumed run does not repeat it)."""
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._last_step = state_dict.get("last_step")

    # ------------------------------------------------------------------------------------------------ work
    def csv_path(self, trainer: Trainer) -> Path:
        """Where the CSV goes. Call on every process: ``trainer.log_dir`` is a collective under DDP."""
        if self.output_csv is not None:
            return Path(self.output_csv)
        return Path(trainer.log_dir or trainer.default_root_dir) / "entropy.csv"

    @staticmethod
    def _reduce(trainer: Trainer, pl_module: LightningModule, analysis: EntropyAnalysis) -> EntropyAnalysis:
        state = trainer.strategy.reduce(analysis.state_tensor().to(pl_module.device), reduce_op="sum")
        analysis.load_state_tensor(state)
        return analysis

    def analyse(self, trainer: Trainer, pl_module: LightningModule) -> EntropyAnalysis | None:
        """Run the network over this process's share of the validation set and sum the state over processes.

        Returns:
            The combined :class:`~uda_sam.evaluation.analysis.EntropyAnalysis` (identical on every process), or
            ``None`` when the trainer has no datamodule with a validation loader.
        """
        loader = validation_loader(trainer)
        if loader is None:
            if not self._warned:
                rank_zero_warn(
                    "EntropyAnalysisCallback needs trainer.datamodule.val_dataloader(); skipping the analysis"
                )
                self._warned = True
            return None
        network = pl_module.network
        loader = shard_loader(loader, trainer.global_rank, trainer.world_size, self.max_images)
        analysis = EntropyAnalysis()
        device = pl_module.device
        with eval_mode(network), torch.no_grad():
            for batch in loader:
                image = batch["image"].to(device, non_blocking=True)
                mask = batch["mask"].to(device, non_blocking=True)
                with trainer.precision_plugin.forward_context():
                    logits = network(image)
                # Upsampling and softmax in float32: bf16 probabilities would blur the entropy of confident pixels.
                logits = network.upsample_logits(logits.float(), tuple(mask.shape[-2:]))
                analysis.update(logits.softmax(dim=1), mask)
        return self._reduce(trainer, pl_module, analysis)

    def run(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float] | None:
        """Analyse with a pass of its own, log and append to the CSV; every process must call it (it reduces)."""
        self._last_step = trainer.global_step
        analysis = self.analyse(trainer, pl_module)
        return None if analysis is None else self._report(trainer, analysis)

    def _report(self, trainer: Trainer, analysis: EntropyAnalysis) -> dict[str, float]:
        step = trainer.global_step
        self._last_step = step
        result = analysis.compute()
        path = self.csv_path(trainer)
        if trainer.is_global_zero:
            metrics = {
                "analysis/entropy_correct": result["entropy_correct"],
                "analysis/entropy_incorrect": result["entropy_incorrect"],
            }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            self._append_row(path, step, result)
        return result

    @staticmethod
    def _append_row(path: Path, step: int, result: dict[str, float]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not path.exists() or os.path.getsize(path) == 0
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new_file:
                writer.writerow(CSV_FIELDS)
            writer.writerow(
                [
                    step,
                    _fmt(result["entropy_correct"]),
                    _fmt(result["entropy_incorrect"]),
                    result["num_images"],
                ]
            )


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.6f}"
