"""Validation media for Weights & Biases: a per-class IoU table and images with ground-truth/prediction masks.

Everything here is a no-op unless the trainer has a :class:`~lightning.pytorch.loggers.WandbLogger`; other
loggers only receive the scalar metrics the tasks log with ``self.log``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from uda_sam.data.labels import CLASS_NAMES, CLASS_SUBSETS, IGNORE_INDEX, colorize
from uda_sam.data.transforms import Normalization, denormalize
from uda_sam.evaluation.metrics import mean_iou

__all__ = ["ValidationExample", "find_wandb_logger", "log_examples", "log_iou_table", "make_example"]

#: Class ids -> names for W&B mask overlays (255 shown as "ignore").
CLASS_LABELS: dict[int, str] = {**dict(enumerate(CLASS_NAMES)), IGNORE_INDEX: "ignore"}


@dataclass
class ValidationExample:
    """One validation image kept for logging: RGB image and trainId masks at the image's size."""

    name: str
    image: np.ndarray  # (h, w, 3) uint8
    ground_truth: np.ndarray  # (h, w) uint8
    prediction: np.ndarray  # (h, w) uint8


def find_wandb_logger(trainer: Trainer | None) -> WandbLogger | None:
    """The trainer's first :class:`WandbLogger`, or ``None``."""
    if trainer is None:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger
    return None


def _to_image_grid(mask: Tensor, size: tuple[int, int]) -> np.ndarray:
    if tuple(mask.shape[-2:]) != size:
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0]
    return mask.to(torch.uint8).cpu().numpy()


def make_example(
    name: str, image: Tensor, mask: Tensor, pred: Tensor, normalization: Normalization
) -> ValidationExample:
    """Build a :class:`ValidationExample` from one sample's normalised image and full-size masks.

    The masks are resized (nearest) to the image size so that W&B can overlay them.
    """
    size = (int(image.shape[-2]), int(image.shape[-1]))
    return ValidationExample(
        name=name,
        image=denormalize(image, normalization),
        ground_truth=_to_image_grid(mask, size),
        prediction=_to_image_grid(pred, size),
    )


def log_examples(logger: WandbLogger, key: str, examples: Sequence[ValidationExample], step: int) -> None:
    """Log images with prediction/ground-truth mask overlays, and colour panels (image | ground truth | prediction)."""
    if not examples:
        return
    masks = [
        {
            "prediction": {"mask_data": ex.prediction, "class_labels": CLASS_LABELS},
            "ground_truth": {"mask_data": ex.ground_truth, "class_labels": CLASS_LABELS},
        }
        for ex in examples
    ]
    captions = [ex.name for ex in examples]
    logger.log_image(key=key, images=[ex.image for ex in examples], step=step, masks=masks, caption=captions)
    panels = [
        np.concatenate([ex.image, colorize(ex.ground_truth), colorize(ex.prediction)], axis=1)
        for ex in examples
    ]
    logger.log_image(
        key=f"{key}_color",
        images=panels,
        step=step,
        caption=[f"{c}: image | ground truth | prediction" for c in captions],
    )


def log_iou_table(logger: WandbLogger, key: str, iou: Tensor, subsets: Sequence[str], step: int) -> None:
    """Log a W&B table with one row per class (IoU in %) followed by one row per mIoU subset."""
    values = iou.detach().double().cpu()

    def pct(value: float) -> float | None:
        return None if math.isnan(value) else round(100.0 * value, 2)

    rows: list[list[object]] = [[c, name, pct(float(values[c]))] for c, name in enumerate(CLASS_NAMES)]
    for subset in subsets:
        rows.append([-1, f"mIoU ({subset})", pct(float(mean_iou(values, CLASS_SUBSETS[subset])))])
    logger.log_table(key=key, columns=["trainId", "class", "IoU (%)"], data=rows, step=step)
