"""DeepLabV2 (dilated ResNet + atrous classifier), the segmentation network of the paper's main results."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import ClassVar, get_args

import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import DilatedResNet, ResNetName
from .caffe_resnet import CaffeResNet
from .deeplabv2_files import load_deeplab_init, load_deeplab_state_dict
from .network import SegmentationNetwork, Style, check_images, check_size

__all__ = ["ASPP_DILATIONS", "AtrousClassifier", "CaffeAtrousClassifier", "DeepLabV2"]


#: Dilations (= paddings) of DeepLabV2's four atrous branches.
ASPP_DILATIONS: tuple[int, ...] = (6, 12, 18, 24)


def _atrous_branches(in_channels: int, num_classes: int, dilations: tuple[int, ...]) -> nn.ModuleList:
    # N(0, 0.01) weights and zero bias, as in the DeepLab UDA code (AdaptSegNet/BDL).
    convs = nn.ModuleList(
        nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=d, dilation=d) for d in dilations
    )
    for conv in convs:
        nn.init.normal_(conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(conv.bias)
    return convs


def _sum_branches(convs: nn.ModuleList, features: Tensor) -> Tensor:
    out = convs[0](features)
    for conv in convs[1:]:
        out = out + conv(features)
    return out


class AtrousClassifier(nn.Module):
    """DeepLabV2's classifier: the sum of parallel 3x3 convolutions with dilations 6, 12, 18 and 24.

    Weights are initialised from N(0, 0.01) with zero bias, as in the DeepLab UDA code (AdaptSegNet/BDL).
    State-dict keys are ``convs.{i}.weight`` / ``convs.{i}.bias``.

    Args:
        in_channels: Channels of the input features.
        num_classes: Output channels.
        dilations: One 3x3 convolution per dilation (padding = dilation keeps the size).
    """

    def __init__(
        self, in_channels: int, num_classes: int, dilations: tuple[int, ...] = ASPP_DILATIONS
    ) -> None:
        super().__init__()
        self.convs = _atrous_branches(in_channels, num_classes, dilations)

    def forward(self, features: Tensor) -> Tensor:
        """``(B, in_channels, h, w)`` -> logits ``(B, num_classes, h, w)``."""
        return _sum_branches(self.convs, features)


class CaffeAtrousClassifier(nn.Module):
    """The same classifier under the published code's names: ``conv2d_list.{i}`` (its ``Classifier_Module``).

    Used by ``DeepLabV2(style="caffe")``, so that a published head loads under its own keys and a file of one
    style never loads silently into the other.

    Args:
        in_channels: Channels of the input features.
        num_classes: Output channels.
        dilations: One 3x3 convolution per dilation (padding = dilation keeps the size).
    """

    def __init__(
        self, in_channels: int, num_classes: int, dilations: tuple[int, ...] = ASPP_DILATIONS
    ) -> None:
        super().__init__()
        self.conv2d_list = _atrous_branches(in_channels, num_classes, dilations)

    def forward(self, features: Tensor) -> Tensor:
        """``(B, in_channels, h, w)`` -> logits ``(B, num_classes, h, w)``."""
        return _sum_branches(self.conv2d_list, features)


class DeepLabV2(SegmentationNetwork):
    """DeepLabV2: a dilated ResNet (output stride 8) and the atrous classifier, in two styles.

    - ``style="pytorch"`` (the default): torchvision's ResNet (stride on the 3x3 convolution), ``layer3`` /
      ``layer4`` dilated 2 / 4; reads torchvision files and downloads torchvision's ImageNet weights. Keys:
      ``backbone.*`` (torchvision's names), ``classifier.convs.{i}.*``.
    - ``style="caffe"``: the DeepLab ResNet of the UDA literature (AdaptSegNet, ADVENT, BDL, FDA, CRST; see
      :mod:`uda_sam.nn.caffe_resnet`), which reads the DeepLab init files and the published trained models, with
      their Caffe normalisation (BGR, 0-255, mean subtracted: ``data.normalization: caffe``). Keys: ``backbone.*``
      (the published names: ``conv1``, ``layer1.0.conv1``, ...), ``classifier.conv2d_list.{i}.*``.

    ``forward`` returns the logits ``P`` before upsampling (the SAM input): ``(ceil(H/8), ceil(W/8))`` for the
    pytorch style, ``ceil((floor(ceil(H/2)/2) + 1) / 2)`` rows (65 x 129 for 512 x 1024) for the caffe style;
    ``upsample_logits`` resizes them bilinearly with ``align_corners=True``.

    With ``freeze_bn=True`` (the default; the paper trains with batch size 1) every BatchNorm layer stays in eval mode
    with its affine parameters frozen (``requires_grad=False``), also after ``.train()``; running statistics never
    change.

    Args:
        num_classes: Output classes.
        backbone: ``"resnet101"`` (the paper), ``"resnet50"`` or, for the pytorch style only, ``"resnet18"``
            (small runs).
        pretrained: Initialisation. ``None``: random. Pytorch style: ``"imagenet"`` (torchvision's ImageNet
            weights) or a path to a torchvision-layout ResNet file, for the backbone. Caffe style: a path to a
            DeepLab init file (``DeepLab_resnet_pretrained_init-f81d91e8.pth`` of AdaptSegNet/BDL/FDA, ADVENT's
            ``DeepLab_resnet_pretrained_imagenet.pth``: keys under one extra prefix such as ``Scale.``); its
            ``layer5`` head is loaded into the classifier when it has ``num_classes`` outputs and dropped otherwise
            (the 21 PASCAL classes). Not read when ``weights`` is given.
        freeze_bn: Freeze BatchNorm as described above.
        style: ``"pytorch"`` or ``"caffe"``, as above (mmcv/mmseg's names for where a bottleneck's stride sits).
        aspp_branches: How many atrous branches (dilations 6, 12, 18, 24, in this order) the classifier sums:
            4 as in DeepLabV2; 2 for AdaptSegNet's checkpoints, whose classifier returns after its second branch.
        weights: A trained model to start from, read by :meth:`load_weights`: a published model (BDL/FDA/CRST
            single-level, AdaptSegNet/ADVENT multi-level; caffe style), a uda-sam Lightning checkpoint or exported
            state dict. Every weight comes from it.

    Raises:
        ValueError: On an unknown backbone or style, ``num_classes < 1``, ``aspp_branches`` outside 1..4, or a
            weights file of another layout, architecture or class count.
        FileNotFoundError: If a weights file does not exist.
        RuntimeError: If the ImageNet weights cannot be downloaded.
    """

    output_stride: ClassVar[int] = 8
    weights_files: ClassVar[str] = (
        "a DeepLabV2 weights file (a published model of AdaptSegNet, ADVENT, BDL, FDA or CRST, or an exported "
        "state dict)"
    )

    def __init__(
        self,
        num_classes: int = 19,
        backbone: ResNetName = "resnet101",
        pretrained: str | None = None,
        freeze_bn: bool = True,
        style: Style = "pytorch",
        aspp_branches: int = 4,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes}")
        if style not in get_args(Style):
            raise ValueError(f"style must be one of {list(get_args(Style))}; got {style!r}")
        if not isinstance(aspp_branches, int) or not 1 <= aspp_branches <= len(ASPP_DILATIONS):
            raise ValueError(
                f"aspp_branches must be an integer in 1..{len(ASPP_DILATIONS)}; got {aspp_branches!r}"
            )
        self.num_classes = int(num_classes)
        self.freeze_bn = bool(freeze_bn)
        self.style: Style = style
        self.aspp_branches = aspp_branches
        dilations = ASPP_DILATIONS[:aspp_branches]
        init = None if weights is not None else pretrained
        if style == "pytorch":
            self.backbone: DilatedResNet | CaffeResNet = DilatedResNet(backbone, pretrained=init)
            self.feature_channels: int = self.backbone.out_channels
            self.classifier: nn.Module = AtrousClassifier(self.feature_channels, self.num_classes, dilations)
        else:
            self.backbone = CaffeResNet(backbone)
            self.feature_channels = self.backbone.out_channels
            self.classifier = CaffeAtrousClassifier(self.feature_channels, self.num_classes, dilations)
            if init is not None:
                load_deeplab_init(self, init)
        if weights is not None:
            self.load_weights(weights)
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
            Logits ``(B, num_classes, h, w)`` at output stride 8 (``h``, ``w`` as in the class description), or
            ``(logits, features)`` with features ``(B, feature_channels, h, w)``.
        """
        check_images(x)
        features = self.backbone(x)
        logits = self.classifier(features)
        return (logits, features) if return_features else logits

    def upsample_logits(self, logits: Tensor, size: tuple[int, int]) -> Tensor:
        """Bilinear upsampling (``align_corners=True``) of ``logits`` ``(B, C, h, w)`` to ``size`` = (H, W)."""
        return F.interpolate(logits, size=check_size(size), mode="bilinear", align_corners=True)

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The atrous classifier's parameters: :meth:`param_groups` trains them at ``lr * classifier_lr_mult``.

        The backbone's trainable parameters (frozen BatchNorm ones left out) make the ``"backbone"`` group.
        """
        return self.classifier.parameters()

    def load_weights_state(self, state: Mapping[str, Tensor], source: str) -> None:
        """Load a trained DeepLabV2 of any layout :mod:`~uda_sam.nn.deeplabv2_files` reads.

        Reads AdaptSegNet / ADVENT multi-level models (main head ``layer6``, the ``layer5`` auxiliary head ignored,
        ``module.`` prefix or not), BDL / FDA / CRST single-level ones (main head ``layer5``), AdaptSegNet's
        two-branch classifier (with ``aspp_branches=2``) and exported state dicts. The published models need
        ``style="caffe"`` and the Caffe normalisation (``data.normalization: caffe``).

        Raises:
            ValueError: If the state does not fit (naming ``source``, the keys at fault and the layout expected).
        """
        load_deeplab_state_dict(self, state, source)
