"""FCN-8s on VGG16 (the paper's appendix A network), in two styles.

- ``style="pytorch"`` (the default): no 100-pixel padding, maps cropped at the bottom/right, learnable upsampling;
  keys in torchvision's VGG16 layout (``features.0.weight``, ...).
- ``style="caffe"``: the reference FCN-8s "at once" of the Caffe model zoo, in the layout of wkentaro's
  ``FCN8sAtOnce`` that BDL and FDA ship (``conv1_1.weight``, ..., ``fc6``, ``fc7``, ``score_fr``, ``score_pool3``,
  ``score_pool4``, ``upscore2``, ``upscore_pool4``, ``upscore8``): conv1_1 padded by 100 pixels, fc6 a 7x7
  convolution without padding, pool4 / pool3 scaled by 0.01 / 0.0001 before their score layers, score maps fused at
  the fixed crop offsets 5 (pool4) and 9 (pool3), a final x8 transposed convolution cropped at offset 31, and the
  three transposed convolutions fixed at bilinear upsampling (the published trainers never optimise them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import ClassVar, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models

from .backbones import build_vgg16_features, resolve_pretrained
from .fcn8s_files import CAFFE_CONV_NAMES, HEAD_LAYERS, load_fcn8s_state_dict
from .network import SegmentationNetwork, Style, check_images, check_size

__all__ = ["FCN8s", "bilinear_kernel", "caffe_cells"]

# Indices in VGG16's ``features`` right after pool3 and pool4 (torchvision layout).
_POOL3_END, _POOL4_END = 17, 24

# The caffe style's convolutions, block by block (a 2x2 max pooling after each).
_CAFFE_BLOCKS: tuple[tuple[str, ...], ...] = tuple(
    tuple(name for name in CAFFE_CONV_NAMES if name.startswith(f"conv{block}_")) for block in range(1, 6)
)

# The caffe style's fixed geometry: conv1_1's padding, the crop offsets of the pool4 and pool3 scores (in their
# own maps) and of the final upsampling, and the scales applied to pool4 / pool3 before their score layers.
_PAD, _POOL4_OFFSET, _POOL3_OFFSET, _FINAL_OFFSET = 100, 5, 9, 31
_POOL4_SCALE, _POOL3_SCALE = 0.01, 0.0001
# The first stride-8 cell the final upsampling reads for a pixel of the image (the two before it are read only for
# the padding), and where the image starts in the x8 upsampling of the cells kept from there: 31 - 8 * 2.
_FIRST_CELL = 2
_KEPT_OFFSET = _FINAL_OFFSET - 8 * _FIRST_CELL


def bilinear_kernel(channels: int, kernel_size: int) -> Tensor:
    """A ``(channels, channels, k, k)`` transposed-convolution weight that upsamples each channel bilinearly."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    ramp = 1 - (torch.arange(kernel_size, dtype=torch.float32) - center).abs() / factor
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = ramp[:, None] * ramp[None, :]
    return weight


def _upsampler(channels: int, factor: int, centred: bool = True) -> nn.ConvTranspose2d:
    # kernel 2f, stride f. Centred (padding f/2): output exactly f times the input, each input cell centred on its
    # f x f block. Not centred (the caffe style): output f * (n - 1) + 2f, aligned by the crop offsets.
    padding = factor // 2 if centred else 0
    layer = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=padding, bias=False)
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, 2 * factor))
    return layer


def _crop(score: Tensor, offset: int, size: torch.Size) -> Tensor:
    return score[..., offset : offset + size[-2], offset : offset + size[-1]]


def caffe_cells(length: int) -> int:
    """How many stride-8 cells the caffe style's ``forward`` keeps for an image side of ``length`` pixels.

    The final upsampling (kernel 16, stride 8, crop at 31) reads fused cells 2 .. ``floor((length + 30) / 8)`` for
    the pixels of the image; the cells outside that range are read only for the 100-pixel padding, which is cropped.
    """
    return (length + _FINAL_OFFSET - 1) // 8 - _FIRST_CELL + 1


def _largest_caffe_length(cells: int) -> int:
    """The largest image side whose ``caffe_cells`` is ``cells`` (the inverse of :func:`caffe_cells` from above)."""
    return 8 * (cells + _FIRST_CELL) - _FINAL_OFFSET


