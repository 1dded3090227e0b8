"""The self-attention loss of docs/METHOD.md (8)-(11) as a module: a frozen, pretrained SAM and the loss's options.

:class:`SelfAttentionLoss` is what both :class:`~uda_sam.tasks.SelfTraining` and the
:class:`~uda_sam.callbacks.SelfAttentionLossCallback` use; in plain PyTorch::

    loss_sa = SelfAttentionLoss("runs/gta5/sam_pretrain/sam.pt", weight=0.1, target="residual", domains="both")
    terms = loss_sa({"source": logits_s, "target": logits_t})
    loss = seg_s + seg_t + terms.total          # terms.terms: {"loss_sa_source": ..., "loss_sa_target": ...}

One domain's term is :func:`~uda_sam.nn.self_attention_loss` on the prediction layer (the logits ``P``), on the
feature layer (the classifier's input ``F``, with a SAM pretrained there), or their sum.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from uda_sam.checks import check_choice

from .losses import SelfAttentionDistance, SelfAttentionTarget, self_attention_loss
from .sam import SelfAttentionModule
from .sam_io import attention_warning, load_sam, read_attention_quality

__all__ = [
    "SelfAttentionDomains",
    "SelfAttentionLayer",
    "SelfAttentionLoss",
    "SelfAttentionTerms",
]

SelfAttentionDomains = Literal["both", "target"]
SelfAttentionLayer = Literal["prediction", "feature", "both"]

_EXPECTED_SAM = (
    "a path to an exported SAM file (sam.pt) / SAMPretraining checkpoint (.ckpt), or a SelfAttentionModule"
)


@dataclass(frozen=True)
class SelfAttentionTerms:
    """What :class:`SelfAttentionLoss` computed on one batch.

    Attributes:
        terms: The unweighted term ``L_sa(d)`` of each domain ``d``, named ``"loss_sa_<d>"``, in the order given.
        total: ``weight * sum(terms)``: what the self-attention loss adds to the training loss.
    """

    terms: dict[str, Tensor]
    total: Tensor


class SelfAttentionLoss(nn.Module):
    """``weight * sum_d L_sa(d)`` with a frozen, pretrained SAM, docs/METHOD.md (8)-(11).

    ``L_sa(d) = dist(P_d, sg(P_d + SAM(P_d)))`` (``target="residual"``, eq. 8) or ``dist(P_d, sg(SAM(P_d)))``
    (``"attended"``, eq. 9) for the logits ``P_d`` of domain ``d``, see :func:`~uda_sam.nn.self_attention_loss`;
    over the domains given (``domains="both"``, eq. 10) or over the target only (``"target"``, eq. 11).

    The SAMs are frozen: no gradient (``requires_grad=False``), eval mode whatever ``train()`` is called with, and the
    owner keeps them out of its optimiser. They are submodules of this module, so they follow it to a device and
    dtype, and a task that holds this module keeps them in its checkpoint (a callback that holds it does not). ``weight=0`` computes the
    terms without a graph: the owner logs them and adds nothing.

    Args:
        sam: The SAM of the prediction layer: the path (a ``str`` or ``os.PathLike``) of an exported SAM file
            (``sam.pt`` written by ``SAMPretraining``) or of a ``SAMPretraining`` checkpoint (``.ckpt``), or a
            :class:`~uda_sam.nn.SelfAttentionModule`; a
            ``SelfAttentionModule(num_classes, use_conv=False)`` is the "No Conv" ablation (no file needed).
            Required when ``layer`` is ``"prediction"`` or ``"both"``, ignored otherwise.
        weight: ``lambda``, the weight of the loss (the paper: 0.1 for DeepLabV2, 0.001 for FCN-8s).
        target: ``"residual"`` (eq. 8, target ``P + P_sa``) or ``"attended"`` (eq. 9, target ``P_sa``).
        domains: ``"both"`` (eq. 10: every domain given to :meth:`forward`) or ``"target"`` (eq. 11).
        distance: ``"l2"`` (the paper's), ``"kl"`` or ``"cosine"`` (Tab. A.5).
        layer: ``"prediction"`` (on ``P``), ``"feature"`` (on the classifier's input, with ``feature_sam``) or
            ``"both"`` (the sum of the two terms).
        feature_sam: The SAM of the feature layer (``SAMPretraining`` with ``layer: feature``), in the forms
            ``sam`` takes. Required when ``layer`` is ``"feature"`` or ``"both"``, ignored otherwise.

    Raises:
        ValueError: On an unknown choice, a negative weight, a missing SAM, a file that is not a SAM (or holds the
            SAM of the other layer), or a ``sam`` of another type.
        FileNotFoundError: If a SAM path does not exist.
    """

    def __init__(
        self,
        sam: str | SelfAttentionModule | None = None,
        weight: float = 0.1,
        target: SelfAttentionTarget = "residual",
        domains: SelfAttentionDomains = "both",
        distance: SelfAttentionDistance = "l2",
        layer: SelfAttentionLayer = "prediction",
        feature_sam: str | SelfAttentionModule | None = None,
    ) -> None:
        super().__init__()
        check_choice("SelfAttentionLoss.target", target, get_args(SelfAttentionTarget))
        check_choice("SelfAttentionLoss.domains", domains, get_args(SelfAttentionDomains))
        check_choice("SelfAttentionLoss.distance", distance, get_args(SelfAttentionDistance))
        check_choice("SelfAttentionLoss.layer", layer, get_args(SelfAttentionLayer))
        if not weight >= 0:
            raise ValueError(f"SelfAttentionLoss: weight must be >= 0, got {weight!r}")
        self.weight = float(weight)
        self.target: SelfAttentionTarget = target
        self.domains: SelfAttentionDomains = domains
        self.distance: SelfAttentionDistance = distance
        self.layer: SelfAttentionLayer = layer
        #: Where each SAM came from (a file, or "a SelfAttentionModule"), for messages.
        self.sources: dict[str, str] = {}
        #: The detached terms of the last :meth:`forward`, read by :class:`~uda_sam.callbacks.DivergenceMonitor`.
        self.last_terms: dict[str, Tensor] = {}
        #: Messages on SAM files whose measured attention is close to uniform; the owner shows them.
        self.attention_warnings: list[str] = []
        self.sam: SelfAttentionModule | None = None
        self.feature_sam: SelfAttentionModule | None = None
        if layer in ("prediction", "both"):
            self.sam = self._build("sam", sam, "prediction")
        if layer in ("feature", "both"):
            self.feature_sam = self._build("feature_sam", feature_sam, "feature")
        for frozen in self.frozen_sams():
            frozen.requires_grad_(False).eval()

    def _build(
        self,
        option: str,
        source: str | SelfAttentionModule | None,
        layer: Literal["prediction", "feature"],
    ) -> SelfAttentionModule:
        name = f"SelfAttentionLoss.{option}"
        if source is None:
            raise ValueError(
                f"{name} is required with layer={self.layer!r}: {_EXPECTED_SAM} pretrained on the {layer} layer "
                "(SelfAttentionModule(channels, use_conv=False) for the 'No Conv' ablation)"
            )
        if isinstance(source, SelfAttentionModule):
            self.sources[option] = f"the SelfAttentionModule passed as {option}"
            return source
        if not isinstance(source, (str, os.PathLike)):
            raise ValueError(f"{name} must be {_EXPECTED_SAM}, got {type(source).__name__}")
        self.sources[option] = str(source)
        sam = load_sam(source, layer=layer, option=name)
        for domain, figures in (read_attention_quality(source) or {}).items():
            warning = attention_warning(figures)
            if warning:
                self.attention_warnings.append(
                    f"{name}={source}: on the {domain} images measured at its pretraining, {warning}"
                )
        return sam

    def frozen_sams(self) -> list[SelfAttentionModule]:
        """The SAMs in use: the prediction layer's and/or the feature layer's."""
        return [sam for sam in (self.sam, self.feature_sam) if sam is not None]

    def check_network(self, num_classes: int, feature_channels: int | None) -> None:
        """Check that the SAMs take the network's logits (``num_classes``) / features (``feature_channels``).

        Raises:
            ValueError: On a SAM built for another number of channels, or a feature-layer loss on a network
                without ``feature_channels`` (``None``).
        """
        if self.feature_sam is not None and feature_channels is None:
            raise ValueError(
                f"SelfAttentionLoss: layer={self.layer!r} needs a network with feature_channels and "
                "forward(x, return_features=True)"
            )
        expected = (
            ("sam", self.sam, num_classes, "classes"),
            ("feature_sam", self.feature_sam, feature_channels, "feature channels"),
        )
        for option, sam, channels, what in expected:
            if sam is not None and sam.num_classes != channels:
                raise ValueError(
                    f"SelfAttentionLoss.{option}: the SAM in {self.sources[option]} was built for {sam.num_classes} "
                    f"input channels, but the network has {channels} {what}; use a SAM pretrained with the same "
                    "network output"
                )

    def train(self, mode: bool = True) -> SelfAttentionLoss:
        """Set the mode of this module; the frozen SAMs always stay in eval mode."""
        super().train(mode)
        for sam in self.frozen_sams():
            sam.eval()
        return self

    def term(self, logits: Tensor, features: Tensor | None = None) -> Tensor:
        """One domain's unweighted ``L_sa``: the prediction-layer term, the feature-layer term, or their sum.

        Args:
            logits: ``P``, the ``(B, C, h, w)`` pre-upsample logits.
            features: ``F``, the classifier's ``(B, C_F, h, w)`` input; needed when ``layer`` uses the feature layer.

        Raises:
            ValueError: On missing features for the feature layer, or inputs the SAMs do not take.
        """
        terms = []
        if self.sam is not None:
            terms.append(self_attention_loss(logits, self.sam, target=self.target, distance=self.distance))
        if self.feature_sam is not None:
            if features is None:
                raise ValueError(
                    f"SelfAttentionLoss with layer={self.layer!r} needs the classifier's input features"
                )
            terms.append(
                self_attention_loss(features, self.feature_sam, target=self.target, distance=self.distance)
            )
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    def forward(
        self, logits: Mapping[str, Tensor], features: Mapping[str, Tensor] | None = None
    ) -> SelfAttentionTerms:
        """The terms of the domains ``domains`` selects among those given, and their weighted sum.

        Args:
            logits: ``{domain: P_d}``, e.g. ``{"target": P_t, "source": P_s}``; with ``domains="target"`` only the
                ``"target"`` entry counts.
            features: ``{domain: F_d}`` for the feature layer.

        Returns:
            The unweighted terms ``{"loss_sa_<domain>": L_sa(d)}`` and ``total = weight * sum(terms)``.

        Raises:
            ValueError: When no domain is left to compute (e.g. ``domains="target"`` without a ``"target"`` entry).
        """
        chosen = [d for d in logits if self.domains == "both" or d == "target"]
        if not chosen:
            raise ValueError(
                f"SelfAttentionLoss with domains={self.domains!r} got logits of the domains {sorted(logits)}; "
                "pass the target logits as 'target'"
            )
        features = features or {}
        with torch.set_grad_enabled(self.weight > 0 and torch.is_grad_enabled()):
            terms = {f"loss_sa_{d}": self.term(logits[d], features.get(d)) for d in chosen}
            total = self.weight * sum(terms.values())
        assert isinstance(total, Tensor)
        self.last_terms = {name: term.detach() for name, term in terms.items()}
        return SelfAttentionTerms(terms=terms, total=total)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, target={self.target!r}, domains={self.domains!r}, distance={self.distance!r}, "
            f"layer={self.layer!r}"
        )
