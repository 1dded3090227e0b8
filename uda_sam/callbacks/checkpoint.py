"""``last.ckpt`` that always holds the last training step, and checkpoint files written whole or not at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from uda_sam.files import WriteError, remove_stale_temporaries, write_atomically

__all__ = ["AtomicCheckpointIO", "LastStepCheckpoint"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing local files with :func:`~uda_sam.files.write_atomically`.

    Lightning's own writer stages a checkpoint in the system's temporary folder and then moves it into place: a
    copy, not a rename, when that folder is on another file system, and the staged file stays there when the run is
    killed. Here the file is written next to its destination and renamed over it, so that every checkpoint
    (``best.ckpt`` as well as ``last.ckpt``) is whole or absent, and a full disk or a read-only folder raises a
    :class:`~uda_sam.files.WriteError` naming the file. Remote paths (``s3://...``) keep Lightning's writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically."""
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_atomically(path, lambda handle: torch.save(checkpoint, handle))


class LastStepCheckpoint(ModelCheckpoint):
    """Write ``last.ckpt`` every ``every_n_train_steps`` optimiser steps and once more when training ends.

    Lightning's ``ModelCheckpoint(monitor=..., save_last=True)`` writes ``last.ckpt`` only when it writes a monitored
    checkpoint, i.e. when the monitored score improves, and at the end of training only if it never wrote one: its
    ``last.ckpt`` can lag many steps behind. This checkpoint monitors nothing, so ``last.ckpt`` is the network at
    the last step it was written, and after a finished fit at the last step of the fit: the network the pipeline
    scores and hands on as the next generation's teacher, and the point a killed run resumes from. The file is
    replaced atomically, so a run killed while writing it keeps the previous one whole, and the next fit removes
    what the killed write left; a full disk or a read-only folder stops the fit with a
    :class:`~uda_sam.files.WriteError` naming ``last.ckpt``, which keeps its previous content. For the best network
    on validation, add a monitored ``ModelCheckpoint`` with another ``filename`` and ``save_last: false``.

    Args:
        dirpath: Folder of ``last.ckpt``; ``None`` uses Lightning's default (``{default_root_dir}/checkpoints`` or
            the logger's folder).
        every_n_train_steps: Steps between writes (e.g. the validation interval); ``None`` or 0 writes only when
            training ends.
        save_weights_only: Keep only the weights (a run cannot resume from such a file).
    """

    CHECKPOINT_NAME_LAST = "last"

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int | None = None,
        save_weights_only: bool = False,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=self.CHECKPOINT_NAME_LAST,
            monitor=None,
            save_top_k=1,
            save_last=False,
            save_weights_only=save_weights_only,
            every_n_train_steps=every_n_train_steps or 0,
            enable_version_counter=False,
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the folder and, for a fit, remove what a write killed there before it finished left."""
        super().setup(trainer, pl_module, stage)
        local = self.dirpath is not None and "://" not in str(self.dirpath)
        if stage == "fit" and trainer.is_global_zero and local:
            folder = Path(self.dirpath)
            (folder / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}.partial").unlink(missing_ok=True)
            remove_stale_temporaries(folder)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the last step unless it was just written."""
        if trainer.fast_dev_run or self._last_global_step_saved == trainer.global_step:
            return
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # Written next to the destination, then renamed over it: never a truncated last.ckpt.
        partial = f"{filepath}.partial"
        try:
            trainer.save_checkpoint(partial, self.save_weights_only)
            if trainer.is_global_zero:
                self._fs.mv(partial, filepath)
        except OSError as error:
            if trainer.is_global_zero and self._fs.exists(partial):
                self._fs.rm(partial)
            raise WriteError.of(error, filepath) from error
        trainer.strategy.barrier("LastStepCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
