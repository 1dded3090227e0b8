"""Reading FCN-8s weights files into an :class:`~uda_sam.nn.FCN8s` (every file with ``torch.load(weights_only=True)``).

:meth:`FCN8s.load_weights <uda_sam.nn.FCN8s.load_weights>` (and ``FCN8s(weights=...)``) reads a trained model with
:func:`load_fcn8s_state_dict`; ``FCN8s(pretrained=...)`` an initialisation with ``init=True``.

Layouts:

- the at-once layout of wkentaro's ``FCN8sAtOnce``, which BDL and FDA ship (``conv1_1.weight`` ... ``conv5_3``,
  ``fc6`` as a ``(4096, 512, 7, 7)`` convolution, ``fc7``, ``score_fr``, ``score_pool3``, ``score_pool4``,
  ``upscore2``, ``upscore_pool4``, ``upscore8``; ``module.`` in front of every key when saved from
  ``DataParallel``): the keys of ``FCN8s(style="caffe")``;
- the package's pytorch style (``features.{i}.*`` in torchvision's VGG16 numbering, ``fc6``, ``fc7``, the same
  score and upsampling names): the keys of ``FCN8s(style="pytorch")``;
- either of these inside a uda-sam Lightning checkpoint (its ``network.*`` entries);
- as an initialisation only: a torchvision VGG16 (``features.*``, ``classifier.0/3/6.*``, e.g. wkentaro's
  Caffe-converted ``vgg16_from_caffe.pth``), its fc6 / fc7 reshaped into convolutions, for either style.

The two FCN-8s layouts have tensors of the same shapes but compute different functions (padding, crop offsets,
scaled skips), so a file is read only into a network of its own style.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from torch import Tensor

from .backbones import load_matching_state_dict, summarize_keys

if TYPE_CHECKING:
    from .fcn8s import FCN8s

__all__ = ["CAFFE_CONV_NAMES", "HEAD_LAYERS", "fcn8s_file_layout", "load_fcn8s_state_dict"]

#: The at-once layout's names of VGG16's 13 convolutions, in order (``conv1_1`` ... ``conv5_3``).
CAFFE_CONV_NAMES: tuple[str, ...] = tuple(
    f"conv{block}_{i}" for block, count in enumerate((2, 2, 3, 3, 3), start=1) for i in range(1, count + 1)
)
# Where the same convolutions sit in torchvision's ``vgg16().features``.
_TORCHVISION_CONVS: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
#: Layers that depend on the class count: dropped from an init file made for other classes.
HEAD_LAYERS: tuple[str, ...] = (
    "score_fr",
    "score_pool4",
    "score_pool3",
    "upscore2",
    "upscore_pool4",
    "upscore8",
)

Layout = Literal["caffe", "pytorch", "vgg16"]


def _strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keys without a Lightning checkpoint's ``network.`` and a ``DataParallel`` ``module.`` prefix."""
    items = {str(k): v for k, v in state.items()}
    if any(k.startswith("network.") for k in items):
        items = {k.removeprefix("network."): v for k, v in items.items() if k.startswith("network.")}
    if items and all(k.startswith("module.") for k in items):
        items = {k.removeprefix("module."): v for k, v in items.items()}
    return items


def fcn8s_file_layout(keys: list[str] | set[str]) -> Layout | None:
    """``"caffe"`` (the at-once layout), ``"pytorch"``, ``"vgg16"`` (torchvision's) or ``None``, from the keys."""
    roots = {key.split(".", 1)[0] for key in keys}
    if roots & set(CAFFE_CONV_NAMES):
        return "caffe"
    if "features" in roots:
        return "pytorch" if "fc6" in roots else "vgg16"
    return None


def _expected(network: FCN8s, init: bool) -> str:
    if network.style == "caffe":
        own = (
            "the FCN-8s at-once layout of BDL / FDA / wkentaro's FCN8sAtOnce (conv1_1.* ... conv5_3.*, fc6.*, fc7.*, "
            "score_fr/score_pool4/score_pool3.*, upscore2/upscore_pool4/upscore8.weight; at most a 'module.' prefix)"
        )
    else:
        own = (
            "an FCN8s(style='pytorch') state dict (features.{i}.* in torchvision's VGG16 numbering, fc6.*, fc7.*, "
            "score_fr/score_pool4/score_pool3.*, upscore2/upscore_pool4/upscore8.weight)"
        )
    own += ", or a uda-sam Lightning checkpoint of one (network.*)"
    return own + (", or a torchvision VGG16 (features.*, classifier.0/3.*)" if init else "")


