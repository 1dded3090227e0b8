"""Backbones (dilated ResNet, VGG16 features) and loading of their pretrained weights.

``pretrained`` everywhere means: ``None`` (random initialisation), ``"imagenet"`` (torchvision's ImageNet weights,
downloaded to or read from torch hub's cache), or a path to a local file holding a state dict in torchvision's key
layout, loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torchvision import models

__all__ = [
    "DilatedResNet",
    "ResNetName",
    "build_vgg16_features",
    "imagenet_state_dict",
    "load_matching_state_dict",
    "load_weights_only",
    "read_state_dict_file",
    "resolve_pretrained",
    "summarize_keys",
]

ResNetName = Literal["resnet101", "resnet50", "resnet18"]

_RESNETS: dict[str, tuple[Callable[..., models.ResNet], Any]] = {
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
}


def _first_sentence(message: str) -> str:
    # PyTorch's messages go on to advise loading with weights_only=False: never pass that advice on.
    first = message.strip().splitlines()[0] if message.strip() else ""
    return first if "weights_only" not in first else ""


def load_weights_only(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with errors that name the file.

    A file that needs any Python object other than tensors and plain containers is refused, never executed: its
    pickle could run code. The error says so and never suggests loading it unsafely.

    Args:
        path: An existing file.

    Returns:
        The loaded object.

    Raises:
        ValueError: If the file is not a weights-only checkpoint, or is truncated, corrupt or not a PyTorch file.
    """
    file = Path(path).expanduser()
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:  # not a pickle of tensors at all: garbage, a truncated file, a raw pickle
            raise ValueError(
                f"cannot read '{file}' as a PyTorch weights file (its pickle is not one torch.save writes); the "
                "file is truncated, corrupt or not written by torch.save"
            ) from exc
        raise ValueError(
            f"'{file}' is not a weights-only checkpoint (it refers to the Python object {found.group(1)}, beyond "
            "tensors and plain containers): such a file could run code when unpickled, so it is not read. Save the "
            "weights as a state dict of tensors (torch.save(model.state_dict(), path)); a truncated download can "
            "also end up here"
        ) from exc
    except Exception as exc:  # zip, EOF, OS and decoding errors come in many types
        reason = _first_sentence(str(exc))
        raise ValueError(
            f"cannot read '{file}' as a PyTorch weights file ({type(exc).__name__}{': ' + reason if reason else ''})"
            "; the file is truncated, corrupt or not written by torch.save"
        ) from exc


def read_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict from a local file with ``torch.load(weights_only=True)``.

    A dict with a ``"state_dict"`` entry (as Lightning checkpoints have) is unwrapped.

    Args:
        path: File written by ``torch.save(module.state_dict(), path)``.

    Returns:
        The mapping of parameter names to tensors.

    Raises:
        FileNotFoundError: If ``path`` is not an existing file.
        ValueError: If the file cannot be read as a weights-only pickle or holds no name -> tensor mapping.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        hint = ""
        if str(path) in ("None", "null"):
            hint = (
                "; a null given on the command line to an option inside a class (--model.init_args.network.init_args"
                ".pretrained null) reaches it as the string 'None' (jsonargparse): write `pretrained: null` in a "
                "config file, or pass --model.init_args.network '{init_args: {pretrained: null}}'"
            )
        raise FileNotFoundError(
            f"weights file not found: '{file}' (expected a state dict saved with torch.save){hint}"
        )
    obj = load_weights_only(file)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"weights file '{file}' must hold a state dict (a mapping of parameter names to tensors)"
        )
    return {str(k): v for k, v in obj.items()}


def _download_state_dict(weights: Any) -> dict[str, Tensor]:
    # Separate function so tests can simulate a machine without network access.
    return weights.get_state_dict(progress=False)


def imagenet_state_dict(weights: Any) -> dict[str, Tensor]:
    """torchvision's ImageNet weights, from torch hub's cache or downloaded.

    Args:
        weights: A torchvision weights enum member, e.g. ``ResNet101_Weights.IMAGENET1K_V1``.

    Returns:
        The state dict.

    Raises:
        RuntimeError: If the weights can be neither found in the cache nor downloaded; the message names the
            weights and says how to supply the file instead.
    """
    try:
        return _download_state_dict(weights)
    except Exception as exc:
        name = f"torchvision.models.{type(weights).__name__}.{weights.name}"
        raise RuntimeError(
            f"could not obtain the ImageNet weights {name} from {weights.url} ({type(exc).__name__}: {exc}). "
            f"Without network access, download that file elsewhere and pass its local path as "
            f"pretrained='path/to/{Path(weights.url).name}', or put it in torch hub's cache "
            f"({Path(torch.hub.get_dir()) / 'checkpoints'})."
        ) from exc