class FCN8s(SegmentationNetwork):
    """FCN-8s: VGG16 with fully convolutional fc6/fc7 and skip fusions of pool4 and pool3 at stride 8.

    ``style="pytorch"`` (the default) differs from the original Caffe model so as to handle any input size without
    cropping offsets: no 100-pixel padding on conv1_1, fc6 as a 7x7 convolution with padding 3 (stride 32 in,
    stride 32 out), each transposed convolution upsampling exactly by its factor (learnable, starting at bilinear),
    maps cropped at the bottom/right to the skip branch's size. ``forward`` returns ``(B, C, ceil(H/8),
    ceil(W/8))``.

    ``style="caffe"`` is the original FCN-8s at once (module docstring), which reads the FCN-8s files of BDL and
    FDA (their images are Caffe-normalised: ``data.normalization: caffe``). ``forward`` returns the fused stride-8
    map over the cells the final upsampling reads for the image, ``(B, C, caffe_cells(H), caffe_cells(W))``
    (``floor((H + 30) / 8) - 1``: 66 x 130 for 512 x 1024); the padding's cells are left out, so the SAM and its
    losses see the image only. ``upsample_logits`` at the input size then equals the reference network's output.

    In both styles ``forward`` gives the SAM input ``P``, ``upsample_logits`` applies the final x8 transposed
    convolution, and score layers start at zero.

    Args:
        num_classes: Output classes.
        pretrained: Initialisation, not read when ``weights`` is given. ``None``; ``"imagenet"`` (torchvision's
            ``VGG16_Weights.IMAGENET1K_V1``); or a path to a torchvision-layout VGG16 state dict (``features.*``,
            ``classifier.0/3.*``, whose fc6/fc7 are reshaped into the 7x7 and 1x1 convolutions and whose
            ``classifier.6.*`` is ignored; wkentaro's Caffe-converted ``vgg16_from_caffe.pth`` is one) or to an
            FCN-8s file of this style, whose score and upsampling layers are loaded when they predict
            ``num_classes`` classes and dropped otherwise (the 21 PASCAL classes of the FCN model zoo).
        style: ``"pytorch"`` or ``"caffe"``, as above.
        weights: A trained FCN-8s to start from, read by :meth:`load_weights`: a BDL / FDA model (caffe style), a
            uda-sam Lightning checkpoint or exported state dict. Every weight comes from it.

    Raises:
        ValueError: On ``num_classes < 1``, an unknown style, or a weights file of another layout, style or class
            count.
        FileNotFoundError: If a weights file does not exist.
        RuntimeError: If the ImageNet weights cannot be downloaded.
    """

    output_stride: ClassVar[int] = 8
    weights_files: ClassVar[str] = (
        "an FCN-8s weights file (a BDL / FDA model in the at-once layout, or an exported state dict)"
    )

    def __init__(
        self,
        num_classes: int = 19,
        pretrained: str | None = None,
        style: Style = "pytorch",
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes}")
        if style not in get_args(Style):
            raise ValueError(f"style must be one of {list(get_args(Style))}; got {style!r}")
        # Read the weights first: a bad path fails before the 134M parameters are initialised.
        init = None if weights is not None else pretrained
        state = resolve_pretrained(init, models.VGG16_Weights.IMAGENET1K_V1)
        self.num_classes = int(num_classes)
        self.style: Style = style
        features = build_vgg16_features()
        caffe = style == "caffe"
        if caffe:
            convs = [layer for layer in features if isinstance(layer, nn.Conv2d)]
            for name, conv in zip(CAFFE_CONV_NAMES, convs, strict=True):
                self.add_module(name, conv)
            self.conv1_1.padding = (_PAD, _PAD)
        else:
            self.features = features
        self.fc6 = nn.Conv2d(512, 4096, kernel_size=7, padding=0 if caffe else 3)
        self.fc7 = nn.Conv2d(4096, 4096, kernel_size=1)
        self.drop = nn.Dropout2d(p=0.5)
        self.feature_channels: int = 4096
        self.score_fr = nn.Conv2d(4096, num_classes, kernel_size=1)
        self.score_pool4 = nn.Conv2d(512, num_classes, kernel_size=1)
        self.score_pool3 = nn.Conv2d(256, num_classes, kernel_size=1)
        for score in (self.score_fr, self.score_pool4, self.score_pool3):
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)
        self.upscore2 = _upsampler(num_classes, 2, centred=not caffe)
        self.upscore_pool4 = _upsampler(num_classes, 2, centred=not caffe)
        self.upscore8 = _upsampler(num_classes, 8, centred=not caffe)
        if caffe:
            for upsampler in (self.upscore2, self.upscore_pool4, self.upscore8):
                upsampler.weight.requires_grad_(False)
        if state is not None:
            load_fcn8s_state_dict(self, state, f"pretrained={str(pretrained)!r}", init=True)
        if weights is not None:
            self.load_weights(weights)

    def _pools(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """pool3, pool4 and pool5 of VGG16."""
        if self.style == "pytorch":
            pool3 = self.features[:_POOL3_END](x)
            pool4 = self.features[_POOL3_END:_POOL4_END](pool3)
            return pool3, pool4, self.features[_POOL4_END:](pool4)
        pools = []
        for block in _CAFFE_BLOCKS:
            for name in block:
                x = F.relu(getattr(self, name)(x))
            x = F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
            pools.append(x)
        return pools[2], pools[3], pools[4]

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Score map at stride 8 of images ``x`` ``(B, 3, H, W)``.

        Args:
            x: Normalised images.
            return_features: Also return the fc7 activations (the input of ``score_fr``), for the feature-layer SAM
                variant: ``(B, 4096, ceil(H/32), ceil(W/32))`` for the pytorch style, ``ceil((H + 198) / 32) - 6``
                rows (and columns likewise) for the caffe style.

        Returns:
            Scores ``(B, num_classes, h, w)`` (``h``, ``w`` as in the class description), or ``(scores, features)``.
        """
        check_images(x)
        pool3, pool4, pool5 = self._pools(x)
        fc7 = self.drop(F.relu(self.fc7(self.drop(F.relu(self.fc6(pool5))))))
        score = self.upscore2(self.score_fr(fc7))
        if self.style == "pytorch":
            score = score[..., : pool4.shape[-2], : pool4.shape[-1]] + self.score_pool4(pool4)
            score = self.upscore_pool4(score)
            score = score[..., : pool3.shape[-2], : pool3.shape[-1]] + self.score_pool3(pool3)
        else:
            score = score + _crop(self.score_pool4(pool4 * _POOL4_SCALE), _POOL4_OFFSET, score.shape)
            score = self.upscore_pool4(score)
            score = score + _crop(self.score_pool3(pool3 * _POOL3_SCALE), _POOL3_OFFSET, score.shape)
            rows, cols = caffe_cells(x.shape[-2]), caffe_cells(x.shape[-1])
            score = score[..., _FIRST_CELL : _FIRST_CELL + rows, _FIRST_CELL : _FIRST_CELL + cols]
        return (score, fc7) if return_features else score

    def upsample_logits(self, logits: Tensor, size: tuple[int, int]) -> Tensor:
        """Final x8 transposed convolution, then fit to ``size`` = (H, W).

        When ``size`` is the input image size the x8 map is cropped to it: at the bottom/right for the pytorch style
        (the map exceeds the input by less than 8 pixels per side), at the reference network's offset for the caffe
        style (any of the 8 sizes per side whose ``caffe_cells`` give this map). Any other size (e.g. labels at twice
        the input resolution) is reached by bilinear interpolation (``align_corners=True``) of the x8 map: the
        whole of it for the pytorch style; for the caffe style, its crop at the largest input size that gives this
        map (``8 * h - 15`` rows; the input's own size or up to 7 pixels more, 513 x 1025 for 512 x 1024).
        """
        height, width = check_size(size)
        out = self.upscore8(logits)
        if self.style == "pytorch":
            full_h, full_w = out.shape[-2:]
        else:
            full_h, full_w = (_largest_caffe_length(n) for n in logits.shape[-2:])
            out = out[..., _KEPT_OFFSET : _KEPT_OFFSET + full_h, _KEPT_OFFSET : _KEPT_OFFSET + full_w]
        if 0 <= full_h - height < 8 and 0 <= full_w - width < 8:
            return out[..., :height, :width]
        return F.interpolate(out, size=(height, width), mode="bilinear", align_corners=True)

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The score and upsampling layers: :meth:`param_groups` trains them at ``lr * classifier_lr_mult``.

        VGG16's convolutions and fc6 / fc7 make the ``"backbone"`` group. The paper's FCN-8s recipe (Adam, lr 1e-5)
        uses one learning rate: pass ``classifier_lr_mult=1``. The caffe style's fixed upsampling layers are not
        trainable, so no group lists them.
        """
        for name in HEAD_LAYERS:
            yield from getattr(self, name).parameters()

    def load_weights_state(self, state: Mapping[str, Tensor], source: str) -> None:
        """Load a trained FCN-8s of its style: a BDL / FDA model (style ``"caffe"``) or an exported state dict.

        BDL's and FDA's VGG16-FCN8s models (``GTA5_VGG``, ``SYNTHIA_VGG`` ...) need ``FCN8s(style="caffe")`` and the
        Caffe normalisation (``data.normalization: caffe``). Layouts: :mod:`~uda_sam.nn.fcn8s_files`.

        Raises:
            ValueError: If the state does not fit (naming ``source``, the keys at fault and the layout expected).
        """
        load_fcn8s_state_dict(self, state, source)
