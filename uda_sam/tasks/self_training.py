"""Stages 0 and 2 of the method (Fig. 2b): self-training on source labels and target pseudo labels with a frozen SAM."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from uda_sam.nn import SelfAttentionLoss
from uda_sam.nn.sam_io import sam_config
from uda_sam.tasks.base import SegmentationTask

__all__ = ["SelfTraining"]


class SelfTraining(SegmentationTask):
    """A new network trained on source labels, target pseudo labels and the self-attention loss (docs/METHOD.md stage 2).

    Objective (docs/METHOD.md (10) / (11)), with ``lambda`` the ``weight`` of ``self_attention``::

        L = L_seg(s) + L_seg(t) + lambda * (L_sa(s) + L_sa(t))    # self_attention.domains="both"
        L = L_seg(s) + L_seg(t) + lambda * L_sa(t)                # self_attention.domains="target"

    where ``L_sa`` and its options (the SAM file, the target form (8)/(9), the domains, the distance, the layer) are
    those of :class:`uda_sam.nn.SelfAttentionLoss`. Its SAM is frozen: no gradient, eval mode for the whole run, not
    in the optimiser (it is in the checkpoint, under ``self_attention.``). Settings of the paper's tables:

    - "No Pseudo" (stage 0): ``use_target=False`` without ``self_attention`` (source loss only).
    - "Pseudo-Only": without ``self_attention``; target masks are the pseudo labels (255 where none).
    - "Ours": ``self_attention=SelfAttentionLoss(sam, weight=0.1)`` (DeepLabV2) / ``weight=0.001`` (FCN-8s) with
      the pretrained SAM.
    - "No Conv": ``SelfAttentionLoss(sam=SelfAttentionModule(19, use_conv=False))`` (a parameter-free SAM, ``Q = P``).

    With ``joint_forward`` the source and target batches go through the network as one batch: BatchNorm layers in
    training mode then normalise both domains with the same batch statistics, and their running statistics (what
    inference uses) are those of the mixture, not of whichever domain came last. Separate passes (the default) are
    the paper's recipe, whose DeepLabV2 keeps BatchNorm frozen; with BatchNorm training (a network trained from
    scratch, the toy's) one pass is what lets the student learn from the target (``benchmarks/results/
    toy_joint_forward_cpu.md``). When the source images are larger than the target's, each step takes one random
    window of the target's size from the whole source batch (images and masks); smaller ones are an error.

    With ``use_target=False`` and a ``self_attention`` the target images still pass through the network for the
    self-attention loss (which needs no labels), but no target cross-entropy is computed. Inference always uses the
    network alone. Batches are ``{"source": {...}, "target": {...}}`` as produced by ``UDADataModule``.

    In a YAML config::

        model:
          class_path: uda_sam.tasks.SelfTraining
          init_args:
            self_attention:
              class_path: uda_sam.nn.SelfAttentionLoss
              init_args: {sam: runs/gta5/sam_pretrain/sam.pt, weight: 0.1, target: residual, domains: both}

    Args:
        network: The network ``g`` (a new ImageNet initialisation in the paper).
        self_attention: The self-attention loss; ``None`` trains without it (Pseudo-Only, No Pseudo).
        use_target: Train on the target pseudo labels (3); ``False`` = source only ("No Pseudo").
        use_source: Train on the source labels (1); ``False`` with ``use_target`` and the datamodule's
            ``target_labels: gt`` is the target-supervised "Oracle" upper bound.
        joint_forward: Forward the source and target batches as one batch (shared BatchNorm statistics); see above.
        **kwargs: Optimiser, schedule and evaluation options of :class:`~uda_sam.tasks.SegmentationTask`.

    Raises:
        ValueError: With neither ``use_source`` nor ``use_target``, or a SAM built for another number of classes
            (or feature channels) than the network's.
    """

    def __init__(
        self,
        network: nn.Module,
        self_attention: SelfAttentionLoss | None = None,
        use_target: bool = True,
        use_source: bool = True,
        joint_forward: bool = False,
        **kwargs: Any,
    ) -> None:
        if not (use_source or use_target):
            raise ValueError("use_source and use_target are both False: there is nothing to train on")
        if self_attention is not None and not isinstance(self_attention, SelfAttentionLoss):
            raise ValueError(
                f"self_attention must be a uda_sam.nn.SelfAttentionLoss or None, got {type(self_attention).__name__}"
            )
        with warnings.catch_warnings():
            # Built in Python (not from a config), the loss module lands in hparams: replaced below.
            warnings.filterwarnings(
                "ignore", message="Attribute 'self_attention' is an instance of `nn.Module`"
            )
            super().__init__(network, **kwargs)
        if self_attention is not None:
            self_attention.check_network(int(network.num_classes), getattr(network, "feature_channels", None))
            if isinstance(self.hparams.get("self_attention"), nn.Module):
                # Its options, not the module (its SAMs are in the state_dict): checkpoints stay loadable with
                # weights_only=True.
                options = {
                    "weight": self_attention.weight,
                    "target": self_attention.target,
                    "domains": self_attention.domains,
                    "distance": self_attention.distance,
                    "layer": self_attention.layer,
                    **self_attention.sources,
                }
                self.save_hyperparameters({**self.hparams, "self_attention": options})
        self.self_attention = self_attention
        self.use_target = bool(use_target)
        self.use_source = bool(use_source)
        self.joint_forward = bool(joint_forward)
        for warning in self_attention.attention_warnings if self_attention is not None else []:
            rank_zero_warn(warning)

    def kept_in_eval(self) -> list[nn.Module]:
        """The network's modules kept in eval mode and the frozen SAMs' (see ``SegmentationTask``)."""
        frozen = self.self_attention.frozen_sams() if self.self_attention is not None else []
        return super().kept_in_eval() + [module for sam in frozen for module in sam.modules()]

    def _run(self, image: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.self_attention is not None and self.self_attention.feature_sam is not None:
            logits, features = self.network(image, return_features=True)
            return logits, features
        return self.network(image), None

    @staticmethod
    def _source_window(source: dict[str, Any], size: torch.Size) -> tuple[Tensor, Tensor]:
        """The source images and masks cropped to ``size`` (the target's): one random window for the whole batch."""
        image, mask = source["image"], source["mask"]
        height, width = size
        if image.shape[-2] < height or image.shape[-1] < width:
            raise ValueError(
                f"joint_forward needs source images at least as large as the target's: got source "
                f"{image.shape[-1]}x{image.shape[-2]} and target {width}x{height} (width x height); set "
                f"data.source_size (or data.crop_size) so that the source is not smaller"
            )
        if image.shape[-2:] == size:
            return image, mask
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                "joint_forward crops the source batch, which needs its masks at the image size "
                f"(got masks {tuple(mask.shape[-2:])} for images {tuple(image.shape[-2:])})"
            )
        top = int(torch.randint(image.shape[-2] - height + 1, ()).item())
        left = int(torch.randint(image.shape[-1] - width + 1, ()).item())
        window = (..., slice(top, top + height), slice(left, left + width))
        return image[window], mask[window]

    def compute_losses(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """The objective (10) / (11) of one batch, without logging (usable outside a ``Trainer``).

        Returns:
            ``(total, terms, logits)``: the total loss, each term by its name (``loss_seg_source``,
            ``loss_seg_target``, ``loss_sa_target``, ``loss_sa_source``), and the logits whose scale is logged
            (the target's when the step computes them, else the source's).
        """
        source, target = self.split_batch(batch)
        terms: dict[str, Tensor] = {}
        logits_s = features_s = logits_t = features_t = None
        needs_target = self.use_target or self.self_attention is not None
        if needs_target and target is None:
            raise ValueError(
                "SelfTraining with use_target=True or a self_attention loss needs batches "
                "{'source': ..., 'target': ...} (use uda_sam.datamodules.UDADataModule)"
            )
        if self.joint_forward and self.use_source and needs_target:
            assert target is not None
            # One pass: BatchNorm normalises both domains with the same batch statistics.
            source_image, source_mask = self._source_window(source, target["image"].shape[-2:])
            joint_logits, joint_features = self._run(torch.cat([source_image, target["image"]]))
            split = len(source_image)
            logits_s, logits_t = joint_logits[:split], joint_logits[split:]
            if joint_features is not None:
                features_s, features_t = joint_features[:split], joint_features[split:]
        elif self.use_source:
            source_mask = source["mask"]
            logits_s, features_s = self._run(source["image"])
        if needs_target and logits_t is None:
            assert target is not None
            logits_t, features_t = self._run(target["image"])
        if self.use_source:
            terms["loss_seg_source"] = self.segmentation_loss(logits_s, source_mask)
        if self.use_target:
            assert target is not None
            terms["loss_seg_target"] = self.segmentation_loss(logits_t, target["mask"])
        total = sum(terms.values())
        if self.self_attention is not None:
            logits, features = {"target": logits_t}, {"target": features_t}
            if logits_s is not None:
                logits["source"], features["source"] = logits_s, features_s
            attention = self.self_attention(logits, features)
            terms.update(attention.terms)
            if self.self_attention.weight > 0:
                total = total + attention.total
        # The target logits when the step computes them (the ones the pseudo labels and L_sa(t) act on).
        watched = logits_t if logits_t is not None else logits_s
        return total, terms, watched

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """One step of (10) / (11) (:meth:`compute_losses`); every term is logged separately."""
        total, terms, watched = self.compute_losses(batch)
        source, _ = self.split_batch(batch)
        self.log_losses(total, terms, batch_size=len(source["image"]), logits=watched)
        return total

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also record the frozen SAMs' configuration (the checkpoint can then serve as a SAM file)."""
        super().on_save_checkpoint(checkpoint)
        configs = {}
        if self.self_attention is not None:
            if self.self_attention.sam is not None:
                configs["self_attention.sam"] = sam_config(self.self_attention.sam, "prediction")
            if self.self_attention.feature_sam is not None:
                configs["self_attention.feature_sam"] = sam_config(self.self_attention.feature_sam, "feature")
        if configs:
            checkpoint["sam_config"] = configs

    @classmethod
    def prediction_overrides(cls) -> dict[str, Any]:
        """No self-attention loss: the network alone predicts, without the frozen SAMs or their files."""
        return {"self_attention": None}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the schedule (see ``SegmentationTask``); a prediction by a task built without the frozen SAMs
        (:meth:`prediction_overrides`) leaves their weights in the checkpoint aside."""
        super().on_load_checkpoint(checkpoint)
        if self._trainer is None or self.trainer.state.fn != TrainerFn.PREDICTING:
            return
        state = checkpoint["state_dict"]
        if self.self_attention is None:
            for key in [key for key in state if key.startswith("self_attention.")]:
                del state[key]
