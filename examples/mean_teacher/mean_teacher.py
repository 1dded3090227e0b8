"""A mean-teacher self-training method as its own small LightningModule, independent of uda-sam's tasks.

The student learns from source labels and from the soft predictions of an exponential-moving-average (EMA) teacher
on target images it sees with photometric noise (in the spirit of ProDA's distillation stage and DACS). It uses
uda-sam only as a library: the network, the datamodule, the losses and the metrics.

Its one concession to :class:`uda_sam.callbacks.SelfAttentionLossCallback` is the return value of ``training_step``:
``{"loss": loss, "sam_logits": logits_t}``. Without the callback that key is simply unused.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda_sam import CLASS_NAMES, SegmentationMetrics, load_network_weights, segmentation_loss


class MeanTeacher(pl.LightningModule):
    """Source cross-entropy plus consistency with an EMA teacher's soft predictions on the target images.

    Args:
        network: The student network; it returns pre-upsample logits ``(B, C, h, w)`` and has ``num_classes``.
        init_checkpoint: A uda-sam task checkpoint (e.g. the No Pseudo stage) whose ``network.*`` weights start
            both student and teacher; ``None`` keeps the network's own initialisation.
        ema_decay: The teacher's weights and BatchNorm statistics follow ``decay * teacher + (1 - decay) * student``.
        consistency_weight: Weight of the target consistency loss.
        noise: Strength of the per-image brightness and contrast noise on the student's target images.
        lr: Adam learning rate of the student.
    """

    def __init__(
        self,
        network: nn.Module,
        init_checkpoint: str | None = None,
        ema_decay: float = 0.99,
        consistency_weight: float = 1.0,
        noise: float = 0.2,
        lr: float = 2.5e-4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["network"])
        if init_checkpoint is not None:
            load_network_weights(network, init_checkpoint, option="init_checkpoint")
        self.student = network
        self.teacher = copy.deepcopy(network).requires_grad_(False).eval()
        self.num_classes = int(network.num_classes)  # lets the SAM loss callback check its SAM at fit start
        self.val_metrics = SegmentationMetrics(
            self.num_classes, class_subsets={"19": range(self.num_classes)}
        )

    def train(self, mode: bool = True) -> MeanTeacher:
        super().train(mode)
        self.teacher.eval()  # the teacher always predicts with its running statistics
        return self

    def perturb(self, images: Tensor) -> Tensor:
        """Random brightness and contrast per image (the student's view of the target)."""
        shape = (images.shape[0], 1, 1, 1)
        contrast = 1 + self.hparams.noise * (2 * torch.rand(shape, device=images.device) - 1)
        brightness = self.hparams.noise * (2 * torch.rand(shape, device=images.device) - 1)
        return images * contrast + brightness

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        source, target = batch["source"], batch["target"]
        loss_source = segmentation_loss(self.student(source["image"]), source["mask"])
        logits_t = self.student(self.perturb(target["image"]))
        with torch.no_grad():
            teacher_probs = self.teacher(target["image"]).float().softmax(dim=1)
        loss_target = -(teacher_probs * F.log_softmax(logits_t.float(), dim=1)).sum(dim=1).mean()
        loss = loss_source + self.hparams.consistency_weight * loss_target
        batch_size = len(source["image"])
        self.log("train/loss_source", loss_source.detach(), batch_size=batch_size)
        self.log("train/loss_target", loss_target.detach(), batch_size=batch_size)
        # The only line SelfAttentionLossCallback needs: the pre-upsample target logits next to the loss.
        return {"loss": loss, "sam_logits": logits_t}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        decay = self.hparams.ema_decay
        with torch.no_grad():
            for teacher, student in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
                teacher.lerp_(student, 1 - decay)
            for teacher, student in zip(self.teacher.buffers(), self.student.buffers(), strict=True):
                if teacher.is_floating_point():
                    teacher.lerp_(student, 1 - decay)
                else:
                    teacher.copy_(student)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self.student(batch["image"])
        logits = F.interpolate(logits, size=batch["mask"].shape[-2:], mode="bilinear", align_corners=True)
        self.val_metrics.update(logits.argmax(dim=1), batch["mask"])

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def _log_scores(self, split: str) -> None:
        scores = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log(f"{split}/mIoU", scores["mIoU_19"], sync_dist=True)
        self.log_dict(
            {f"{split}/iou/{CLASS_NAMES[c]}": iou for c, iou in enumerate(scores["iou"])}, sync_dist=True
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.student.parameters(), lr=self.hparams.lr)
