"""Stage 1 of the method (Fig. 2a): a network and the self-attention module trained jointly on the source domain."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn

from uda_sam.nn import SelfAttentionModule
from uda_sam.nn.sam import AttentionImpl
from uda_sam.sam_io import sam_config, save_sam
from uda_sam.tasks.base import SegmentationTask, check_choice

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
        **kwargs: Any,
    ) -> None:
        check_choice("layer", layer, ("prediction", "feature"))
        check_choice("sam_impl", sam_impl, ("auto", "full", "blockwise"))
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
        loss = self.segmentation_loss(self(source["image"]), source["mask"])
        self.log_losses(loss, {"loss_seg_source": loss}, batch_size=len(source["image"]))
        return loss

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """The network's groups plus the SAM at the classifier's learning rate."""
        groups = super().optimizer_param_groups()
        groups.append(
            {"name": "sam", "params": list(self.sam.parameters()), "lr": self.lr * self.classifier_lr_mult}
        )
        return groups

    def export_sam(self, path: str | os.PathLike[str]) -> Path:
        """Write the SAM's weights and configuration to ``path`` (atomically); see :mod:`uda_sam.sam_io`."""
        return save_sam(self.sam, path, layer=self.layer)

    def resolve_export_path(self) -> Path:
        """``sam_export_path``, or ``sam.pt`` in the trainer's log directory. Call it on every process."""
        if self.sam_export_path is not None:
            return Path(self.sam_export_path)
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(log_dir) / "sam.pt"

    def on_train_end(self) -> None:
        """Export the SAM (rank 0) when training finishes."""
        path = self.resolve_export_path()  # trainer.log_dir broadcasts: every rank must ask
        if self.trainer.is_global_zero:
            self.export_sam(path)
            self.print(f"SAM exported to {path}")
        self.trainer.strategy.barrier("sam_export")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also record the SAM's configuration, so that the checkpoint can serve as ``SelfTraining.sam_path``."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["sam_config"] = {"sam": sam_config(self.sam, self.layer)}
