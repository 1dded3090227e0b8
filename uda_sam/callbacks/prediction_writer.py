"""Write predictions as files: a labelId PNG (official Cityscapes format) and a colour PNG per image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from uda_sam.data.labels import TRAIN_ID_TO_LABEL_ID, colorize
from uda_sam.files import write_atomically

__all__ = ["PredictionWriter"]


def _write_png(array: np.ndarray, path: Path) -> None:
    # Written atomically: a crash never leaves a truncated PNG that the evaluation would read.
    image = Image.fromarray(np.ascontiguousarray(array))
    write_atomically(path, lambda handle: image.save(handle, format="PNG"))


class PredictionWriter(BasePredictionWriter):
    """Save each prediction of ``uda-sam predict`` as PNG files, at the resolution the task predicted.

    For a sample named ``n`` (e.g. ``"frankfurt/frankfurt_000000_000294"``, or with ``data.predict_root`` the
    image's path below that folder without its suffix, e.g. ``"drive_03/frame_000120"``) it writes

    - ``{output_dir}/labelIds/{n}_labelIds.png``: single-channel uint8 Cityscapes **labelIds** (trainId 255 ->
      labelId 0, "unlabeled"), the format of the official evaluation and of
      ``uda-sam evaluate --pred-dir {output_dir}/labelIds``;
    - ``{output_dir}/color/{n}_color.png``: RGB in the Cityscapes colours (when ``color`` is True);
    - ``{output_dir}/trainIds/{n}_trainIds.png``: the raw trainIds (when ``train_ids`` is True).

    The tasks' ``predict_step`` returns ``{"name": [...], "pred": uint8 (B, H, W)}`` at the size of the batch's
    masks, which is the original 2048x1024 with ``data.val_label_size: full`` and each image's own size with
    ``data.predict_root``. Each process writes its own images, so the callback works under DDP.

    Args:
        output_dir: Root folder of the written files.
        color: Also write colour PNGs.
        train_ids: Also write trainId PNGs.
    """

    def __init__(self, output_dir: str = "predictions", color: bool = True, train_ids: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.color = bool(color)
        self.train_ids = bool(train_ids)

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Write the PNG files of one batch of predictions."""
        if not isinstance(prediction, dict) or "name" not in prediction or "pred" not in prediction:
            raise ValueError(
                "PredictionWriter expects predict_step to return {'name': [...], 'pred': (B, H, W)}"
            )
        preds = prediction["pred"].detach().cpu().numpy().astype(np.uint8)
        for name, pred in zip(prediction["name"], preds, strict=True):
            _write_png(TRAIN_ID_TO_LABEL_ID[pred], self.output_dir / "labelIds" / f"{name}_labelIds.png")
            if self.color:
                _write_png(colorize(pred), self.output_dir / "color" / f"{name}_color.png")
            if self.train_ids:
                _write_png(pred, self.output_dir / "trainIds" / f"{name}_trainIds.png")
