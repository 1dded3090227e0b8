"""Attention visualisation during training (Fig. 3) and pixel-wise similarity of logits vs ground truth (Fig. E.4)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import nn

from uda_sam.callbacks.entropy import validation_loader
from uda_sam.data.labels import CLASS_NAMES
from uda_sam.evaluation.analysis import (
    attention_maps_from_logits,
    denormalize,
    jet_colormap,
    logits_and_refined,
    overlay,
    similarity_matrices,
)
from uda_sam.media import find_wandb_logger
from uda_sam.nn import SelfAttentionLoss

__all__ = ["AttentionVisualization"]

#: Upper bound on N for the N x N similarity matrices (logits are average-pooled to stay below it).
MAX_SIMILARITY_PIXELS = 1024

_SEPARATOR_WIDTH = 4


def _hstack(panels: Sequence[np.ndarray]) -> np.ndarray:
    """Panels of equal height side by side, separated by white bars."""
    height = panels[0].shape[0]
    bar = np.full((height, _SEPARATOR_WIDTH, 3), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for index, panel in enumerate(panels):
        if index:
            parts.append(bar)
        parts.append(panel)
    return np.concatenate(parts, axis=1)


def _mark(image: np.ndarray, pixel: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """Draw a white-bordered black square at the centre of logit cell ``pixel`` of an ``h x w`` grid."""
    out = image.copy()
    height, width = out.shape[:2]
    # align_corners=True upsampling puts logit cell (r, c) at r * (H-1)/(h-1).
    row = round(pixel[0] * (height - 1) / max(grid[0] - 1, 1))
    col = round(pixel[1] * (width - 1) / max(grid[1] - 1, 1))
    radius = max(2, min(height, width) // 40)
    out[max(row - radius - 1, 0) : row + radius + 2, max(col - radius - 1, 0) : col + radius + 2] = 255
    out[max(row - radius, 0) : row + radius + 1, max(col - radius, 0) : col + radius + 1] = 0
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "image"


class AttentionVisualization(Callback):
    """Images of Fig. 3 and Fig. E.4 for the first validation images, logged to W&B or saved as PNG files.

    For each of the first ``num_images`` validation images of ``trainer.datamodule`` and each class in ``classes``:
    the pixel predicted as the class with the highest confidence, and the map of ``relu(cos)`` between its logit row
    and every pixel's, over the image, for the network's logits ``P`` and (when the module has a prediction-layer
    ``sam``, e.g. :class:`~uda_sam.tasks.SAMPretraining` or :class:`~uda_sam.tasks.SelfTraining` with a
    ``self_attention`` loss) for ``P~ = P + SAM(P)`` (``SAM(P)`` when the module's ``skip_connection`` is False). A class
    the network predicts nowhere in an image is shown as the plain image with a note in the caption.

    With ``log_similarity``, the pixel-wise similarity (eq. 13) of the logits next to that of the one-hot ground
    truth (and of ``P~`` with a SAM), as ``N x N`` images: logits with more than 1024 pixels are average-pooled
    first, the labels resized by nearest neighbour, and pixels ordered by ground-truth class so the ground truth is
    block-diagonal.

    Runs on rank 0 only (no collectives), in eval mode without gradients (training modes are restored). With a
    :class:`~lightning.pytorch.loggers.WandbLogger`, logs ``attention/<class>`` and ``attention/similarity`` with
    ``log_image``; otherwise writes PNGs to ``<trainer.log_dir or default_root_dir>/attention/step_<k>/``.

    Args:
        every_n_steps: Interval in optimizer steps; ``None`` draws at the end of every validation run (not during
            the sanity check).
        classes: Class names from ``CLASS_NAMES``.
        num_images: How many validation images (the first ones) to draw.
        log_similarity: Also draw the Fig. E.4 similarity matrices.

    Raises:
        ValueError: On an unknown class name, an empty class list, or a non-positive interval or image count.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        classes: list[str] | None = None,
        num_images: int = 2,
        log_similarity: bool = True,
    ) -> None:
        if classes is None:
            classes = ["road", "car", "person", "sky"]
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer or None; got {every_n_steps}")
        if num_images < 1:
            raise ValueError(f"num_images must be a positive integer; got {num_images}")
        if not classes:
            raise ValueError(f"classes must name at least one class of {list(CLASS_NAMES)}")
        for name in classes:
            if not isinstance(name, str) or name not in CLASS_NAMES:
                raise ValueError(f"classes: unknown class {name!r}; expected names from {list(CLASS_NAMES)}")
        self.every_n_steps = every_n_steps
        self.classes = list(classes)
        self.num_images = int(num_images)
        self.log_similarity = bool(log_similarity)
        self._samples: list[dict[str, Any]] | None = None
        self._last_step: int | None = None
        self._warned = False

    # ----------------------------------------------------------------------------------------------- hooks
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Draw when the global step reaches a multiple of ``every_n_steps``."""
        step = trainer.global_step
        if (
            self.every_n_steps is not None
            and step > 0
            and step % self.every_n_steps == 0
            and step != self._last_step
        ):
            self.run(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Draw after each validation run when ``every_n_steps`` is None."""
        if self.every_n_steps is None and not trainer.sanity_checking:
            self.run(trainer, pl_module)

    # ------------------------------------------------------------------------------------------------ work
    def _validation_samples(self, trainer: Trainer) -> list[dict[str, Any]]:
        """The first ``num_images`` validation samples, read once."""
        if self._samples is None:
            loader = validation_loader(trainer)
            if loader is None:
                return []
            dataset = loader.dataset
            count = min(self.num_images, len(dataset))  # type: ignore[arg-type]
            self._samples = [dataset[index] for index in range(count)]
        return self._samples

    @staticmethod
    def _prediction_sam(pl_module: LightningModule, network: nn.Module) -> nn.Module | None:
        """The module's SAM if it works on the logits (not the feature-layer variant): its own (SAMPretraining) or
        that of its self-attention loss (SelfTraining)."""
        sam = getattr(pl_module, "sam", None)
        loss = getattr(pl_module, "self_attention", None)
        if isinstance(loss, SelfAttentionLoss):
            sam = loss.sam
        if not isinstance(sam, nn.Module) or getattr(pl_module, "layer", "prediction") != "prediction":
            return None
        if getattr(sam, "num_classes", None) != getattr(network, "num_classes", None):
            return None
        return sam

    def run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Draw the figures and log or save them (``trainer.log_dir`` is read on every process: a collective)."""
        step = trainer.global_step
        self._last_step = step
        wandb_logger = find_wandb_logger(trainer)
        out_dir = None
        if wandb_logger is None:
            out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "attention" / f"step_{step}"
        if not trainer.is_global_zero:
            return
        samples = self._validation_samples(trainer)
        if not samples:
            if not self._warned:
                rank_zero_warn(
                    "AttentionVisualization needs trainer.datamodule.val_dataloader(); nothing drawn"
                )
                self._warned = True
            return
        figures = self.draw(pl_module, samples, getattr(trainer.datamodule, "normalization", "imagenet"))
        for key, (images, captions) in figures.items():
            if wandb_logger is not None:
                wandb_logger.log_image(key=key, images=images, caption=captions, step=step)
            else:
                assert out_dir is not None
                out_dir.mkdir(parents=True, exist_ok=True)
                # One image per sample, in sample order, under every key.
                for index, image in enumerate(images):
                    name = _slug(str(samples[index].get("name", "image")))
                    Image.fromarray(image).save(out_dir / f"{_slug(key.split('/', 1)[1])}_{index}_{name}.png")

    def draw(
        self, pl_module: LightningModule, samples: Sequence[dict[str, Any]], normalization: str = "imagenet"
    ) -> dict[str, tuple[list[np.ndarray], list[str]]]:
        """The figures as ``{key: (uint8 RGB images, captions)}``; keys ``attention/<class>`` and ``attention/similarity``.

        Each attention image is ``[P | P~]`` (or ``[P]`` without a SAM) side by side with the chosen pixel marked;
        each similarity image is ``[P | P~ | ground truth]`` (``N x N``, jet colours, 0 blue -> 1 red).
        """
        network: nn.Module = pl_module.network
        sam = self._prediction_sam(pl_module, network)
        skip = bool(getattr(pl_module, "skip_connection", True))
        figures: dict[str, tuple[list[np.ndarray], list[str]]] = {}
        for index, sample in enumerate(samples):
            name = str(sample.get("name", f"image_{index}"))
            image = sample["image"]
            rgb = denormalize(image, normalization)  # type: ignore[arg-type]
            # One pass of the network and the SAM per image, for the attention maps and the similarity matrices.
            logits, refined = logits_and_refined(network, image, sam=sam, skip_connection=skip)
            maps = attention_maps_from_logits(logits, self.classes, refined)
            for cls, entry in maps.items():
                images, captions = figures.setdefault(f"attention/{cls}", ([], []))
                pixel = entry["pixel"]
                if pixel is None:
                    panels = [rgb] * (2 if sam is not None else 1)
                    captions.append(f"{name}: '{cls}' is predicted nowhere")
                else:
                    grid = entry["logits"].shape
                    panels = [_mark(overlay(rgb, entry["logits"]), pixel, grid)]
                    if entry["after_sam"] is not None:
                        panels.append(_mark(overlay(rgb, entry["after_sam"]), pixel, grid))
                    what = "P | P + SAM(P)" if skip else "P | SAM(P)"
                    captions.append(
                        f"{name}: '{cls}' at pixel {tuple(pixel)}, {what if sam is not None else 'P'}"
                    )
                images.append(_hstack(panels))
            if self.log_similarity and "mask" in sample:
                images, captions = figures.setdefault("attention/similarity", ([], []))
                panels, labels = self._similarity_panels(logits, refined, skip, sample["mask"])
                images.append(_hstack(panels))
                captions.append(f"{name}: relu(cos) of {' | '.join(labels)}")
        return figures

    @staticmethod
    def _similarity_panels(
        logits: torch.Tensor, refined: torch.Tensor | None, skip: bool, mask: torch.Tensor
    ) -> tuple[list[np.ndarray], list[str]]:
        outputs = {"P": logits}
        if refined is not None:
            outputs["P + SAM(P)" if skip else "SAM(P)"] = refined
        panels, labels, ground_truth = [], [], None
        for label, values in outputs.items():
            matrices = similarity_matrices(values, mask, max_pixels=MAX_SIMILARITY_PIXELS)
            panels.append(jet_colormap(matrices["logits"].cpu().numpy()))
            labels.append(label)
            ground_truth = matrices["labels"]
        assert ground_truth is not None
        panels.append(jet_colormap(ground_truth.cpu().numpy()))
        labels.append("one-hot ground truth")
        return panels, labels
