"""The contract of a segmentation network: what the tasks, the callbacks, the SAM and the CLI rely on.

:class:`SegmentationNetwork` is an abstract :class:`torch.nn.Module`; :class:`~uda_sam.nn.DeepLabV2`,
:class:`~uda_sam.nn.FCN8s` and the toy :class:`~uda_sam.nn.DilatedFCN` implement it, and so does any network a
user brings to a task. The module also holds the input checks that every network's ``forward`` and
``upsample_logits`` share.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

from .backbones import load_weights_only

__all__ = ["SegmentationNetwork", "Style", "check_images", "check_size", "checkpoint_network_state"]

#: Where a network follows torchvision's conventions (``"pytorch"``) or the published Caffe-derived models of the
#: UDA literature (``"caffe"``): mmcv/mmseg's names. What each style changes is said by each network.
Style = Literal["pytorch", "caffe"]


def check_images(images: Tensor) -> None:
    """Refuse anything but a batch of RGB images ``(B, 3, H, W)``.

    Raises:
        ValueError: Naming the shape found.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W); got shape {tuple(images.shape)}")


def check_size(size: tuple[int, int]) -> tuple[int, int]:
    """``size`` as a ``(height, width)`` pair of positive ``int``.

    Raises:
        ValueError: If it is not such a pair.
    """
    if len(size) != 2 or not all(int(s) > 0 for s in size):
        raise ValueError(f"size must be a (height, width) pair of positive integers; got {size!r}")
    return int(size[0]), int(size[1])


