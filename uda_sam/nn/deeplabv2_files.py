"""Reading DeepLabV2 weights files: the field's init files and published models, and the package's own files.

:meth:`DeepLabV2.load_weights <uda_sam.nn.DeepLabV2.load_weights>` (and ``DeepLabV2(weights=...)``) reads a trained
model with :func:`load_deeplab_state_dict`; ``DeepLabV2(style="caffe", pretrained=...)`` an init file with
:func:`load_deeplab_init`. Layouts read into a :class:`~uda_sam.nn.DeepLabV2` (every file with ``torch.load(weights_only=True)``):

- the DeepLab init files (``DeepLab_resnet_pretrained_init-f81d91e8.pth`` of AdaptSegNet/BDL/FDA, ADVENT's
  ``DeepLab_resnet_pretrained_imagenet.pth``): the published names under one extra prefix (``Scale.conv1.weight``),
  a ``layer5`` head for the 21 PASCAL classes, no ``num_batches_tracked`` entries;
- single-level models (BDL, FDA, CRST): ``conv1.*``, ``bn1.*``, ``layer1-4.*`` and the main head ``layer5`` on the
  2048 channels of ``layer4``;
- multi-level models (AdaptSegNet's ``DeeplabMulti``, ADVENT's ``multi_level``): an auxiliary head ``layer5`` on
  the 1024 channels of ``layer3`` and the main head ``layer6`` on ``layer4``; ``module.`` in front of every key
  when saved from ``DataParallel``;
- the package's own: an exported ``DeepLabV2.state_dict()`` (``backbone.*``, ``classifier.*``) or a Lightning
  checkpoint of a uda-sam task (its ``network.*`` entries).

A head is a ``{name}.conv2d_list.{i}.weight/bias`` group (``classifier.convs.{i}`` for the pytorch style). The main
head is the one whose input channels are the backbone's output channels, whatever its name; other heads are
auxiliary and ignored. Its first ``aspp_branches`` branches are loaded: AdaptSegNet's classifier returns after its
second branch, so its files (which hold four) are read with ``DeepLabV2(aspp_branches=2)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from torch import Tensor

from .backbones import load_matching_state_dict, read_state_dict_file, summarize_keys

if TYPE_CHECKING:
    from .deeplabv2 import DeepLabV2

__all__ = [
    "DeepLabFile",
    "Head",
    "load_deeplab_init",
    "load_deeplab_state_dict",
    "parse_deeplab_state_dict",
]

_BACKBONE_ROOTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
_KNOWN_ROOTS = frozenset({*_BACKBONE_ROOTS, "layer5", "layer6", "backbone", "classifier"})
_HEAD_KEY = re.compile(r"(layer5|layer6|classifier)\.(conv2d_list|convs)\.(\d+)\.(weight|bias)")


@dataclass
class Head:
    """One classifier of a weights file: atrous branches ``{name}.{list_name}.{i}.weight/bias``.

    Attributes:
        name: ``"layer5"``, ``"layer6"`` or ``"classifier"``.
        list_name: ``"conv2d_list"`` (the published code, the caffe style) or ``"convs"`` (the pytorch style).
        branches: Branch index -> ``{"weight": ..., "bias": ...}``.
    """

    name: str
    list_name: str
    branches: dict[int, dict[str, Tensor]] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int] | None:
        """``(in_channels, classes)`` when every branch has a 4-D weight and a bias of one such shape, else ``None``."""
        shapes = set()
        for params in self.branches.values():
            weight, bias = params.get("weight"), params.get("bias")
            if weight is None or bias is None or weight.ndim != 4 or bias.shape != weight.shape[:1]:
                return None
            shapes.add((int(weight.shape[1]), int(weight.shape[0])))
        return shapes.pop() if len(shapes) == 1 else None

    def describe(self) -> str:
        """``"layer6 (2048 input channels, 19 classes, branches 0-3)"``, for messages."""
        shape = self.shape
        what = f"{shape[0]} input channels, {shape[1]} classes" if shape else "malformed"
        return f"{self.name} ({what}, branches {sorted(self.branches)})"


@dataclass
class DeepLabFile:
    """A DeepLabV2 state dict sorted into its parts.

    Attributes:
        layout: ``"published"`` (the names of the field's code) or ``"uda-sam"`` (``backbone.*``, ``classifier.*``).
        backbone: Backbone entries, keys relative to the backbone (``conv1.weight``, ``layer1.0.conv1.weight``).
        heads: The classifier heads found.
        unexpected: Keys that belong to neither.
    """

    layout: Literal["published", "uda-sam"]
    backbone: dict[str, Tensor]
    heads: list[Head]
    unexpected: list[str]


def _strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keys without a Lightning ``network.`` prefix and without one shared extra token (``Scale.``, ``module.``)."""
    items = dict(state)
    if any(k.startswith("network.") for k in items):
        items = {k.removeprefix("network."): v for k, v in items.items() if k.startswith("network.")}
    for _ in range(2):  # e.g. "module.Scale.conv1.weight"
        roots = {k.split(".", 1)[0] for k in items}
        if len(roots) != 1 or roots <= _KNOWN_ROOTS or not all("." in k for k in items):
            break
        items = {k.split(".", 1)[1]: v for k, v in items.items()}
    return items


def parse_deeplab_state_dict(state: Mapping[str, Tensor]) -> DeepLabFile:
    """Sort a DeepLabV2 state dict of any supported layout into backbone, heads and unexpected keys.

    Args:
        state: The file's mapping of names to tensors (a Lightning checkpoint's ``state_dict`` included).

    Returns:
        The parts; nothing is checked against a network yet.
    """
    items = _strip_prefixes(state)
    ours = any(k.split(".", 1)[0] in ("backbone", "classifier") for k in items)
    backbone: dict[str, Tensor] = {}
    heads: dict[str, Head] = {}
    unexpected: list[str] = []
    for key, value in items.items():
        root, _, rest = key.partition(".")
        if (ours and root == "backbone") or (not ours and root in _BACKBONE_ROOTS):
            backbone[rest if ours else key] = value
            continue
        match = _HEAD_KEY.fullmatch(key)
        if match is not None and (match.group(1) == "classifier") == ours:
            head = heads.setdefault(match.group(1), Head(match.group(1), match.group(2)))
            if match.group(2) == head.list_name:
                head.branches.setdefault(int(match.group(3)), {})[match.group(4)] = value
                continue
        unexpected.append(key)
    return DeepLabFile("uda-sam" if ours else "published", backbone, list(heads.values()), sorted(unexpected))


def _expected(network: DeepLabV2) -> str:
    name = f"DeepLabV2(style={network.style!r}, backbone={network.backbone.name!r})"
    ours = "uda-sam's (backbone.*, classifier.{}.{{i}}.*; network.* in a Lightning checkpoint)"
    if network.style == "caffe":
        return (
            f"the keys of a {name}: the published layout (conv1.*, bn1.*, layer1-4.*, heads layer5 / layer6"
            ".conv2d_list.{i}.*, at most one prefix such as 'Scale.' or 'module.') or "
            + ours.format("conv2d_list")
        )
    return f"the keys of a {name}: " + ours.format("convs")


def _check_style(parsed: DeepLabFile, network: DeepLabV2, source: str) -> None:
    own_list = "conv2d_list" if network.style == "caffe" else "convs"
    if parsed.layout == "published" and network.style != "caffe":
        kind = (
            "a torchvision ResNet file (its fc.* is the ImageNet classifier): pass it as pretrained"
            if any(k.startswith("fc.") for k in parsed.unexpected) and not parsed.heads
            else "the DeepLab ResNet of the UDA literature: build DeepLabV2(style='caffe')"
        )
        raise ValueError(f"{source} holds {kind}; this network is {_expected(network)}")
    other = [h for h in parsed.heads if h.list_name != own_list]
    if parsed.layout == "uda-sam" and other:
        style = "caffe" if other[0].list_name == "conv2d_list" else "pytorch"
        raise ValueError(
            f"{source} was saved from a DeepLabV2(style={style!r}) (classifier.{other[0].list_name}.*), but this "
            f"network has style={network.style!r}; build it with style={style!r}"
        )


def _main_head(parsed: DeepLabFile, network: DeepLabV2, source: str) -> dict[str, Tensor]:
    """The classifier entries of the file's main head (the head on the backbone's output channels).

    Raises:
        ValueError: If there is no such head, or it does not fit the classifier.
    """

    def refuse(message: str) -> ValueError:
        return ValueError(f"{source}{message}")

    channels = network.feature_channels
    found = ", ".join(h.describe() for h in parsed.heads) or "none"
    malformed = [h for h in parsed.heads if h.shape is None]
    if malformed:
        raise refuse(f": classifier head {malformed[0].describe()} is incomplete or inconsistent")
    main = [h for h in parsed.heads if h.shape is not None and h.shape[0] == channels]
    if len(main) > 1:
        raise refuse(f" has {len(main)} heads on {channels} input channels ({found}): which is the main one?")
    if not main:
        raise refuse(
            f" has no classifier head on the backbone's {channels} output channels (heads: {found}); "
            f"expected {_expected(network)}"
        )
    head = main[0]
    classes = head.shape[1]  # type: ignore[index]
    if classes != network.num_classes:
        raise refuse(
            f": its classifier {head.describe()} predicts {classes} classes, but the network is built with "
            f"num_classes={network.num_classes}"
        )
    wanted = range(network.aspp_branches)
    absent = [i for i in wanted if i not in head.branches]
    if absent:
        raise refuse(
            f": its classifier {head.describe()} lacks branches {absent}, but the network sums "
            f"aspp_branches={network.aspp_branches}; build it with aspp_branches={len(head.branches)}"
        )
    state = {f"{head.list_name}.{i}.{p}": head.branches[i][p] for i in wanted for p in ("weight", "bias")}
    own = network.classifier.state_dict()
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape
    ]
    if wrong:
        raise refuse(
            f": classifier {head.name} has other kernel shapes (file vs network) {summarize_keys(wrong)}"
        )
    return state


