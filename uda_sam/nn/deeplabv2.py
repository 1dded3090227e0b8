"""DeepLabV2 (dilated ResNet + atrous classifier), the segmentation network of the paper's main results."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import DilatedResNet, ResNetName

__all__ = ["AtrousClassifier", "DeepLabV2"]


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or not all(int(s) > 0 for s in size):
        raise ValueError(f"size must be a (height, width) pair of positive integers; got {size!r}")
    return int(size[0]), int(size[1])


def _check_image(x: Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W); got shape {tuple(x.shape)}")


class AtrousClassifier(nn.Module):
    """DeepLabV2's classifier: the sum of parallel 3x3 convolutions with dilations 6, 12, 18 and 24.

    Weights are initialised from N(0, 0.01) with zero bias, as in the DeepLab UDA code (AdaptSegNet/BDL).

    Args:
        in_channels: Channels of the input features.
        num_classes: Output channels.
        dilations: One 3x3 convolution per dilation (padding = dilation keeps the size).
    """

    def __init__(
        self, in_channels: int, num_classes: int, dilations: tuple[int, ...] = (6, 12, 18, 24)
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=d, dilation=d) for d in dilations
        )
        for conv in self.convs:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Tensor) -> Tensor:
        """``(B, in_channels, h, w)`` -> logits ``(B, num_classes, h, w)``."""
        out = self.convs[0](features)
        for conv in self.convs[1:]:
            out = out + conv(features)
        return out


class DeepLabV2(nn.Module):
    """DeepLabV2 on a dilated torchvision ResNet (output stride 8).

    ``forward`` returns the logits ``P`` before upsampling (the SAM input), of size ``(ceil(H/8), ceil(W/8))``;
    ``upsample_logits`` resizes them bilinearly with ``align_corners=True``.

    With ``freeze_bn=True`` (the default; the paper trains with batch size 1) every BatchNorm layer stays in eval mode
    with its affine parameters frozen (``requires_grad=False``), also after ``.train()``; running statistics never
    change.

    Args:
        num_classes: Output classes.
        backbone: ``"resnet101"`` (the paper), ``"resnet50"`` or ``"resnet18"`` (small runs).
        pretrained: ``None`` (random initialisation), ``"imagenet"`` (torchvision's ImageNet weights) or a path to
            a torchvision-layout ResNet state dict; applies to the backbone only.
        freeze_bn: Freeze BatchNorm as described above.

    Raises:
        ValueError: On an unknown backbone, ``num_classes < 1`` or a mismatching weights file.
        FileNotFoundError: If the weights file does not exist.
        RuntimeError: If the ImageNet weights cannot be downloaded.
    """

    def __init__(
        self,
        num_classes: int = 19,
        backbone: ResNetName = "resnet101",
        pretrained: str | None = None,
        freeze_bn: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes}")
        self.num_classes = int(num_classes)
        self.freeze_bn = bool(freeze_bn)
        self.backbone = DilatedResNet(backbone, pretrained=pretrained)
        self.feature_channels: int = self.backbone.out_channels
        self.classifier = AtrousClassifier(self.feature_channels, self.num_classes)
        if self.freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    for param in module.parameters():
                        param.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> DeepLabV2:
        """Set train/eval mode; frozen BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Pre-upsample logits of images ``x`` ``(B, 3, H, W)``.

        Args:
            x: Normalised images.
            return_features: Also return the classifier's input (for the feature-layer SAM variant).

        Returns:
            Logits ``(B, num_classes, ceil(H/8), ceil(W/8))``, or ``(logits, features)`` with features
            ``(B, feature_channels, ceil(H/8), ceil(W/8))``.
        """
        _check_image(x)
        features = self.backbone(x)
        logits = self.classifier(features)
        return (logits, features) if return_features else logits

    def upsample_logits(self, logits: Tensor, size: tuple[int, int]) -> Tensor:
        """Bilinear upsampling (``align_corners=True``) of ``logits`` ``(B, C, h, w)`` to ``size`` = (H, W)."""
        return F.interpolate(logits, size=_check_size(size), mode="bilinear", align_corners=True)

    def param_groups(self, lr: float, classifier_lr_mult: float = 10.0) -> list[dict]:
        """Optimiser parameter groups: the backbone at ``lr``, the classifier at ``lr * classifier_lr_mult``.

        Only parameters with ``requires_grad`` are listed (frozen BatchNorm parameters are left out). Each group
        carries a ``"name"`` key (``"backbone"`` / ``"classifier"``) for logging.
        """
        return [
            {
                "name": "backbone",
                "params": [p for p in self.backbone.parameters() if p.requires_grad],
                "lr": lr,
            },
            {
                "name": "classifier",
                "params": [p for p in self.classifier.parameters() if p.requires_grad],
                "lr": lr * classifier_lr_mult,
            },
        ]
