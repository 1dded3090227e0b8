"""The DeepLab ResNet of the UDA literature ("caffe" style), the backbone AdaptSegNet, ADVENT, BDL, FDA and CRST use.

It is the ResNet of the original (Caffe) DeepLab, converted to PyTorch, and differs from torchvision's:

- a downsampling bottleneck carries its stride on the first 1x1 convolution (``conv1``), not on the 3x3 (``conv2``);
  this is what mmcv/mmseg call ``style="caffe"``;
- the stem's max-pool is ``MaxPool2d(3, stride=2, padding=1, ceil_mode=True)``;
- every block of ``layer3`` / ``layer4`` has dilation 2 / 4 with stride 1, and their first block has a downsample
  branch (a 1x1 convolution and BatchNorm, keys ``downsample.0`` / ``downsample.1``).

Module names are those of the published code (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer3.0.downsample.0``,
...), so the published files load key for key. The output stride is 8, but the ceil-mode pool and the stride on a
1x1 convolution round differently from torchvision: a ``512 x 1024`` input gives ``65 x 129`` features.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CAFFE_DEPTHS", "CaffeBottleneck", "CaffeResNet"]

#: Blocks per stage of each supported depth (bottleneck ResNets only: the stride sits on a 1x1 convolution).
CAFFE_DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "resnet101": (3, 4, 23, 3),
    "resnet50": (3, 4, 6, 3),
}


class CaffeBottleneck(nn.Module):
    """A bottleneck block with the stride on its first 1x1 convolution and a dilated 3x3 convolution.

    Args:
        in_channels: Input channels.
        planes: Width of the block; the output has ``4 * planes`` channels.
        stride: Stride of ``conv1`` (and of the downsample branch).
        dilation: Dilation (= padding) of the 3x3 convolution ``conv2``.
        downsample: Give the block a projection shortcut (``downsample.0`` convolution, ``downsample.1`` BatchNorm).
    """

    expansion = 4

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1, downsample: bool = False
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if downsample:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` -> ``(B, 4 * planes, H', W')`` with ``H' = ceil(H / stride)``."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class CaffeResNet(nn.Module):
    """The DeepLab ResNet backbone (no classifier): stem, ``layer1`` ... ``layer4``, output stride 8.

    Convolutions start from torchvision's initialisation (Kaiming normal, fan-out) and BatchNorm from weight 1,
    bias 0; the field always starts from a converted init file instead (``DeepLabV2(pretrained=...)``).

    Args:
        name: ``"resnet101"`` (the field's network) or ``"resnet50"``.

    Raises:
        ValueError: On an unknown ``name``.
    """

    def __init__(self, name: str = "resnet101") -> None:
        super().__init__()
        if name not in CAFFE_DEPTHS:
            raise ValueError(
                f"the caffe-style DeepLab ResNet is built with a backbone of {list(CAFFE_DEPTHS)} (bottleneck "
                f"blocks carry the stride on a 1x1 convolution); got {name!r}"
            )
        self.name = name
        depths = CAFFE_DEPTHS[name]
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        self._channels = 64
        self.layer1 = self._stage(64, depths[0])
        self.layer2 = self._stage(128, depths[1], stride=2)
        self.layer3 = self._stage(256, depths[2], dilation=2)
        self.layer4 = self._stage(512, depths[3], dilation=4)
        self.out_channels: int = self._channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        # The first block of every stage changes the width (64 -> 256, 256 -> 512, ...), hence its projection.
        layers = [CaffeBottleneck(self._channels, planes, stride, dilation, downsample=True)]
        self._channels = planes * CaffeBottleneck.expansion
        layers += [CaffeBottleneck(self._channels, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> features ``(B, out_channels, h, w)``, ``h = ceil((floor(ceil(H/2)/2) + 1) / 2)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
