"""Stages 0 and 2 of the method (Fig. 2b): self-training on source labels and target pseudo labels with a frozen SAM."""

from __future__ import annotations

from typing import Any, Literal, get_args

from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from uda_sam.checks import check_choice
from uda_sam.nn import SelfAttentionModule, self_attention_loss
from uda_sam.nn.losses import SelfAttentionDistance, SelfAttentionTarget
from uda_sam.nn.sam_io import attention_warning, load_sam, read_attention_quality, sam_config
from uda_sam.tasks.base import SegmentationTask

__all__ = ["SelfTraining"]

SA_TARGETS = get_args(SelfAttentionTarget)
SA_DOMAINS = ("both", "target")
SA_DISTANCES = get_args(SelfAttentionDistance)
SA_LAYERS = ("prediction", "feature", "both")


class SelfTraining(SegmentationTask):
    """A new network trained on source labels, target pseudo labels and the self-attention loss (docs/METHOD.md stage 2).

    Objective (docs/METHOD.md (10) / (11))::

        L = L_seg(s) + L_seg(t) + lambda_sa * (L_sa(s) + L_sa(t))    # sa_domains="both"
        L = L_seg(s) + L_seg(t) + lambda_sa * L_sa(t)                # sa_domains="target"

    with ``L_sa(d) = dist(P_d, sg(P_d + SAM(P_d)))`` (``sa_target="residual"``, eq. 8) or
    ``dist(P_d, sg(SAM(P_d)))`` (``"attended"``, eq. 9), see :func:`uda_sam.nn.self_attention_loss`. The SAM is
    frozen: no gradient, eval mode for the whole run, not in the optimiser. Settings of the paper's tables:

    - "No Pseudo" (stage 0): ``use_target=False, lambda_sa=0`` (source loss only).
    - "Pseudo-Only": ``lambda_sa=0``; target masks are the pseudo labels (255 where none).
    - "Ours": ``lambda_sa=0.1`` (DeepLabV2) / ``0.001`` (FCN-8s) with a pretrained SAM in ``sam_path``.
    - "No Conv": ``sam_use_conv=False`` (a parameter-free SAM, ``Q = P``; no file needed).

    With ``use_target=False`` and ``lambda_sa > 0`` the target images still pass through the network for the
    self-attention loss (which needs no labels), but no target cross-entropy is computed. Inference always uses the
    network alone. Batches are ``{"source": {...}, "target": {...}}`` as produced by ``UDADataModule``.

    Args:
        network: The network ``g`` (a new ImageNet initialisation in the paper).
        sam_path: The pretrained SAM: a file written by ``SAMPretraining.export_sam`` (``sam.pt``) or a
            ``SAMPretraining`` Lightning checkpoint (``.ckpt``). Required when ``lambda_sa > 0`` on the prediction
            layer, unless ``sam_use_conv`` is False.
        sam_use_conv: ``False`` is the "No Conv" ablation: a SAM without transform (no parameters, no file).
        lambda_sa: Weight of the self-attention loss; 0 = Pseudo-Only (the SAM is not built nor run).
        sa_target: ``"residual"`` (eq. 8, target ``P + P_sa``) or ``"attended"`` (eq. 9, target ``P_sa``).
        sa_domains: ``"both"`` (eq. 10) or ``"target"`` (eq. 11).
        sa_distance: ``"l2"`` (the paper's choice), ``"kl"`` or ``"cosine"`` (Tab. A.5).
        sa_layer: ``"prediction"`` (on ``P``), ``"feature"`` (on the classifier's input, with ``feature_sam_path``)
            or ``"both"`` (sum of the two terms).
        feature_sam_path: SAM pretrained on the feature layer (``SAMPretraining`` with ``layer: feature``).
        use_target: Train on the target pseudo labels (3); ``False`` = source only ("No Pseudo").
        use_source: Train on the source labels (1); ``False`` with ``use_target`` and the datamodule's
            ``target_labels: gt`` is the target-supervised "Oracle" upper bound.
        **kwargs: Optimiser, schedule and evaluation options of :class:`~uda_sam.tasks.SegmentationTask`.

    Raises:
        ValueError: On an unknown choice, a negative ``lambda_sa``, a missing ``sam_path``, a SAM built for another
            number of classes, or a file that is neither an exported SAM nor a SAM checkpoint.
        FileNotFoundError: If ``sam_path`` / ``feature_sam_path`` does not exist.
    """

    def __init__(
        self,
        network: nn.Module,
        sam_path: str | None = None,
        sam_use_conv: bool = True,
        lambda_sa: float = 0.1,
        sa_target: Literal["residual", "attended"] = "residual",
        sa_domains: Literal["both", "target"] = "both",
        sa_distance: Literal["l2", "kl", "cosine"] = "l2",
        sa_layer: Literal["prediction", "feature", "both"] = "prediction",
        feature_sam_path: str | None = None,
        use_target: bool = True,
        use_source: bool = True,
        **kwargs: Any,
    ) -> None:
        check_choice("sa_target", sa_target, SA_TARGETS)
        check_choice("sa_domains", sa_domains, SA_DOMAINS)
        check_choice("sa_distance", sa_distance, SA_DISTANCES)
        check_choice("sa_layer", sa_layer, SA_LAYERS)
        if not (use_source or use_target):
            raise ValueError("use_source and use_target are both False: there is nothing to train on")
        if not lambda_sa >= 0:
            raise ValueError(f"lambda_sa must be >= 0 (0 = Pseudo-Only), got {lambda_sa!r}")
        super().__init__(network, **kwargs)
        self.lambda_sa = float(lambda_sa)
        self.sa_target: SelfAttentionTarget = sa_target
        self.sa_domains = sa_domains
        self.sa_distance: SelfAttentionDistance = sa_distance
        self.sa_layer = sa_layer
        self.use_target = bool(use_target)
        self.use_source = bool(use_source)

        self.sam: SelfAttentionModule | None = None
        self.feature_sam: SelfAttentionModule | None = None
        if self.lambda_sa == 0 and (sam_path or feature_sam_path):
            rank_zero_warn(
                "lambda_sa=0 (Pseudo-Only): the SAM is not used, sam_path/feature_sam_path are ignored"
            )
        if self.lambda_sa > 0:
            if sa_layer in ("prediction", "both"):
                self.sam = self._build_sam(
                    sam_path, "sam_path", int(network.num_classes), "prediction", sam_use_conv
                )
            if sa_layer in ("feature", "both"):
                if not hasattr(network, "feature_channels"):
                    raise ValueError(
                        f"sa_layer={sa_layer!r} needs a network with feature_channels and forward(x, return_features=True)"
                    )
                self.feature_sam = self._build_sam(
                    feature_sam_path,
                    "feature_sam_path",
                    int(network.feature_channels),
                    "feature",
                    sam_use_conv,
                )
        for sam in self._frozen_sams():
            sam.requires_grad_(False)
            sam.eval()

    @staticmethod
    def _build_sam(
        path: str | None, option: str, channels: int, layer: Literal["prediction", "feature"], use_conv: bool
    ) -> SelfAttentionModule:
        if not use_conv:
            if path is not None:
                raise ValueError(
                    f"sam_use_conv=False (No Conv) builds a parameter-free SAM; remove {option}={path!r}"
                )
            return SelfAttentionModule(channels, use_conv=False)
        if path is None:
            raise ValueError(
                f"lambda_sa > 0 on the {layer} layer needs {option}: an exported SAM file (sam.pt) or a "
                "SAMPretraining checkpoint (.ckpt); or set sam_use_conv: false (No Conv) or lambda_sa: 0 (Pseudo-Only)"
            )
        sam = load_sam(path, expected_channels=channels, layer=layer, option=option)
        for domain, figures in (read_attention_quality(path) or {}).items():
            warning = attention_warning(figures)
            if warning:
                rank_zero_warn(
                    f"{option}={path}: on the {domain} images measured at its pretraining, {warning}"
                )
        return sam

    def _frozen_sams(self) -> list[SelfAttentionModule]:
        return [sam for sam in (self.sam, self.feature_sam) if sam is not None]

    def kept_in_eval(self) -> list[nn.Module]:
        """The network's modules kept in eval mode and the frozen SAMs' (see ``SegmentationTask``)."""
        return super().kept_in_eval() + [module for sam in self._frozen_sams() for module in sam.modules()]

    def train(self, mode: bool = True) -> SelfTraining:
        """Set the train/eval mode of the network; the frozen SAMs always stay in eval mode."""
        super().train(mode)
        for sam in self._frozen_sams():
            sam.eval()
        return self

    def self_attention_term(self, logits: Tensor, features: Tensor | None) -> Tensor:
        """``L_sa`` of one domain: the prediction-layer term, the feature-layer term, or their sum."""
        terms = []
        if self.sam is not None:
            terms.append(
                self_attention_loss(logits, self.sam, target=self.sa_target, distance=self.sa_distance)
            )
        if self.feature_sam is not None:
            assert features is not None
            terms.append(
                self_attention_loss(
                    features, self.feature_sam, target=self.sa_target, distance=self.sa_distance
                )
            )
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    def _run(self, image: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.feature_sam is not None:
            logits, features = self.network(image, return_features=True)
            return logits, features
        return self.network(image), None

    def compute_losses(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """The objective (10) / (11) of one batch, without logging (usable outside a ``Trainer``).

        Returns:
            ``(total, terms, logits)``: the total loss, each term by its name (``loss_seg_source``,
            ``loss_seg_target``, ``loss_sa_target``, ``loss_sa_source``), and the logits whose scale is logged
            (the target's when the step computes them, else the source's).
        """
        source, target = self.split_batch(batch)
        terms: dict[str, Tensor] = {}
        logits_s = features_s = logits_t = None
        if self.use_source:
            logits_s, features_s = self._run(source["image"])
            terms["loss_seg_source"] = self.segmentation_loss(logits_s, source["mask"])
        if self.use_target or self.lambda_sa > 0:
            if target is None:
                raise ValueError(
                    "SelfTraining with use_target=True or lambda_sa > 0 needs batches {'source': ..., 'target': ...} "
                    "(use uda_sam.data.UDADataModule)"
                )
            logits_t, features_t = self._run(target["image"])
            if self.use_target:
                terms["loss_seg_target"] = self.segmentation_loss(logits_t, target["mask"])
            if self.lambda_sa > 0:
                terms["loss_sa_target"] = self.self_attention_term(logits_t, features_t)
                if self.sa_domains == "both" and logits_s is not None:
                    terms["loss_sa_source"] = self.self_attention_term(logits_s, features_s)
        total = sum(v for k, v in terms.items() if k.startswith("loss_seg"))
        attention = [v for k, v in terms.items() if k.startswith("loss_sa")]
        if attention:
            total = total + self.lambda_sa * sum(attention)
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
        """Also record the frozen SAMs' configuration (the checkpoint can then serve as a ``sam_path``)."""
        super().on_save_checkpoint(checkpoint)
        configs = {}
        if self.sam is not None:
            configs["sam"] = sam_config(self.sam, "prediction")
        if self.feature_sam is not None:
            configs["feature_sam"] = sam_config(self.feature_sam, "feature")
        if configs:
            checkpoint["sam_config"] = configs

    @classmethod
    def prediction_overrides(cls) -> dict[str, Any]:
        """No self-attention loss: the network alone predicts, without the frozen SAMs or their files."""
        return {"lambda_sa": 0.0, "sam_path": None, "feature_sam_path": None}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the schedule (see ``SegmentationTask``); a prediction by a task built without the frozen SAMs
        (:meth:`prediction_overrides`) leaves their weights in the checkpoint aside."""
        super().on_load_checkpoint(checkpoint)
        if self._trainer is None or self.trainer.state.fn != TrainerFn.PREDICTING:
            return
        state = checkpoint["state_dict"]
        for name, sam in (("sam", self.sam), ("feature_sam", self.feature_sam)):
            if sam is None:
                for key in [key for key in state if key.startswith(f"{name}.")]:
                    del state[key]