def _from_torchvision_vgg16(items: dict[str, Tensor], network: FCN8s, source: str) -> dict[str, Tensor]:
    """A torchvision VGG16's convolutions and fc6/fc7 under ``network``'s names (fc layers reshaped)."""
    items = dict(items)
    state: dict[str, Tensor] = {}
    for name, own in (("classifier.0", "fc6"), ("classifier.3", "fc7")):
        fc = getattr(network, own)
        weight, bias = items.pop(f"{name}.weight", None), items.pop(f"{name}.bias", None)
        if weight is None or bias is None or weight.numel() != fc.weight.numel():
            raise ValueError(
                f"weights from {source} must hold torchvision VGG16 entries '{name}.weight' with "
                f"{fc.weight.numel()} values and '{name}.bias'"
            )
        state[f"{own}.weight"], state[f"{own}.bias"] = weight.reshape(fc.weight.shape), bias
    items = {k: v for k, v in items.items() if not k.startswith("classifier.6.")}
    others = sorted(k for k in items if not k.startswith("features."))
    if others:
        raise ValueError(f"weights from {source} have keys that are not VGG16's: {summarize_keys(others)}")
    if network.style == "caffe":  # features.{i}.weight -> conv{b}_{j}.weight; other keys stay, to be reported
        renamed = {
            f"features.{i}.": f"{name}." for i, name in zip(_TORCHVISION_CONVS, CAFFE_CONV_NAMES, strict=True)
        }
        for key in list(items):
            prefix = key[: key.rfind(".") + 1]
            if prefix in renamed:
                items[renamed[prefix] + key[len(prefix) :]] = items.pop(key)
    return {**items, **state}


def _classes(items: Mapping[str, Tensor]) -> int | None:
    weight = items.get("score_fr.weight")
    return int(weight.shape[0]) if isinstance(weight, Tensor) and weight.ndim == 4 else None


def load_fcn8s_state_dict(
    network: FCN8s, state: Mapping[str, Tensor], source: str, init: bool = False
) -> None:
    """Load a state dict of any supported layout (module docstring) into ``network``; nothing unless all of it fits.

    Args:
        network: The destination.
        state: The file's names -> tensors.
        source: What the state came from (e.g. ``"weights file 'x.pth'"``), for error messages.
        init: Read as an initialisation: a torchvision VGG16 is accepted (its score and upsampling layers are
            the network's own), and an FCN-8s file's score and upsampling layers are dropped when they predict
            another number of classes.

    Raises:
        ValueError: Naming ``source``, the keys at fault (how many, and the first few) and the layout expected, when
            the file is of another layout, style or class count.
    """
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{source} does not hold a state dict (a mapping of names to tensors)")
    items = _strip_prefixes(state)
    layout = fcn8s_file_layout(set(items))
    expected = _expected(network, init)
    if layout is None:
        raise ValueError(
            f"{source} is not an FCN-8s file: its keys are {summarize_keys(sorted(items))}; expected {expected}"
        )
    if layout == "vgg16":
        if not init:
            raise ValueError(
                f"{source} holds a torchvision VGG16 (features.*, classifier.*), an ImageNet initialisation: pass "
                "it as pretrained, not as the weights of a trained FCN-8s"
            )
        items = _from_torchvision_vgg16(items, network, source)
    elif layout != network.style:
        what = (
            "the FCN-8s at-once layout (conv1_1.*: BDL, FDA, wkentaro's FCN8sAtOnce, or an FCN8s(style='caffe'))"
            if layout == "caffe"
            else "an FCN8s(style='pytorch') (features.*)"
        )
        raise ValueError(
            f"{source} holds {what}, but this network has style={network.style!r}: the two styles compute different "
            f"functions with tensors of the same shapes; build FCN8s(style={layout!r})"
        )
    classes = _classes(items)
    heads_present = any(k.split(".", 1)[0] in HEAD_LAYERS for k in items)
    if layout == "vgg16" or (init and heads_present and classes != network.num_classes):
        # The init file's heads were made for other classes (or are VGG16's ImageNet classifier): keep our own.
        own = network.state_dict()
        items = {k: v for k, v in items.items() if k.split(".", 1)[0] not in HEAD_LAYERS}
        items.update({k: v for k, v in own.items() if k.split(".", 1)[0] in HEAD_LAYERS})
    elif classes is not None and classes != network.num_classes:
        raise ValueError(
            f"{source}: its score_fr predicts {classes} classes, but the network is built with "
            f"num_classes={network.num_classes}"
        )
    load_matching_state_dict(network, items, source, expected)