def load_deeplab_state_dict(
    network: DeepLabV2, state: Mapping[str, Tensor], source: str, init: bool = False
) -> None:
    """Load a state dict of any supported layout (module docstring) into ``network``.

    Nothing is loaded unless the whole file fits: the backbone key for key, and the main head by shape.

    Args:
        network: The destination.
        state: The file's names -> tensors.
        source: What the state came from (e.g. ``"weights file 'x.pth'"``), for error messages.
        init: Read as an init file: its head is loaded when it fits the classifier (``num_classes`` outputs on the
            backbone's channels, enough branches); a head for another class count (or none, or one of another
            form) leaves the classifier as it is.

    Raises:
        ValueError: Naming ``source``, the missing / unexpected keys (how many, and the first few) and the layout
            expected, when the file is of another layout, architecture, style or class count.
    """
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{source} does not hold a state dict (a mapping of names to tensors)")
    parsed = parse_deeplab_state_dict(state)
    _check_style(parsed, network, source)
    if init:  # an init file's head is optional, whatever its form
        parsed.unexpected = [k for k in parsed.unexpected if k.split(".", 1)[0] not in ("layer5", "layer6")]
    if parsed.unexpected:
        raise ValueError(
            f"{source} has keys that are not a DeepLabV2's: {summarize_keys(parsed.unexpected)}; "
            f"expected {_expected(network)}"
        )
    try:
        classifier: dict[str, Tensor] | None = _main_head(parsed, network, source)
    except ValueError:
        if not init:
            raise
        # An init file's head that does not fit (PASCAL's 21 classes): the classifier keeps its initialisation.
        classifier = None
    load_matching_state_dict(network.backbone, parsed.backbone, f"{source} (backbone)", _expected(network))
    if classifier is not None:
        load_matching_state_dict(network.classifier, classifier, f"{source} (classifier)", _expected(network))


def load_deeplab_init(network: DeepLabV2, path: str | os.PathLike[str]) -> None:
    """Initialise a caffe-style ``network`` from a DeepLab init file (``pretrained=...``).

    The backbone must match key for key; the file's head is loaded when it fits the classifier and dropped when it
    predicts another number of classes (the init files' ``layer5`` predicts PASCAL's 21).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: On ``"imagenet"`` (there is no download for this style), an unreadable file or one that does
            not fit.
    """
    if str(path) == "imagenet":
        raise ValueError(
            "DeepLabV2(style='caffe') has no download: pass pretrained=<path> of a DeepLab init file "
            "(DeepLab_resnet_pretrained_init-f81d91e8.pth, distributed with AdaptSegNet / BDL, or ADVENT's "
            "DeepLab_resnet_pretrained_imagenet.pth); pretrained='imagenet' is torchvision's, for style='pytorch'"
        )
    state = read_state_dict_file(path)
    load_deeplab_state_dict(network, state, f"pretrained file '{path}'", init=True)
