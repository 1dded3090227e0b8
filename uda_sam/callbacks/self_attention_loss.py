"""Add the self-attention loss to any LightningModule's training loss, docs/METHOD.md (8)/(9).

The host module needs one change: its ``training_step`` returns its pre-upsample logits next to its loss::

    def training_step(self, batch, batch_idx):
        logits_t = self.net(batch["target"]["image"])          # (B, C, h, w), before upsampling
        loss = ...                                               # the method's own losses
        return {"loss": loss, "sam_logits": logits_t}

and the callback turns ``loss`` into ``loss + weight * L_sa(logits_t)`` before Lightning runs backward::

    trainer = Trainer(callbacks=[SelfAttentionLossCallback("runs/gta5/sam_pretrain/sam.pt", weight=0.1)])

(in a YAML config: ``class_path: uda_sam.callbacks.SelfAttentionLossCallback`` under ``trainer.callbacks``).
The loss itself is :class:`uda_sam.nn.SelfAttentionLoss`, the one :class:`~uda_sam.tasks.SelfTraining` uses.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from uda_sam.nn import SelfAttentionLoss, SelfAttentionModule, logit_norm
from uda_sam.nn.losses import SelfAttentionDistance, SelfAttentionTarget

__all__ = ["SelfAttentionLossCallback"]

_HOOK = (
    "return {{'loss': loss, '{key}': logits}} from training_step, where logits are the network's pre-upsample "
    "(B, C, h, w) logits on the images the loss should regularise (the target images in the paper; a list of "
    "such tensors adds one term each)"
)


class SelfAttentionLossCallback(Callback):
    """Adds ``weight * L_sa`` to a host LightningModule's training loss, with a frozen, pretrained SAM.

    ``L_sa`` is :class:`uda_sam.nn.SelfAttentionLoss` on the prediction layer: ``dist(P, sg(P + SAM(P)))``
    (``target="residual"``, eq. 8) or ``dist(P, sg(SAM(P)))`` (``"attended"``, eq. 9). The host exposes ``P``
    through one hook: its ``training_step`` returns a dict with ``"loss"`` and ``logits_key`` (default
    ``"sam_logits"``); the value is a ``(B, C, h, w)`` tensor or a list of them (e.g. source and target logits for
    eq. 10), one term each, summed.

    The loss and its SAM are held by the callback as :attr:`loss` (not registered in the host, so the SAM is neither
    in the host's optimiser nor in its checkpoint); the SAM has no gradient, stays in eval mode and is moved to the
    host's device and parameter dtype at fit start (``bf16-true`` hosts get a bf16 SAM; under mixed precision it
    stays float32 and the similarity runs in float32 anyway). The unweighted term is logged as ``log_name`` on every
    step. ``weight=0`` computes and logs the term without adding it: the host's loss and gradients are untouched.

    Works with automatic optimisation (the returned ``"loss"`` is what Lightning back-propagates) on any strategy,
    DDP included: the term is part of the host's loss, so there is one backward pass per step.

    Args:
        sam: The pretrained SAM: the path (a ``str`` or ``os.PathLike``) of an exported SAM file (``sam.pt`` written
            by ``SAMPretraining``) or of a ``SAMPretraining`` checkpoint (``.ckpt``), or a
            :class:`~uda_sam.nn.SelfAttentionModule`.
        weight: ``lambda``, the weight of the term (the paper: 0.1 for DeepLabV2, 0.001 for FCN-8s).
        target: ``"residual"`` (eq. 8) or ``"attended"`` (eq. 9).
        distance: ``"l2"`` (the paper's), ``"kl"`` or ``"cosine"`` (Tab. A.5).
        logits_key: The key of the logits in the dict ``training_step`` returns.
        log_name: The name the term is logged under.
        log_logit_norm: Also log the logits' scale as ``train/logit_norm`` (the mean over the tensors of
            :func:`uda_sam.nn.logit_norm`), which :class:`~uda_sam.callbacks.DivergenceMonitor` watches; turn it off
            when the host logs that key itself.

    Raises:
        FileNotFoundError: If ``sam`` is a path that does not exist.
        ValueError: On a file that is not a SAM, a negative weight or an unknown choice; at fit start, on a host in
            manual optimisation, without its own ``training_step``, or declaring ``num_classes`` other than the
            SAM's; at the first step, on a ``training_step`` that does not return the logits or returns logits
            with another number of channels than the SAM's.
    """

    def __init__(
        self,
        sam: str | SelfAttentionModule,
        weight: float = 0.1,
        target: SelfAttentionTarget = "residual",
        distance: SelfAttentionDistance = "l2",
        logits_key: str = "sam_logits",
        log_name: str = "train/loss_sa",
        log_logit_norm: bool = True,
    ) -> None:
        self.loss = SelfAttentionLoss(sam, weight=weight, target=target, distance=distance)
        for warning in self.loss.attention_warnings:
            rank_zero_warn(warning)
        self.logits_key = logits_key
        self.log_name = log_name
        self.log_logit_norm = bool(log_logit_norm)
        self._wrapped: pl.LightningModule | None = None

    @property
    def sam(self) -> SelfAttentionModule:
        """The frozen SAM (``loss.sam``)."""
        assert self.loss.sam is not None
        return self.loss.sam

    # ------------------------------------------------------------------------------------------- fit life cycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the host and wrap its ``training_step`` (fit only)."""
        if stage != "fit" or self._wrapped is pl_module:
            return
        self._check_host(pl_module)
        original = pl_module.training_step

        @functools.wraps(original)  # keeps the signature Lightning inspects for batch_idx / dataloader_idx
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self.add_to_output(pl_module, original(*args, **kwargs))

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped = pl_module

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move the SAM to the host's device and parameter dtype (the strategy has placed the host by now)."""
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), torch.float32)
        self.loss.to(device=pl_module.device, dtype=dtype)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the host its own ``training_step`` back."""
        if stage == "fit":
            self._unwrap()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Give the host its own ``training_step`` back after a failed fit too."""
        self._unwrap()

    def _unwrap(self) -> None:
        if self._wrapped is not None:
            self._wrapped.__dict__.pop("training_step", None)
            self._wrapped = None

    def _check_host(self, pl_module: pl.LightningModule) -> None:
        name = type(pl_module).__name__
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"SelfAttentionLossCallback: {name} uses manual optimisation, so Lightning does not back-propagate the loss "
                "training_step returns; add `uda_sam.nn.SelfAttentionLoss(...)({'target': logits}).total` to the loss "
                "you pass to manual_backward instead"
            )
        if not is_overridden("training_step", pl_module, pl.LightningModule):
            raise ValueError(
                f"SelfAttentionLossCallback: {name} has no training_step; {_HOOK.format(key=self.logits_key)}"
            )
        declared = getattr(pl_module, "num_classes", None)
        if isinstance(declared, int) and declared != self.sam.num_classes:
            raise ValueError(
                f"SelfAttentionLossCallback: {name} has num_classes={declared} but the SAM in {self._sam_source} was built "
                f"for {self.sam.num_classes} classes; use a SAM pretrained with the host's network"
            )

    # ------------------------------------------------------------------------------------------------ the term
    def add_to_output(self, pl_module: pl.LightningModule, output: Any) -> Any:
        """``output`` with ``weight * L_sa`` added to its ``"loss"`` (``None``, a skipped step, passes through)."""
        if output is None:
            return None
        if not isinstance(output, Mapping) or "loss" not in output or self.logits_key not in output:
            found = sorted(map(str, output)) if isinstance(output, Mapping) else type(output).__name__
            raise ValueError(
                f"SelfAttentionLossCallback: {type(pl_module).__name__}.training_step returned {found}; "
                f"{_HOOK.format(key=self.logits_key)}"
            )
        logits = self._logits_list(output[self.logits_key])
        # One term per tensor, in order; the loss's default domains ("both") keeps them all.
        terms = self.loss({str(index): p for index, p in enumerate(logits)})
        term = sum(terms.terms.values())
        assert isinstance(term, Tensor)
        batch_size = logits[0].shape[0]
        pl_module.log(self.log_name, term.detach(), on_step=True, on_epoch=False, batch_size=batch_size)
        if self.log_logit_norm:
            norm = torch.stack([logit_norm(p) for p in logits]).mean()
            pl_module.log("train/logit_norm", norm, on_step=True, on_epoch=False, batch_size=batch_size)
        if self.loss.weight == 0:
            return output
        return {**output, "loss": output["loss"] + terms.total}

    def _logits_list(self, value: Any) -> list[Tensor]:
        items = [value] if isinstance(value, Tensor) else list(value) if isinstance(value, Sequence) else None
        if not items or not all(isinstance(t, Tensor) for t in items):
            raise ValueError(
                f"SelfAttentionLossCallback: training_step's {self.logits_key!r} must be a (B, C, h, w) tensor or a list of "
                f"them, got {type(value).__name__}"
            )
        for tensor in items:
            if tensor.dim() != 4 or tensor.shape[1] != self.sam.num_classes:
                raise ValueError(
                    f"SelfAttentionLossCallback: training_step's {self.logits_key!r} has shape "
                    f"{tuple(tensor.shape)}, but the SAM in {self._sam_source} expects (B, {self.sam.num_classes}, h, w) pre-upsample logits; "
                    "use a SAM pretrained with the host's network"
                )
        return items

    @property
    def _sam_source(self) -> str:
        return self.loss.sources["sam"]
