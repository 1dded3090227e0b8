"""Stop (or warn about) a training run whose loss or logits run away, before it wastes the rest of its steps."""

from __future__ import annotations

import math
import statistics
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from uda_sam.callbacks.self_attention_loss import SelfAttentionLossCallback
from uda_sam.checks import check_choice
from uda_sam.nn import SelfAttentionLoss

__all__ = ["DivergenceError", "DivergenceMonitor"]

DivergenceAction = Literal["stop", "warn"]


class DivergenceError(RuntimeError):
    """Raised by :class:`DivergenceMonitor` when a run diverges and ``action="stop"``."""


class DivergenceMonitor(Callback):
    """Watch every training step for a non-finite loss, or a loss or logit norm that outgrows its early values.

    The reference of each watched value is the median of its first ``reference_steps`` steps of the fit (kept in
    checkpoints, so a resumed run keeps its reference). A step diverges when the loss is not finite, or the loss
    exceeds ``max_loss_growth`` times its reference, or ``train/logit_norm`` (the mean L2 norm of a pixel's logit
    row, logged by the package's tasks and by :class:`~uda_sam.callbacks.SelfAttentionLossCallback`) exceeds
    ``max_logit_norm_growth`` times its reference. Healthy runs stay far inside these bounds: the loss falls from
    its first values, and the logit norm grows a few times as the network grows confident.

    With ``action="stop"`` (the default) the fit ends with a :class:`DivergenceError` whose message gives the step,
    every logged loss term, the logit norm, the likely cause and the option to change. The check runs before the
    step's validation and checkpoint, so the last checkpoint on disk is the last one written before the divergence.
    With ``action="warn"`` it warns once and training goes on.

    :attr:`peak_growth` keeps the largest ratio to the reference each value reached (on the device until read),
    so that a finished run can show how far it stayed from divergence.

    The check reads one flag from the device per step (Lightning's progress bar reads the loss every step anyway);
    under DDP the ranks agree on it, so they all stop together.

    Args:
        action: ``"stop"`` raises :class:`DivergenceError`; ``"warn"`` warns once and continues.
        max_loss_growth: Bound on ``loss / reference loss``.
        max_logit_norm_growth: Bound on ``train/logit_norm / its reference``.
        reference_steps: Number of first steps whose median is the reference.
        logit_norm_key: The logged metric holding the logit norm (skipped when nothing logs it).

    Raises:
        ValueError: On an unknown ``action``, bounds not above 1, or ``reference_steps < 1``.
    """

    def __init__(
        self,
        action: DivergenceAction = "stop",
        max_loss_growth: float = 100.0,
        max_logit_norm_growth: float = 100.0,
        reference_steps: int = 5,
        logit_norm_key: str = "train/logit_norm",
    ) -> None:
        check_choice("DivergenceMonitor.action", action, ("stop", "warn"))
        for name, value in (
            ("max_loss_growth", max_loss_growth),
            ("max_logit_norm_growth", max_logit_norm_growth),
        ):
            if not value > 1:
                raise ValueError(f"DivergenceMonitor.{name} must be > 1, got {value!r}")
        if reference_steps < 1:
            raise ValueError(f"DivergenceMonitor.reference_steps must be >= 1, got {reference_steps!r}")
        self.action: DivergenceAction = action
        self.max_loss_growth = float(max_loss_growth)
        self.max_logit_norm_growth = float(max_logit_norm_growth)
        self.reference_steps = int(reference_steps)
        self.logit_norm_key = logit_norm_key
        self.reference: dict[str, float] = {}
        self._early: dict[str, list[float]] = {"loss": [], "logit_norm": []}
        self._warned = False
        self._step = 0
        self._peak: dict[str, Tensor] = {}

    # ------------------------------------------------------------------------------------------------ hooks
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Note the step the batch trains (``global_step`` as ``training_step`` sees it)."""
        self._step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Check this step's loss and logit norm against their bounds."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, Tensor):
            return  # a skipped step
        norm = trainer.callback_metrics.get(self.logit_norm_key)
        values = {"loss": loss.detach().float().reshape(())}
        if isinstance(norm, Tensor):
            values["logit_norm"] = norm.detach().float().to(loss.device).reshape(())
        if len(self.reference) < len(values):
            self._collect_reference(values)
        self._track_peaks(values)
        diverged = self._diverged_on_device(values)
        if not trainer.strategy.reduce_boolean_decision(bool(diverged), all=False):
            return
        message = self.describe(trainer, {k: float(v) for k, v in values.items()})
        if self.action == "stop":
            raise DivergenceError(message)
        if not self._warned:
            rank_zero_warn(message + " (DivergenceMonitor.action: warn, training goes on)")
            self._warned = True

    @property
    def peak_growth(self) -> dict[str, float]:
        """The largest ``value / reference`` seen so far for ``"loss"`` and ``"logit_norm"`` (where measured)."""
        return {name: float(peak) for name, peak in self._peak.items()}

    def state_dict(self) -> dict[str, Any]:
        # The early values too: a run resumed before the reference is complete completes it as an uninterrupted one.
        early = {name: list(values) for name, values in self._early.items()}
        return {"reference": dict(self.reference), "early": early, "peak_growth": self.peak_growth}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = {str(k): float(v) for k, v in state_dict.get("reference", {}).items()}
        self._early.update({str(k): [float(x) for x in v] for k, v in state_dict.get("early", {}).items()})
        self._peak = {str(k): torch.tensor(float(v)) for k, v in state_dict.get("peak_growth", {}).items()}

    # ------------------------------------------------------------------------------------------------ checks
    def _collect_reference(self, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            if name in self.reference:
                continue
            early = self._early[name]
            value = float(value)
            if math.isfinite(value):
                early.append(value)
            if len(early) >= self.reference_steps:
                self.reference[name] = statistics.median(early)

    def _track_peaks(self, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            if name not in self.reference or self.reference[name] == 0:
                continue
            ratio = value / abs(self.reference[name])
            peak = self._peak.get(name)
            self._peak[name] = ratio if peak is None else torch.maximum(peak.to(ratio.device), ratio)

    def _bound(self, name: str) -> float:
        growth = self.max_loss_growth if name == "loss" else self.max_logit_norm_growth
        return growth * abs(self.reference[name])

    def _diverged_on_device(self, values: dict[str, Tensor]) -> Tensor:
        diverged = ~torch.isfinite(values["loss"])
        for name, value in values.items():
            if name in self.reference:
                diverged = diverged | (value > self._bound(name))
        return diverged

    def describe(self, trainer: pl.Trainer, values: dict[str, float]) -> str:
        """The message of a divergence at the current step: what grew, every loss term, the cause, the fix."""
        step = self._step
        loss = values["loss"]
        if not math.isfinite(loss):
            what = f"the training loss is {loss} at step {step}"
        else:
            grown = [name for name in values if name in self.reference and values[name] > self._bound(name)]
            what = " and ".join(
                f"{'train/loss' if n == 'loss' else self.logit_norm_key} grew to {values[n]:.4g} at step {step}, "
                f"{values[n] / self.reference[n]:.0f}x its early value {self.reference[n]:.4g} (bound: "
                f"DivergenceMonitor.{'max_loss_growth' if n == 'loss' else 'max_logit_norm_growth'})"
                for n in grown
            )
        terms = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith("train/loss_") and isinstance(value, Tensor) and value.numel() == 1
        }
        listed = ", ".join(f"{k}={v:.4g}" for k, v in sorted(terms.items())) or "none logged"
        norm = values.get("logit_norm")
        lines = [
            f"Training diverged: {what}.",
            f"  loss terms: {listed}",
            f"  logit norm ({self.logit_norm_key}): {'not logged' if norm is None else f'{norm:.4g}'}",
            f"  likely cause: {self._likely_cause(trainer, loss)}",
            "  The last checkpoint on disk was written before this step. To only warn, set "
            "DivergenceMonitor.action: warn.",
        ]
        return "\n".join(lines)

    @staticmethod
    def _self_attention_losses(trainer: pl.Trainer) -> list[SelfAttentionLoss]:
        """The self-attention losses of the run: those inside the LightningModule (e.g. ``SelfTraining``'s
        ``self_attention``) and those of :class:`~uda_sam.callbacks.SelfAttentionLossCallback` callbacks."""
        losses = [m for m in trainer.lightning_module.modules() if isinstance(m, SelfAttentionLoss)]
        losses += [c.loss for c in trainer.callbacks if isinstance(c, SelfAttentionLossCallback)]
        return losses

    def _likely_cause(self, trainer: pl.Trainer, loss: float) -> str:
        """A self-attention loss whose last terms are not finite or, unweighted, exceed the rest of ``loss``; else
        the segmentation loss."""
        for attention in self._self_attention_losses(trainer):
            terms = [float(term) for term in attention.last_terms.values()]
            rest = loss - attention.weight * sum(terms)
            # A non-finite rest (the segmentation loss blew up) does not make the finite terms dominate.
            if not terms or (all(map(math.isfinite, terms)) and not sum(terms) > rest):
                continue
            advice = (
                "the residual target (8) pulls the logits towards P + SAM(P), a target that grows with them, and "
                "cross-entropy does not oppose a shift shared by all classes; "
                if attention.target == "residual"
                else ""
            )
            return (
                f"the self-attention terms dominate the loss (SelfAttentionLoss.weight={attention.weight}): "
                f"{advice}lower its weight (its stable range shrinks as the learning rate grows), lower the "
                "learning rate, or use target: attended (9); see the README's 'Watching a run'"
            )
        return (
            "the segmentation loss itself diverged: lower model.init_args.lr (or use a warm-up), check the labels "
            "and the input normalisation"
        )