def resolve_pretrained(pretrained: str | os.PathLike[str] | None, weights: Any) -> dict[str, Tensor] | None:
    """The state dict that ``pretrained`` names: ``None``, ``"imagenet"`` (``weights``) or a local file."""
    if pretrained is None:
        return None
    if not isinstance(pretrained, str | os.PathLike):
        raise ValueError(
            f"pretrained must be None, 'imagenet' or a path to a weights file; got {pretrained!r}"
        )
    if str(pretrained) == "imagenet":
        return imagenet_state_dict(weights)
    return read_state_dict_file(pretrained)


def summarize_keys(keys: list[str], limit: int = 5) -> str:
    """``"3 [a, b, c]"`` or ``"12 [a, b, c, d, e, ...]"``: how many keys, and the first few, for error messages."""
    shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
    return f"{len(keys)} [{shown}]"


def load_matching_state_dict(
    module: nn.Module, state: Mapping[str, Tensor], source: str, expected: str | None = None
) -> None:
    """Load ``state`` into ``module``, requiring the same keys and shapes.

    Missing ``num_batches_tracked`` BatchNorm counters are tolerated (older files lack them).

    Args:
        module: Destination.
        state: Parameters and buffers, keys relative to ``module``.
        source: What ``state`` came from, for the error message.
        expected: The layout the file should have, added to the error message.

    Raises:
        ValueError: Counting and listing the first missing, unexpected and mis-shaped keys.
    """
    own = module.state_dict()
    state = dict(state)
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or mis_shaped:
        found = [
            f"{what} {summarize_keys(keys)}"
            for what, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches (file vs network)", mis_shaped),
            )
            if keys
        ]
        raise ValueError(
            f"weights from {source} do not match the {type(module).__name__} they are loaded into: "
            + "; ".join(found)
            + (f"; expected {expected}" if expected else "")
        )
    module.load_state_dict(state, strict=True)


_TORCHVISION_LAYOUT = (
    "a torchvision ResNet state dict (conv1.weight, layer1.0.conv1.weight, ..., fc.*); the DeepLab init files "
    "and published models of the UDA literature need DeepLabV2(style='caffe')"
)


def _dilate(layer: nn.Sequential, dilation: int) -> None:
    """Make a ResNet stage keep its input resolution: stride 1 everywhere, every 3x3 convolution dilated.

    As in DeepLabV2 (every block of res4 has dilation 2, of res5 dilation 4), unlike torchvision's
    ``replace_stride_with_dilation`` which keeps the previous dilation in each stage's first block. Works for
    ``BasicBlock`` and ``Bottleneck`` alike, since the weights do not depend on stride or dilation.
    """
    for conv in layer.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        conv.stride = (1, 1)
        if conv.kernel_size == (3, 3):
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)


class DilatedResNet(nn.Module):
    """A torchvision ResNet without ``avgpool``/``fc``, stages 3 and 4 dilated (2 and 4): output stride 8.

    State-dict keys are torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...), so torchvision files
    load directly (their ``fc.*`` entries are dropped).

    Args:
        name: ``"resnet101"``, ``"resnet50"`` or ``"resnet18"``.
        pretrained: ``None``, ``"imagenet"`` or a path to a torchvision-layout ResNet state dict.

    Raises:
        ValueError: On an unknown ``name`` or a weights file whose keys do not match.
        FileNotFoundError: If the weights file does not exist.
        RuntimeError: If ImageNet weights cannot be downloaded.
    """

    def __init__(self, name: ResNetName = "resnet101", pretrained: str | None = None) -> None:
        super().__init__()
        if name not in _RESNETS:
            raise ValueError(f"backbone must be one of {list(get_args(ResNetName))}; got {name!r}")
        builder, weights = _RESNETS[name]
        net = builder(weights=None)
        self.name = name
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        _dilate(self.layer3, 2)
        _dilate(self.layer4, 4)
        self.out_channels: int = net.fc.in_features
        state = resolve_pretrained(pretrained, weights)
        if state is not None:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            load_matching_state_dict(self, state, f"pretrained={str(pretrained)!r}", _TORCHVISION_LAYOUT)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> features ``(B, out_channels, ceil(H/8), ceil(W/8))``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


#: VGG16 convolution widths ("M" = 2x2 max pooling), torchvision's configuration "D".
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


def build_vgg16_features() -> nn.Sequential:
    """VGG16's convolutional part with torchvision's module indices (``features.0`` ... ``features.30``).

    Pools use ``ceil_mode=True`` so odd sizes keep their border pixels (pool k has size ``ceil(H / 2^k)``).
    Convolutions get torchvision's initialisation (Kaiming normal, fan-out, zero bias).
    """
    layers: list[nn.Module] = []
    in_channels = 3
    for item in _VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            continue
        conv = nn.Conv2d(in_channels, int(item), kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU(inplace=True)]
        in_channels = int(item)
    return nn.Sequential(*layers)
