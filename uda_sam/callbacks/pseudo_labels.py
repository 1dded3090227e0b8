"""Regenerate class-wise thresholded pseudo labels at every generation of self-training (docs/METHOD.md, Sec. 5.3)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from uda_sam.nn.sam_io import load_network_weights
from uda_sam.pseudo_labels.generation import (
    GenerationResult,
    ProcessGroup,
    autocast_dtype_for,
    generate_pseudo_labels,
    read_finished_generation,
)

__all__ = ["PseudoLabelRegeneration"]


class PseudoLabelRegeneration(Callback):
    """Make pseudo labels for the target training images at the start of every generation.

    Generation 1 labels come from ``teacher_checkpoint`` (the "No Pseudo" network); generation ``k > 1`` labels
    from the student at the end of generation ``k - 1``. For each generation the callback runs the network over
    every target training image without augmentation (each image exactly once across DDP ranks), estimates the
    class-wise median thresholds, writes ``{output_dir}/generation_{k}/`` atomically (label PNGs,
    ``thresholds.json``, ``statistics.json``), points the datamodule at it, and, with ``reinitialize``, restarts the
    student from its initial weights with a fresh optimiser and learning-rate schedule (the paper's protocol).

    Generation boundaries fall every ``steps_per_generation`` optimiser steps and are applied at the end of a
    training epoch, so that the next epoch reads the new labels (the train loader stays; its workers,
    persistent or not, read the current label folder from shared memory: ``UDADataModule.set_pseudo_label_root``).
    With several generations in one fit, set the datamodule's ``steps_per_epoch`` so that it divides
    ``steps_per_generation`` (checked before generation 1's labels are made). Resuming from a checkpoint restores the generation index and label folder:
    labels are not regenerated; a checkpoint written at a generation's last step, before the epoch end that
    starts the next one, starts it when the resumed fit begins, as the uninterrupted fit did.

    Args:
        teacher_checkpoint: Lightning checkpoint whose network makes generation 1's labels (or another file that
            the network's :meth:`~uda_sam.nn.SegmentationNetwork.load_weights` reads, e.g. a published source-only
            model); ``None`` uses the network being trained as it is at the start of the fit.
        output_dir: Folder that receives one sub-folder per generation.
        num_generations: Number of generations in this fit.
        steps_per_generation: Optimiser steps per generation; default ``trainer.max_steps // num_generations``.
        cap: Upper bound of the class-wise thresholds (0.9 in the paper).
        num_bins: Confidence-histogram bins (bin width ``1 / num_bins``).
        reinitialize: Restart the student network, optimiser and schedule at each new generation.
        batch_size: Images per inference batch.
        num_workers: Data-loading workers for inference.
        reuse_existing: Reuse a finished generation folder made by the same teacher weights from the same target
            images, size, normalisation, cap and bins (a resumed run); any other folder is made again. ``False``
            always makes the labels again.
        first_generation: Index of this fit's first generation, when generations run as separate fits (generation
            ``k`` of such a protocol is a fit with ``first_generation=k`` whose teacher is generation ``k - 1``).
    """

    def __init__(
        self,
        teacher_checkpoint: str | None = None,
        output_dir: str = "pseudo_labels",
        num_generations: int = 1,
        steps_per_generation: int | None = None,
        cap: float = 0.9,
        num_bins: int = 1000,
        reinitialize: bool = True,
        batch_size: int = 4,
        num_workers: int = 2,
        reuse_existing: bool = True,
        first_generation: int = 1,
    ) -> None:
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        if first_generation < 1:
            raise ValueError(f"first_generation must be >= 1, got {first_generation}")
        if steps_per_generation is not None and steps_per_generation < 1:
            raise ValueError(f"steps_per_generation must be >= 1, got {steps_per_generation}")
        self.teacher_checkpoint = teacher_checkpoint
        self.output_dir = Path(output_dir)
        self.num_generations = num_generations
        self.steps_per_generation = steps_per_generation
        self.cap = cap
        self.num_bins = num_bins
        self.reinitialize = reinitialize
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.reuse_existing = reuse_existing
        self.first_generation = first_generation
        self.generation = 0
        self.label_dir: str | None = None
        self.history: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.teacher_checkpoint is not None and not Path(self.teacher_checkpoint).is_file():
            raise FileNotFoundError(
                f"PseudoLabelRegeneration.teacher_checkpoint: no checkpoint at {self.teacher_checkpoint} "
                "(train the 'No Pseudo' stage first, or pass the path of its .ckpt)"
            )
        datamodule = trainer.datamodule
        for method in ("target_inference_dataset", "set_pseudo_label_root"):
            if not hasattr(datamodule, method):
                raise ValueError(
                    f"PseudoLabelRegeneration needs a datamodule with `{method}()` (UDADataModule)"
                )
        if self.num_generations > 1 and self.reinitialize and not hasattr(pl_module, "start_new_generation"):
            raise ValueError(
                "PseudoLabelRegeneration(reinitialize=True) needs a task with `start_new_generation()`"
            )
        if self.steps_per_generation is None:
            if trainer.max_steps is None or trainer.max_steps < 1:
                raise ValueError("PseudoLabelRegeneration: set trainer.max_steps or steps_per_generation")
            self.steps_per_generation = max(1, trainer.max_steps // self.num_generations)
        epoch_length = getattr(datamodule, "train_epoch_length", None)
        if callable(epoch_length):  # known now: fail before generation 1's labels are made
            self._check_epoch_length(epoch_length())
        # Each generation runs its own learning-rate schedule over its own steps.
        if self.num_generations > 1 and getattr(pl_module, "schedule_steps", 0) is None:
            pl_module.schedule_steps = self.steps_per_generation

    def _check_epoch_length(self, epoch_length: float) -> None:
        steps = self.steps_per_generation
        assert steps is not None
        if self.num_generations > 1 and epoch_length != float("inf") and steps % int(epoch_length) != 0:
            raise ValueError(
                f"PseudoLabelRegeneration: steps_per_generation={steps} is not a multiple of the training epoch "
                f"({int(epoch_length)} steps); set the datamodule's steps_per_epoch to a divisor of it so that each "
                "generation starts with a fresh data loader"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after a checkpoint's callback state is restored and before the train loader is built.
        if self.generation > 0 and self.label_dir is not None:
            if read_finished_generation(self.label_dir) is None:
                raise FileNotFoundError(
                    f"resuming at pseudo-label generation {self.generation}, but its folder {self.label_dir} is "
                    "missing or unfinished"
                )
            rank_zero_info(f"Resuming with pseudo-label generation {self.generation} from {self.label_dir}")
            trainer.datamodule.set_pseudo_label_root(self.label_dir)
            return
        teacher = copy.deepcopy(pl_module.network)
        if self.teacher_checkpoint is not None:
            load_network_weights(
                teacher, self.teacher_checkpoint, "PseudoLabelRegeneration.teacher_checkpoint"
            )
        teacher.to(pl_module.device)
        self._run_generation(trainer, pl_module, teacher, 1, teacher=str(self.teacher_checkpoint))
        del teacher

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_epoch_length(trainer.num_training_batches)
        # A checkpoint written at a generation's last step, before its epoch ended (every_n_train_steps, or after
        # validation), resumes past the epoch end that starts the next generation: start it now.
        if self._next_generation_due(trainer):
            self._start_next_generation(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._next_generation_due(trainer):
            self._start_next_generation(trainer, pl_module)

    def _next_generation_due(self, trainer: pl.Trainer) -> bool:
        assert self.steps_per_generation is not None
        boundary = self.generation * self.steps_per_generation
        return 0 < self.generation < self.num_generations and trainer.global_step >= boundary

    def _start_next_generation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        next_generation = self.generation + 1
        self._run_generation(
            trainer,
            pl_module,
            pl_module.network,
            next_generation,
            teacher=f"student at step {trainer.global_step}",
        )
        if self.reinitialize:
            pl_module.start_new_generation(
                reinitialize_network=True, schedule_steps=self.steps_per_generation
            )

    def state_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "label_dir": self.label_dir, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generation = int(state_dict["generation"])
        self.label_dir = state_dict["label_dir"]
        self.history = list(state_dict.get("history", []))

    # ----------------------------------------------------------------------------------------- the work
    def _run_generation(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        network: torch.nn.Module,
        generation: int,
        teacher: str,
    ) -> None:
        strategy = trainer.strategy
        group = ProcessGroup(
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            reduce_sum=lambda tensor: strategy.reduce(tensor, reduce_op="sum"),
            barrier=strategy.barrier,
            device=pl_module.device,
        )
        dataset = trainer.datamodule.target_inference_dataset()
        index = self.first_generation - 1 + generation  # the generation's number in the whole protocol
        label_dir = self.output_dir / f"generation_{index}"
        rank_zero_info(f"Pseudo labels, generation {index}: {len(dataset)} target images -> {label_dir}")
        result = generate_pseudo_labels(
            network,
            dataset,
            label_dir,
            description={"generation": index, "teacher": teacher},
            num_classes=getattr(network, "num_classes", 19),
            cap=self.cap,
            num_bins=self.num_bins,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            device=pl_module.device,
            autocast_dtype=autocast_dtype_for(trainer.precision),
            group=group,
            reuse="matching" if self.reuse_existing else "never",
            progress=trainer.progress_bar_callback is not None,
        )
        self.generation = generation
        self.label_dir = str(label_dir)
        trainer.datamodule.set_pseudo_label_root(self.label_dir)
        self.history.append({"generation": index, "step": trainer.global_step, "label_dir": self.label_dir})
        if trainer.is_global_zero:
            self._log(trainer, result, index)

    def _log(self, trainer: pl.Trainer, result: GenerationResult, generation: int) -> None:
        stats = result.statistics
        share = stats.get("labelled_share")
        precision = stats.get("precision")
        reused = " (reused)" if result.reused else ""
        if result.replaced:
            rank_zero_info(
                f"Pseudo labels, generation {generation}: replaced the labels made otherwise in {result.label_dir} "
                f"({'; '.join(result.replaced)})"
            )
        rank_zero_info(
            f"Pseudo labels, generation {generation}{reused}: {share:.1%} of pixels labelled"
            + (f", {precision:.1%} agree with the ground truth" if precision is not None else "")
        )
        metrics = {"pseudo/generation": float(generation), "pseudo/labelled_share": share}
        if precision is not None:
            metrics["pseudo/precision"] = precision
        for record in stats.get("classes", []):
            metrics[f"pseudo/threshold/{record['class']}"] = record["threshold"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                columns = ["class", "threshold", "share", "precision", "recall"]
                rows = [[r.get(c) for c in columns] for r in stats.get("classes", [])]
                logger.log_table(key=f"pseudo/generation_{generation}", columns=columns, data=rows)
