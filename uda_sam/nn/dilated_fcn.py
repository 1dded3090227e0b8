"""A small dilated fully convolutional network for quick runs on a CPU (the toy pair, tests, smoke runs).

Six 3x3 convolution blocks (BatchNorm, ReLU): two of stride 2, then dilations 1, 2, 4, 8 for context, and a 1x1
classifier; output stride 4. About 0.28 M parameters at the default width: a toy stage reaches its plateau in a
few minutes on two cores, where a ResNet-18 DeepLabV2 is still far from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from .network import SegmentationNetwork, check_images, check_size

__all__ = ["DilatedFCN"]

# (output channels as multiples of ``width``, stride, dilation) of the trunk's blocks.
_BLOCKS: tuple[tuple[int, int, int], ...] = ((1, 2, 1), (2, 2, 1), (2, 1, 1), (3, 1, 2), (3, 1, 4), (3, 1, 8))


def _block(in_channels: int, out_channels: int, stride: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DilatedFCN(SegmentationNetwork):
    """A small dilated FCN that meets the package's network contract (:class:`~uda_sam.nn.SegmentationNetwork`), so
    every task, callback and SAM variant runs on it.

    Args:
        num_classes: Output classes.
        width: Channels of the first block; the others have 2x and 3x as many.
        freeze_bn: Keep every BatchNorm layer in eval mode with its statistics and affine parameters frozen, as
            :class:`~uda_sam.nn.DeepLabV2` does with its ImageNet statistics. For a network started from
            ``weights``: its statistics then stay those it was trained with, whatever the mix of domains in a batch.
            (Trained, BatchNorm normalises a source batch and a target batch each with its own statistics, while
            its running statistics average the two: the network is then evaluated on the target with statistics
            it was never trained with.)
        weights: A trained model to start from, read by :meth:`load_weights`: a uda-sam checkpoint (``.ckpt``) or an
            exported state dict of a network of this class, class count and width.

    Raises:
        ValueError: On ``num_classes`` or ``width`` below 1, or a weights file that does not fit.
        FileNotFoundError: If the weights file does not exist.
    """

    output_stride: ClassVar[int] = 4

    def __init__(
        self, num_classes: int = 19, width: int = 32, freeze_bn: bool = False, weights: str | None = None
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes}")
        if width < 1:
            raise ValueError(f"width must be a positive integer; got {width}")
        self.num_classes = int(num_classes)
        self.width = int(width)
        self.freeze_bn = bool(freeze_bn)
        layers, channels = [], 3
        for multiple, stride, dilation in _BLOCKS:
            layers.append(_block(channels, multiple * self.width, stride, dilation))
            channels = multiple * self.width
        self.backbone = nn.Sequential(*layers)
        self.feature_channels: int = channels
        self.classifier = nn.Conv2d(channels, self.num_classes, 1)
        if weights is not None:
            self.load_weights(weights)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.requires_grad_(False)
        self.train()

    def extra_repr(self) -> str:
        """The settings a weights file must share with this network."""
        return f"num_classes={self.num_classes}, width={self.width}"

    def train(self, mode: bool = True) -> DilatedFCN:
        """Set train/eval mode; frozen BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Pre-upsample logits ``(B, num_classes, ceil(H/4), ceil(W/4))`` of normalised images ``(B, 3, H, W)``
        (and the classifier's input, ``(B, feature_channels, h, w)``, with ``return_features``)."""
        check_images(x)
        features = self.backbone(x)
        logits = self.classifier(features)
        return (logits, features) if return_features else logits

    def upsample_logits(self, logits: Tensor, size: tuple[int, int]) -> Tensor:
        """Bilinear upsampling (``align_corners=False``) of ``logits`` to ``size`` = (H, W)."""
        return F.interpolate(logits, size=check_size(size), mode="bilinear", align_corners=False)

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The 1x1 classifier's parameters; the trunk's trainable ones make :meth:`param_groups`' backbone group."""
        return self.classifier.parameters()
