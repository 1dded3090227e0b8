"""FCN-8s on VGG16 (the paper's appendix A network), a variant without the 100-pixel padding trick."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models

from .backbones import build_vgg16_features, load_matching_state_dict, resolve_pretrained
from .deeplabv2 import _check_image, _check_size

__all__ = ["FCN8s", "bilinear_kernel"]

# Indices in VGG16's ``features`` right after pool3 and pool4 (torchvision layout).
_POOL3_END, _POOL4_END = 17, 24


def bilinear_kernel(channels: int, kernel_size: int) -> Tensor:
    """A ``(channels, channels, k, k)`` transposed-convolution weight that upsamples each channel bilinearly."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    ramp = 1 - (torch.arange(kernel_size, dtype=torch.float32) - center).abs() / factor
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = ramp[:, None] * ramp[None, :]
    return weight


def _upsampler(channels: int, factor: int) -> nn.ConvTranspose2d:
    # kernel 2f, stride f, padding f/2: output exactly f times the input, each input cell centred on its f x f block.
    layer = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, 2 * factor))
    return layer


class FCN8s(nn.Module):
    """FCN-8s: VGG16 with fully convolutional fc6/fc7 and skip fusions of pool4 and pool3 at stride 8.

    Differences from the original Caffe model, chosen to handle any input size without cropping offsets: no
    100-pixel padding on conv1_1, pools with ``ceil_mode=True``, fc6 as a 7x7 convolution with padding 3 (stride
    32 in, stride 32 out). Each transposed convolution upsamples exactly by its factor, and maps are cropped at the
    bottom/right to the skip branch's size. Score layers start at zero and transposed convolutions at bilinear
    interpolation (both learnable), as in the reference FCN.

    ``forward`` returns the fused score map at stride 8, ``(B, C, ceil(H/8), ceil(W/8))``: the SAM input ``P``.
    ``upsample_logits`` applies the final learnable x8 transposed convolution.

    Args:
        num_classes: Output classes.
        pretrained: ``None``, ``"imagenet"`` (torchvision's ``VGG16_Weights.IMAGENET1K_V1``) or a path to a
            torchvision-layout VGG16 state dict (``features.*``, ``classifier.0/3.*``; ``classifier.6.*`` is
            ignored). The fully connected fc6/fc7 weights are reshaped into the 7x7 and 1x1 convolutions.

    Raises:
        ValueError: On ``num_classes < 1`` or a mismatching weights file.
        FileNotFoundError: If the weights file does not exist.
        RuntimeError: If the ImageNet weights cannot be downloaded.
    """

    def __init__(self, num_classes: int = 19, pretrained: str | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes}")
        # Read the weights first: a bad path fails before the 134M parameters are initialised.
        state = resolve_pretrained(pretrained, models.VGG16_Weights.IMAGENET1K_V1)
        self.num_classes = int(num_classes)
        self.features = build_vgg16_features()
        self.fc6 = nn.Conv2d(512, 4096, kernel_size=7, padding=3)
        self.fc7 = nn.Conv2d(4096, 4096, kernel_size=1)
        self.drop = nn.Dropout2d(p=0.5)
        self.feature_channels: int = 4096
        self.score_fr = nn.Conv2d(4096, num_classes, kernel_size=1)
        self.score_pool4 = nn.Conv2d(512, num_classes, kernel_size=1)
        self.score_pool3 = nn.Conv2d(256, num_classes, kernel_size=1)
        for score in (self.score_fr, self.score_pool4, self.score_pool3):
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)
        self.upscore2 = _upsampler(num_classes, 2)
        self.upscore_pool4 = _upsampler(num_classes, 2)
        self.upscore8 = _upsampler(num_classes, 8)
        if state is not None:
            self._load_vgg16(state, f"pretrained={str(pretrained)!r}")

    def _load_vgg16(self, state: dict[str, Tensor], source: str) -> None:
        state = dict(state)
        fcs = (("classifier.0", self.fc6, (4096, 512, 7, 7)), ("classifier.3", self.fc7, (4096, 4096, 1, 1)))
        for name, fc, shape in fcs:
            weight, bias = state.pop(f"{name}.weight", None), state.pop(f"{name}.bias", None)
            if weight is None or bias is None or weight.numel() != fc.weight.numel():
                raise ValueError(
                    f"weights from {source} must hold torchvision VGG16 entries '{name}.weight' with "
                    f"{fc.weight.numel()} values and '{name}.bias'"
                )
            with torch.no_grad():
                fc.weight.copy_(weight.reshape(shape))
                fc.bias.copy_(bias)
        state = {k: v for k, v in state.items() if not k.startswith("classifier.6.")}
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        others = sorted(k for k in state if not k.startswith("features."))
        if others:
            raise ValueError(f"weights from {source} have keys that are not VGG16's: {others[:5]}")
        load_matching_state_dict(self.features, features, source)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Score map at stride 8 of images ``x`` ``(B, 3, H, W)``.

        Args:
            x: Normalised images.
            return_features: Also return the fc7 activations ``(B, 4096, ceil(H/32), ceil(W/32))`` (the input of
                ``score_fr``), for the feature-layer SAM variant.

        Returns:
            Scores ``(B, num_classes, ceil(H/8), ceil(W/8))``, or ``(scores, features)``.
        """
        _check_image(x)
        pool3 = self.features[:_POOL3_END](x)
        pool4 = self.features[_POOL3_END:_POOL4_END](pool3)
        pool5 = self.features[_POOL4_END:](pool4)
        fc7 = self.drop(F.relu(self.fc7(self.drop(F.relu(self.fc6(pool5))))))
        score = self.upscore2(self.score_fr(fc7))
        score = score[..., : pool4.shape[-2], : pool4.shape[-1]] + self.score_pool4(pool4)
        score = self.upscore_pool4(score)
        score = score[..., : pool3.shape[-2], : pool3.shape[-1]] + self.score_pool3(pool3)
        return (score, fc7) if return_features else score

    def upsample_logits(self, logits: Tensor, size: tuple[int, int]) -> Tensor:
        """Final x8 transposed convolution, then fit to ``size`` = (H, W).

        When ``size`` is the input image size (the x8 map exceeds it by less than 8 pixels per side) the map is
        cropped at the bottom/right, which keeps it aligned with the image; any other size (e.g. labels at twice
        the input resolution) is reached by bilinear interpolation (``align_corners=True``) of the x8 map.
        """
        height, width = _check_size(size)
        out = self.upscore8(logits)
        excess_h, excess_w = out.shape[-2] - height, out.shape[-1] - width
        if 0 <= excess_h < 8 and 0 <= excess_w < 8:
            return out[..., :height, :width]
        return F.interpolate(out, size=(height, width), mode="bilinear", align_corners=True)

    def param_groups(self, lr: float, classifier_lr_mult: float = 10.0) -> list[dict]:
        """Parameter groups: VGG16 + fc6/fc7 at ``lr``; score and upsampling layers at ``lr * classifier_lr_mult``.

        The paper's FCN-8s recipe (Adam, lr 1e-5) uses one learning rate: pass ``classifier_lr_mult=1``.
        """
        backbone = [*self.features.parameters(), *self.fc6.parameters(), *self.fc7.parameters()]
        head = [
            p
            for m in (
                self.score_fr,
                self.score_pool4,
                self.score_pool3,
                self.upscore2,
                self.upscore_pool4,
                self.upscore8,
            )
            for p in m.parameters()
        ]
        return [
            {"name": "backbone", "params": [p for p in backbone if p.requires_grad], "lr": lr},
            {
                "name": "classifier",
                "params": [p for p in head if p.requires_grad],
                "lr": lr * classifier_lr_mult,
            },
        ]