def checkpoint_network_state(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The network of a uda-sam Lightning checkpoint: its ``state_dict``'s ``network.*`` entries, prefix removed
    (empty when it has none)."""
    state = checkpoint.get("state_dict")
    entries = state.items() if isinstance(state, Mapping) else ()
    return {k.removeprefix("network."): v for k, v in entries if k.startswith("network.")}


class SegmentationNetwork(nn.Module, ABC):
    """A segmentation network as the package uses it: logits ``P`` at the output stride, upsampled on demand.

    The contract:

    - ``num_classes`` (instance attribute): the channels of the logits.
    - ``feature_channels`` (instance attribute): the channels of the classifier's input, which
      ``forward(images, return_features=True)`` also returns (the feature-layer SAM reads them).
    - ``output_stride`` (class attribute): the logits have about ``H / output_stride`` rows and
      ``W / output_stride`` columns; each network documents its exact sizes (a network with padding and crops,
      such as the caffe styles, differs by a cell or two).
    - :meth:`forward`: the logits ``P`` ``(B, num_classes, h, w)`` before upsampling, the input of the SAM.
    - :meth:`upsample_logits`: ``P`` at a given ``(H, W)``, for the losses and the metrics.
    - :meth:`param_groups`: the optimiser's two groups, the backbone at ``lr`` and the classifier (declared by
      :meth:`classifier_parameters`) at ``lr * classifier_lr_mult``; together they hold every trainable
      parameter once.
    - :meth:`load_weights`: a trained network of this class from a file: a uda-sam Lightning checkpoint (its
      ``network.*`` entries), an exported state dict, or any other layout the class reads
      (:meth:`load_weights_state`, described by ``weights_files``).

    A subclass implements :meth:`forward`, :meth:`upsample_logits` and :meth:`classifier_parameters` and sets
    ``output_stride``, ``num_classes`` and ``feature_channels``. It overrides :meth:`load_weights_state` and
    ``weights_files`` when it reads files of other layouts than its own state dict (published models). How a
    network is initialised (ImageNet weights, the field's init files) is its constructor's ``pretrained``.
    """

    #: What :meth:`load_weights_state` reads besides a uda-sam checkpoint, for error messages.
    weights_files: ClassVar[str] = "a state dict of this network, with the same number of classes and sizes"

    num_classes: int
    feature_channels: int

    @property
    @abstractmethod
    def output_stride(self) -> int:
        """How many input pixels a cell of the logits spans along each side (a class attribute in subclasses)."""

    @abstractmethod
    def forward(self, images: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``P`` of normalised images ``(B, 3, H, W)``, before upsampling.

        Args:
            images: The batch.
            return_features: Also return the classifier's input ``(B, feature_channels, h', w')``.

        Returns:
            ``(B, num_classes, h, w)`` with ``h``, ``w`` about ``H``, ``W`` over ``output_stride``, or
            ``(logits, features)``.
        """

    @abstractmethod
    def upsample_logits(self, logits: Tensor, size: tuple[int, int]) -> Tensor:
        """``logits`` ``(B, C, h, w)`` from :meth:`forward`, resized to ``size`` = ``(H, W)``: ``(B, C, H, W)``."""

    @abstractmethod
    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The classifier's parameters (trained at ``lr * classifier_lr_mult``); the others are the backbone's."""

    def param_groups(self, lr: float, classifier_lr_mult: float = 10.0) -> list[dict[str, Any]]:
        """The optimiser's parameter groups: ``"backbone"`` at ``lr``, ``"classifier"`` at ``lr * classifier_lr_mult``.

        Only trainable parameters (``requires_grad``) are listed, each once, in the order of :meth:`parameters`
        (so an optimiser's state saved in a checkpoint maps back onto the same tensors). Each group has a ``"name"``
        for logging.
        """
        head = {id(p) for p in self.classifier_parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        return [
            {"name": "backbone", "params": [p for p in trainable if id(p) not in head], "lr": lr},
            {
                "name": "classifier",
                "params": [p for p in trainable if id(p) in head],
                "lr": lr * classifier_lr_mult,
            },
        ]

    def extra_repr(self) -> str:
        """The settings that a weights file must share with this network (in its ``repr`` and error messages)."""
        return f"num_classes={self.num_classes}"

    def load_weights(self, path: str | os.PathLike[str], option: str | None = None) -> None:
        """Load a trained network of this class from ``path``; nothing is loaded unless all of it fits.

        Reads (with ``torch.load(weights_only=True)``) a uda-sam Lightning checkpoint, whose ``network.*`` entries
        are the network, or a file of the layouts :meth:`load_weights_state` reads (``weights_files``).

        Args:
            path: The file.
            option: The option that gave the path (e.g. ``"teacher_checkpoint"``), put in front of error messages.

        Raises:
            FileNotFoundError: If the file does not exist.
            ValueError: If it cannot be read as a weights-only file, a Lightning checkpoint holds no network
                weights, or the weights do not fit this network (the message names the file and what it expects).
        """
        prefix = f"{option}: " if option else ""
        expected = (
            "a Lightning checkpoint of a uda-sam task (.ckpt, its 'network.*' entries) or "
            + self.weights_files
        )
        file = Path(path).expanduser()
        if not file.is_file():
            state = "is a directory" if file.is_dir() else "does not exist"
            raise FileNotFoundError(f"{prefix}weights file '{file}' {state}; expected {expected}")
        try:
            obj = load_weights_only(file)
        except ValueError as error:
            raise ValueError(f"{prefix}{error}; expected {expected}") from error
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):  # a Lightning checkpoint
            obj = checkpoint_network_state(obj)
            if not obj:
                raise ValueError(
                    f"{prefix}{file} holds no network weights (no 'network.*' entries); expected {expected}"
                )
        if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
            raise ValueError(
                f"{prefix}weights file '{file}' does not hold a state dict (names -> tensors); expected {expected}"
            )
        try:
            self.load_weights_state({str(k): v for k, v in obj.items()}, f"weights file '{file}'")
        except ValueError as error:
            if not option:
                raise
            raise ValueError(f"{prefix}{error}") from error

    def load_weights_state(self, state: Mapping[str, Tensor], source: str) -> None:
        """Load a state dict read by :meth:`load_weights`; this default requires this network's keys and shapes.

        Missing BatchNorm ``num_batches_tracked`` counters are tolerated. Networks that read other layouts
        override it.

        Args:
            state: Names -> tensors (a Lightning checkpoint's ``network.`` prefix already removed).
            source: What the state came from (``"weights file 'x.pt'"``), for error messages.

        Raises:
            ValueError: Counting and naming the first tensors of another shape, the missing and the unexpected keys.
        """
        own = self.state_dict()
        state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
        wrong = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if wrong or missing or unexpected:
            raise ValueError(
                f"{source} does not fit {type(self).__name__}({self.extra_repr()}): {len(wrong)} tensors of another "
                f"shape {wrong[:3]}, {len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected "
                f"{unexpected[:3]}; expected {self.weights_files}"
            )
        self.load_state_dict(state)
