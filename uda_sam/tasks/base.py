"""The base LightningModule: a segmentation network, its optimiser and schedule, validation, test and predict."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric

from uda_sam.checks import check_choice
from uda_sam.data.labels import CLASS_NAMES, CLASS_SUBSETS, NUM_CLASSES
from uda_sam.evaluation.metrics import SegmentationMetrics, format_iou_table
from uda_sam.media import (
    ValidationExample,
    find_wandb_logger,
    log_examples,
    log_iou_table,
    make_example,
)
from uda_sam.nn import SegmentationNetwork, logit_norm, segmentation_loss
from uda_sam.tasks.optim import (
    LR_SCHEDULES,
    OPTIMIZERS,
    LRSchedule,
    OptimizerName,
    build_optimizer,
    lr_factor,
    trainable_param_groups,
)

__all__ = ["ClassSubset", "SegmentationTask"]

ClassSubset = Literal["19", "16", "13"]


def _random_state() -> dict[str, Tensor]:
    """The global torch generators' state: the CPU one and, once CUDA is in use, the current device's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_random_state(state: dict[str, Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _check_positive(option: str, value: float, allow_zero: bool = False) -> None:
    if not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{option} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


class SegmentationTask(LightningModule):
    """A segmentation network trained on labelled source batches and evaluated on Cityscapes val.

    Used directly, it trains with the source cross-entropy (1) only; :class:`~uda_sam.tasks.SelfTraining` and
    :class:`~uda_sam.tasks.SAMPretraining` add the target and self-attention terms. Subclasses share:

    - **Optimisation**: SGD (momentum, weight decay) or Adam over ``network.param_groups(lr, classifier_lr_mult)``,
      with a per-step ``LambdaLR``: ``"poly"`` ``(1 - s/T)^power`` (DeepLabV2), ``"step"`` ``gamma^(s // step_size)``
      (FCN-8s) or ``"constant"``, where ``s = global_step - schedule_origin`` counts the steps since the schedule
      (re)started and ``T`` is ``schedule_steps`` (default: ``trainer.max_steps``).
    - **Generations**: :meth:`start_new_generation` restores the network's initial weights (a CPU copy taken at
      construction: the ImageNet or random initialisation), clears the optimiser state (momentum) and restarts the
      schedule; ``schedule_origin`` and ``schedule_steps`` are saved in checkpoints so that resuming continues the
      same schedule. Resuming rebuilds the initial weights by constructing the network again, which is exact for
      ``pretrained="imagenet"`` and for a seeded random initialisation.
    - **Validation/test**: logits upsampled (``network.upsample_logits``) to the mask size (full 2048x1024 for
      Cityscapes val by default), argmax, confusion matrix summed across processes; logs ``{stage}/mIoU`` (the
      first of ``val_class_subsets``), ``{stage}/mIoU_<subset>`` and ``{stage}/iou/<class>``; with a
      ``WandbLogger``, also a per-class IoU table and ``num_val_images_logged`` images with ground-truth and
      prediction masks (rank 0).
    - **Predict**: ``{"name": [...], "pred": uint8 (B, H, W) trainIds}`` at the mask size (the original
      resolution with ``data.val_label_size: full``); see :class:`uda_sam.callbacks.PredictionWriter`.
    - **Checkpoints** hold, besides what Lightning saves (the task's arguments, the data module's), the network's
      configuration :attr:`network_config` when it is known: ``uda-sam predict --ckpt_path`` rebuilds the task
      from them alone (:meth:`prediction_overrides` says what a prediction does without).

    Args:
        network: The segmentation network: a :class:`~uda_sam.nn.SegmentationNetwork` (``DeepLabV2``, ``FCN8s``,
            ``DilatedFCN`` or one of the user's own that implements the contract).
        optimizer: ``"sgd"`` (DeepLabV2 in the paper) or ``"adam"`` (FCN-8s).
        lr: Initial learning rate of the backbone.
        momentum: SGD momentum.
        weight_decay: Weight decay (SGD and Adam).
        classifier_lr_mult: Learning-rate multiplier of the classifier (and of a trained SAM).
        betas: Adam coefficients.
        lr_schedule: ``"poly"``, ``"step"`` or ``"constant"``.
        poly_power: Exponent of the poly schedule.
        step_size: Steps between decays of the step schedule.
        step_gamma: Decay factor of the step schedule.
        schedule_steps: Horizon ``T`` of the poly schedule; ``None`` uses ``trainer.max_steps``.
        val_class_subsets: Class subsets to report: ``"19"`` (GTA5), ``"16"`` and ``"13"`` (SYNTHIA). The first
            one is logged as ``val/mIoU``, the metric checkpoints monitor.
        num_val_images_logged: Validation images sent to W&B at each validation (0 = none).
    """

    def __init__(
        self,
        network: SegmentationNetwork,
        optimizer: OptimizerName = "sgd",
        lr: float = 2.5e-4,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        classifier_lr_mult: float = 10.0,
        betas: tuple[float, float] = (0.9, 0.99),
        lr_schedule: LRSchedule = "poly",
        poly_power: float = 0.9,
        step_size: int = 50000,
        step_gamma: float = 0.1,
        schedule_steps: int | None = None,
        val_class_subsets: Sequence[ClassSubset] = ("19",),
        num_val_images_logged: int = 4,
    ) -> None:
        super().__init__()
        if not isinstance(network, SegmentationNetwork):
            raise ValueError(
                f"network must be a uda_sam.nn.SegmentationNetwork (e.g. uda_sam.nn.DeepLabV2, or a subclass of "
                f"SegmentationNetwork that implements forward, upsample_logits and classifier_parameters); got "
                f"{type(network).__module__}.{type(network).__qualname__}"
            )
        if int(network.num_classes) != NUM_CLASSES:
            raise ValueError(
                f"network.num_classes must be {NUM_CLASSES} (the Cityscapes trainIds), got {network.num_classes}"
            )
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
        _check_positive("lr", lr)
        _check_positive("classifier_lr_mult", classifier_lr_mult)
        _check_positive("momentum", momentum, allow_zero=True)
        _check_positive("weight_decay", weight_decay, allow_zero=True)
        _check_positive("step_size", step_size)
        if schedule_steps is not None:
            _check_positive("schedule_steps", schedule_steps)
        subsets = [str(s) for s in val_class_subsets]
        if not subsets:
            raise ValueError(f"val_class_subsets must name at least one of {sorted(CLASS_SUBSETS)}")
        for subset in subsets:
            check_choice("val_class_subsets", subset, get_args(ClassSubset))
        _check_positive("num_val_images_logged", num_val_images_logged, allow_zero=True)
        # Modules are saved in the state_dict; keeping them out of hparams keeps checkpoints loadable with
        # weights_only=True.
        self.save_hyperparameters(ignore=["network"])

        self.network = network
        self.optimizer_name: OptimizerName = optimizer
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.classifier_lr_mult = float(classifier_lr_mult)
        self.betas = (float(betas[0]), float(betas[1]))
        self.lr_schedule: LRSchedule = lr_schedule
        self.poly_power = float(poly_power)
        self.step_size = int(step_size)
        self.step_gamma = float(step_gamma)
        self.schedule_steps: int | None = schedule_steps
        self.schedule_origin: int = 0
        self.val_class_subsets: list[str] = subsets
        self.num_val_images_logged = int(num_val_images_logged)

        # The initialisation every generation restarts from (CPU copy, not part of the state_dict).
        self._initial_network_state = {
            k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()
        }
        self.val_metrics = SegmentationMetrics(num_classes=NUM_CLASSES)
        self.test_metrics = self.val_metrics.clone()
        # Image-weighted mean losses: exact under DDP even when processes hold different numbers of images.
        self.eval_losses = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        self._examples: list[ValidationExample] = []
        #: The network's ``{"class_path": ..., "init_args": {...}}`` as a config gives it (plain YAML values), saved
        #: in checkpoints so that ``uda-sam predict --ckpt_path`` can rebuild the network. The ``uda-sam`` commands
        #: set it; a task built in Python from a network object has none unless it is set by hand.
        self.network_config: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, image: Tensor) -> Tensor:
        """Pre-upsample logits ``(B, C, h, w)`` used for evaluation and prediction."""
        return self.network(image)

    def segmentation_loss(self, logits: Tensor, mask: Tensor) -> Tensor:
        """Cross-entropy (1)/(3) of ``network.upsample_logits(logits)`` at the mask size against ``mask``."""
        return segmentation_loss(self.network.upsample_logits(logits, tuple(mask.shape[-2:])), mask)

    @staticmethod
    def split_batch(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """``(source, target)`` of a training batch; a plain sample batch counts as source only."""
        if "source" in batch:
            return batch["source"], batch.get("target")
        return batch, None

    def log_losses(
        self, total: Tensor, terms: dict[str, Tensor], batch_size: int, logits: Tensor | None = None
    ) -> None:
        """Log ``train/loss`` (the total), each term as ``train/<name>``, each group's ``train/lr_<group>`` and,
        given the step's ``logits``, their scale as ``train/logit_norm`` (see :func:`uda_sam.nn.logit_norm`)."""
        self.log(
            "train/loss", total.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size
        )
        values = {f"train/{name}": value.detach() for name, value in terms.items()}
        if logits is not None:
            values["train/logit_norm"] = logit_norm(logits)
        self.log_dict(values, on_step=True, on_epoch=False, batch_size=batch_size)
        # Learning rates are Python floats: logging one makes a host-to-device copy, which waits for the GPU.
        # Log them only on the steps the logger writes: Lightning writes after the step where
        # (steps taken + 1) is a multiple of log_every_n_steps, and a value logged earlier would be written stale.
        if (
            self._trainer is not None
            and self.trainer.optimizers
            and (self.trainer.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0
        ):
            for index, group in enumerate(self.trainer.optimizers[0].param_groups):
                name = group.get("name", str(index))
                self.log(
                    f"train/lr_{name}",
                    float(group["lr"]),
                    on_step=True,
                    on_epoch=False,
                    batch_size=batch_size,
                )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Source cross-entropy (1) only (the "No Pseudo" objective)."""
        source, _ = self.split_batch(batch)
        logits = self.network(source["image"])
        loss = self.segmentation_loss(logits, source["mask"])
        self.log_losses(loss, {"loss_seg_source": loss}, batch_size=len(source["image"]), logits=logits)
        return loss

    # ------------------------------------------------------------------------------------ optimisation
    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups of the optimiser (subclasses add their own trainable modules)."""
        return list(self.network.param_groups(self.lr, self.classifier_lr_mult))

    @property
    def schedule_horizon(self) -> int | None:
        """Horizon of the poly schedule: ``schedule_steps``, else ``trainer.max_steps`` when set."""
        if self.schedule_steps is not None:
            return int(self.schedule_steps)
        if self._trainer is not None and self.trainer.max_steps is not None and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        return None

    @property
    def schedule_step(self) -> int:
        """Optimiser steps since the learning-rate schedule (re)started."""
        return max(0, int(self.global_step) - int(self.schedule_origin))

    def current_lr_factor(self) -> float:
        """The multiplier of the initial learning rates at the current step."""
        return lr_factor(
            self.schedule_step,
            self.lr_schedule,
            total_steps=self.schedule_horizon,
            power=self.poly_power,
            step_size=self.step_size,
            gamma=self.step_gamma,
        )

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimiser and a ``LambdaLR`` stepped after every optimiser step.

        Raises:
            ValueError: With ``lr_schedule="poly"`` and neither ``schedule_steps`` nor ``trainer.max_steps``.
        """
        groups = trainable_param_groups(self.optimizer_param_groups())
        optimizer = build_optimizer(
            groups,
            self.optimizer_name,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            betas=self.betas,
        )
        self.current_lr_factor()  # fail now, with a clear message, if the schedule has no horizon

        # The factor depends on global_step - schedule_origin, not on the scheduler's own counter, so that a
        # generation restart or a resumed run lands on the same value as an uninterrupted run.
        def factor(_: int) -> float:
            return self.current_lr_factor()

        scheduler = LambdaLR(optimizer, lr_lambda=factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def start_new_generation(
        self, reinitialize_network: bool = True, schedule_steps: int | None = None
    ) -> None:
        """Start a new self-training generation at the current step.

        Restores the network's initial weights (unless ``reinitialize_network`` is False), clears the optimiser
        state (momentum / Adam moments), sets ``schedule_origin = global_step`` and resets the learning rates to
        the start of the schedule. Call it on every process (e.g. from a callback's ``on_train_batch_start``).

        Args:
            reinitialize_network: Reload the initial (ImageNet / random) weights, as the paper does for every generation.
            schedule_steps: New poly horizon from now on (e.g. steps per generation); ``None`` keeps the current one.
        """
        if schedule_steps is not None:
            _check_positive("schedule_steps", schedule_steps)
            self.schedule_steps = int(schedule_steps)
        if reinitialize_network:
            self.network.load_state_dict(self._initial_network_state)
        self.schedule_origin = int(self.global_step)
        if self._trainer is None:
            return
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
        factor = self.current_lr_factor()
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base_lr * factor

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the schedule origin and horizon, the random generators' state and the network's configuration
        (:attr:`network_config`, when known) next to the weights."""
        checkpoint["uda_sam"] = {
            "schedule_origin": self.schedule_origin,
            "schedule_steps": self.schedule_steps,
            "rng": _random_state(),
        }
        if self.network_config is not None:
            checkpoint["uda_sam"]["network"] = self.network_config

    @classmethod
    def prediction_overrides(cls) -> dict[str, Any]:
        """Arguments that rebuild this task for a prediction from a checkpoint, replacing those it was trained with.

        A prediction runs the trained modules only, whose weights come from the checkpoint: what only training
        reads (files of frozen helper modules, their losses) is switched off here. None for this class.
        """
        return {}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore what :meth:`on_save_checkpoint` stored.

        The random state (what dropout draws) is restored too, so that a resumed fit draws what an uninterrupted
        one would: the data loaders use generators of their own, so nothing else draws from it before training.
        """
        state = checkpoint.get("uda_sam", {})
        self.schedule_origin = int(state.get("schedule_origin", 0))
        self.schedule_steps = state.get("schedule_steps", self.schedule_steps)
        if "rng" in state:
            _set_random_state(state["rng"])

    # ------------------------------------------------------------------------------- eval-mode modules
    def kept_in_eval(self) -> list[nn.Module]:
        """The modules this task keeps in eval mode on purpose while it trains.

        Those the network's own ``train()`` keeps there (e.g. the frozen BatchNorm of a DeepLabV2 with
        ``freeze_bn``); subclasses add theirs (the frozen SAM of :class:`~uda_sam.tasks.SelfTraining`).
        """
        if not self.network.training:
            return []
        return [module for module in self.network.modules() if not module.training]

    def on_fit_start(self) -> None:
        """Keep Lightning's "module(s) in eval mode" warning for modules in eval mode by mistake only."""
        kept = self.kept_in_eval()
        in_eval = [module for module in self.modules() if not module.training]
        if kept and len(in_eval) == len(kept):
            # Lightning's fit loop warns, when training starts, about every module in eval mode at that moment.
            # Here all of them are kept in eval on purpose (frozen BatchNorm, the frozen SAM): nothing to do for
            # the user. The filter matches this count only: any other module left in eval still warns.
            warnings.filterwarnings(
                "ignore",
                message=rf"Found {len(kept)} module\(s\) in eval mode at the start of training",
                category=PossibleUserWarning,
            )

    # ---------------------------------------------------------------------------------- evaluation
    def _evaluate_batch(
        self, batch: dict[str, Any], metrics: SegmentationMetrics, stage: str
    ) -> tuple[Tensor, Tensor]:
        image, mask = batch["image"], batch["mask"]
        # Upsampled in float32 (a no-op at 32-bit precision): the scores, the loss and the analyses that read
        # these logits (EntropyAnalysisCallback) see exact probabilities.
        logits = self.network.upsample_logits(self(image).float(), tuple(mask.shape[-2:]))
        preds = logits.argmax(dim=1)
        metrics.update(preds, mask)
        self.eval_losses[stage].update(segmentation_loss(logits, mask), weight=len(image))
        self.log(f"{stage}/loss", self.eval_losses[stage], on_step=False, on_epoch=True)
        return logits, preds

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Accumulate the confusion matrix (and keep a few images for W&B on rank 0).

        Returns:
            ``{"logits": (B, C, H, W) float32 logits at the mask size, "preds": (B, H, W)}``, for callbacks'
            ``on_validation_batch_end`` (e.g. :class:`~uda_sam.callbacks.EntropyAnalysisCallback`).
        """
        logits, preds = self._evaluate_batch(batch, self.val_metrics, "val")
        if self._keep_examples():
            normalization = getattr(self.trainer.datamodule, "normalization", "imagenet")
            for i in range(len(preds)):
                if len(self._examples) >= self.num_val_images_logged:
                    break
                self._examples.append(
                    make_example(
                        batch["name"][i], batch["image"][i], batch["mask"][i], preds[i], normalization
                    )
                )
        return {"logits": logits, "preds": preds}

    def _keep_examples(self) -> bool:
        return (
            self.num_val_images_logged > 0
            and len(self._examples) < self.num_val_images_logged
            and self._trainer is not None
            and not self.trainer.sanity_checking
            and self.trainer.is_global_zero
            and find_wandb_logger(self.trainer) is not None
        )

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Accumulate the test confusion matrix."""
        self._evaluate_batch(batch, self.test_metrics, "test")

    def _end_evaluation(self, metrics: SegmentationMetrics, stage: str) -> None:
        scores = metrics.compute()  # summed over processes: every rank gets the same numbers
        metrics.reset()
        values: dict[str, Tensor] = {}
        for index, subset in enumerate(self.val_class_subsets):
            if index == 0:
                values[f"{stage}/mIoU"] = scores[f"mIoU_{subset}"]
            values[f"{stage}/mIoU_{subset}"] = scores[f"mIoU_{subset}"]
        for c, name in enumerate(CLASS_NAMES):
            values[f"{stage}/iou/{name}"] = scores["iou"][c]
        self.log_dict(values, sync_dist=True)

        trainer = self.trainer
        if trainer.sanity_checking:
            self._examples.clear()
            return
        if trainer.state.fn in ("validate", "test"):
            for subset in self.val_class_subsets:
                rank_zero_info(
                    f"\n{stage} IoU (%), {subset} classes:\n{format_iou_table(scores['iou'], subset=subset)}"
                )
        logger = find_wandb_logger(trainer)
        if logger is not None and trainer.is_global_zero:
            log_iou_table(
                logger, f"{stage}/iou_table", scores["iou"], self.val_class_subsets, step=self.global_step
            )
            if stage == "val":
                log_examples(logger, "val/predictions", self._examples, step=self.global_step)
        self._examples.clear()

    def on_validation_epoch_end(self) -> None:
        """Log the validation scores (and W&B media)."""
        self._end_evaluation(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        """Log the test scores."""
        self._end_evaluation(self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Predicted trainIds at the size of the batch's masks (the original resolution by default).

        Returns:
            ``{"name": list[str], "pred": uint8 (B, H, W) tensor on CPU}``.
        """
        image = batch["image"]
        size = tuple(batch["mask"].shape[-2:]) if "mask" in batch else tuple(image.shape[-2:])
        logits = self.network.upsample_logits(self(image), size)
        return {"name": list(batch["name"]), "pred": logits.argmax(dim=1).to(torch.uint8).cpu()}
