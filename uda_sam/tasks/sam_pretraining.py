"""Stage 1 of the method (Fig. 2a): a network and the self-attention module trained jointly on the source domain."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from uda_sam.checks import check_choice
from uda_sam.evaluation.analysis import AttentionQuality, measure_attention_quality
from uda_sam.nn import SelfAttentionModule
from uda_sam.nn.sam import AttentionImpl
from uda_sam.nn.sam_io import attention_warning, sam_config, save_sam
from uda_sam.tasks.base import SegmentationTask

__all__ = ["SAMPretraining"]


class SAMPretraining(SegmentationTask):
    """Train a network ``f1`` and a SAM jointly, by one optimiser, on labelled source batches (docs/METHOD.md stage 1).

    The loss is the cross-entropy (1) of ``up(P + SAM(P))`` (skip connection, the default) or of ``up(SAM(P))``
    ("No skip-connection" ablation). Target batches are ignored. Validation, test and prediction score that same
    output. The network is discarded afterwards: at the end of training the SAM is exported on its own
    (:meth:`export_sam`) for :class:`~uda_sam.tasks.SelfTraining`, which can also read it straight from this task's
    Lightning checkpoints.

    With ``layer="feature"`` (appendix variant) the SAM works on the classifier's input features ``F`` instead and
    the loss is computed on ``classifier(F + SAM(F))``; the network must expose ``classifier`` and
    ``feature_channels`` (``DeepLabV2`` does).

    Args:
        network: The segmentation network ``f1`` (ImageNet initialisation in the paper).
        sam_embed_channels: Channels ``C'`` of the SAM's transform; ``None`` = its input channels.
        sam_kernel_size: Odd kernel size of the SAM's transform convolution.
        sam_impl: Attention kernel: ``"auto"``, ``"full"`` or ``"blockwise"`` (see ``SelfAttentionModule``).
        skip_connection: ``True``: loss on ``P + P_sa``; ``False``: on ``P_sa`` alone.
        layer: ``"prediction"`` (SAM over the logits ``P``) or ``"feature"`` (over the classifier's input).
        sam_export_path: Where :meth:`on_train_end` writes the SAM file; ``None`` = ``<log_dir>/sam.pt``
            (``trainer.log_dir``, else ``trainer.default_root_dir``).
        attention_images: At the end of training, the SAM's attention is measured on up to this many labelled
            images per domain that nothing trained on: the datamodule's held-out source images
            (``data.source_holdout``) and the target validation split (a diagnostic; its labels train nothing).
            Mean row entropy against uniform attention, and the share of a row's attention on its own
            ground-truth class against chance (:class:`~uda_sam.evaluation.analysis.AttentionQuality`); logged as
            ``sam/<domain>/<figure>``, kept in :attr:`attention_quality` and written into the SAM file. 0 skips it.
        **kwargs: Optimiser, schedule and evaluation options of :class:`~uda_sam.tasks.SegmentationTask`. The SAM's
            parameters get the classifier's learning rate (``lr * classifier_lr_mult``).
    """

    def __init__(
        self,
        network: nn.Module,
        sam_embed_channels: int | None = None,
        sam_kernel_size: int = 1,
        sam_impl: AttentionImpl = "auto",
        skip_connection: bool = True,
        layer: Literal["prediction", "feature"] = "prediction",
        sam_export_path: str | None = None,
        attention_images: int = 100,
        **kwargs: Any,
    ) -> None:
        check_choice("layer", layer, ("prediction", "feature"))
        check_choice("sam_impl", sam_impl, ("auto", "full", "blockwise"))
        if attention_images < 0:
            raise ValueError(f"attention_images must be >= 0, got {attention_images!r}")
        super().__init__(network, **kwargs)
        if layer == "feature":
            missing = [name for name in ("classifier", "feature_channels") if not hasattr(network, name)]
            if missing:
                raise ValueError(
                    f"layer='feature' needs a network exposing classifier and feature_channels (e.g. DeepLabV2); "
                    f"{type(network).__name__} lacks {missing}"
                )
        channels = int(network.feature_channels) if layer == "feature" else int(network.num_classes)
        self.sam = SelfAttentionModule(
            channels, embed_channels=sam_embed_channels, kernel_size=sam_kernel_size, impl=sam_impl
        )
        self.skip_connection = bool(skip_connection)
        self.layer: Literal["prediction", "feature"] = layer
        self.sam_export_path = sam_export_path
        self.attention_images = int(attention_images)
        #: ``{domain: figures}`` measured at the end of training (see ``attention_images``).
        self.attention_quality: dict[str, dict[str, float]] = {}

    def forward(self, image: Tensor) -> Tensor:
        """The trained output: logits of ``P + SAM(P)`` (or ``SAM(P)``), or their feature-layer counterpart."""
        if self.layer == "prediction":
            logits = self.network(image)
            attended = self.sam(logits)
            return logits + attended if self.skip_connection else attended
        _, features = self.network(image, return_features=True)
        attended = self.sam(features)
        return self.network.classifier(features + attended if self.skip_connection else attended)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Cross-entropy (1) of the SAM-refined source logits."""
        source, _ = self.split_batch(batch)
        logits = self(source["image"])
        loss = self.segmentation_loss(logits, source["mask"])
        self.log_losses(loss, {"loss_seg_source": loss}, batch_size=len(source["image"]), logits=logits)
        return loss

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """The network's groups plus the SAM at the classifier's learning rate."""
        groups = super().optimizer_param_groups()
        groups.append(
            {"name": "sam", "params": list(self.sam.parameters()), "lr": self.lr * self.classifier_lr_mult}
        )
        return groups

    def export_sam(self, path: str | os.PathLike[str]) -> Path:
        """Write the SAM's weights, configuration and attention quality to ``path`` (atomically); see
        :mod:`uda_sam.nn.sam_io`."""
        return save_sam(self.sam, path, layer=self.layer, attention_quality=self.attention_quality or None)

    def measure_attention(self) -> dict[str, dict[str, float]]:
        """Measure the SAM's attention quality on the datamodule's labelled held-out images (every process).

        Each process takes every ``world_size``-th image; the sums are reduced across processes.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.layer != "prediction" or self.attention_images == 0 or datamodule is None:
            return {}
        domains = {
            "source": getattr(datamodule, "source_holdout_dataset", lambda: None)(),
            "target": getattr(datamodule, "val_dataset", None),
        }
        rank, world = self.trainer.global_rank, self.trainer.world_size
        results = {}
        for domain, dataset in domains.items():
            if dataset is None:
                continue
            count = min(self.attention_images, len(dataset))
            quality = measure_attention_quality(
                self.network, self.sam, dataset, self.device, indices=range(rank, count, world)
            )
            totals = torch.cat(
                [quality.sums, torch.tensor([quality.rows, quality.images], dtype=torch.float64)]
            ).to(self.device)
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum").cpu()
            summed = AttentionQuality()
            summed.sums, summed.rows, summed.images = totals[:4], int(totals[4]), int(totals[5])
            if summed.rows:
                results[domain] = summed.compute()
        return results

    def _report_attention(self) -> None:
        for domain, figures in self.attention_quality.items():
            where = "held-out source" if domain == "source" else "target val"
            rank_zero_info(
                f"SAM attention on {int(figures['images'])} {where} images: {figures['same_class_share']:.3f} of a "
                f"row's attention on its own class (chance {figures['chance_share']:.3f}, lift "
                f"{figures['lift']:.2f}); row entropy {figures['entropy']:.3f} (uniform {figures['uniform_entropy']:.3f})"
            )
            warning = attention_warning(figures)
            if warning:
                rank_zero_warn(f"SAM pretraining, {where} images: {warning}")
        if self.trainer.is_global_zero:
            metrics = {
                f"sam/{domain}/{name}": value
                for domain, figures in self.attention_quality.items()
                for name, value in figures.items()
            }
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=self.global_step)

    def resolve_export_path(self) -> Path:
        """``sam_export_path``, or ``sam.pt`` in the trainer's log directory. Call it on every process."""
        if self.sam_export_path is not None:
            return Path(self.sam_export_path)
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(log_dir) / "sam.pt"

    def on_train_end(self) -> None:
        """Measure the SAM's attention (every rank) and export the SAM (rank 0) when training finishes."""
        self.attention_quality = self.measure_attention()
        self._report_attention()
        path = self.resolve_export_path()  # trainer.log_dir broadcasts: every rank must ask
        if self.trainer.is_global_zero:
            self.export_sam(path)
            self.print(f"SAM exported to {path}")
        self.trainer.strategy.barrier("sam_export")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also record the SAM's configuration, so that the checkpoint can serve as ``SelfAttentionLoss.sam``."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["sam_config"] = {"sam": sam_config(self.sam, self.layer)}
