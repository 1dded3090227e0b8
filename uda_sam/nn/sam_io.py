"""Saving and loading the self-attention module (SAM) on its own, and reading network weights from checkpoints.

An exported SAM file is a plain dict written with :func:`torch.save` and read back with ``weights_only=True``::

    {"state_dict": {...}, "num_classes": C, "embed_channels": C', "kernel_size": k, "use_conv": bool,
     "layer": "prediction" | "feature", "attention_quality": {domain: {figure: value}}}   # the last one optional

``attention_quality`` holds what :class:`~uda_sam.tasks.SAMPretraining` measured of the SAM's attention on labelled
held-out images (:class:`~uda_sam.evaluation.analysis.AttentionQuality`); :func:`read_attention_quality` reads it back and
:func:`attention_warning` says when it shows an attention close to uniform.

``num_classes`` is the number of input channels the SAM was built for: the classes for the prediction layer,
the classifier's input channels for the feature layer. :func:`load_sam` also accepts a Lightning checkpoint of
:class:`~uda_sam.tasks.SAMPretraining` (its ``state_dict`` holds ``sam.*`` entries and the checkpoint a
``"sam_config"`` entry).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from uda_sam.files import write_atomically

from .backbones import load_weights_only
from .network import SegmentationNetwork, checkpoint_network_state
from .sam import SelfAttentionModule

__all__ = [
    "MIN_ATTENTION_LIFT",
    "SAM_FILE_KEYS",
    "attention_warning",
    "load_network_weights",
    "load_sam",
    "network_state_dict",
    "read_attention_quality",
    "read_checkpoint",
    "sam_config",
    "save_sam",
]

#: Keys of an exported SAM file.
SAM_FILE_KEYS: tuple[str, ...] = (
    "state_dict",
    "num_classes",
    "embed_channels",
    "kernel_size",
    "use_conv",
    "layer",
)

#: A SAM whose same-class attention share is below this multiple of chance is reported as near uniform.
MIN_ATTENTION_LIFT: float = 1.2

_EXPECTED = (
    "an exported SAM file (a dict with keys "
    + ", ".join(SAM_FILE_KEYS)
    + ", written by SAMPretraining as sam.pt) "
    "or a SAMPretraining Lightning checkpoint (.ckpt whose state_dict holds 'sam.*' entries)"
)


def sam_config(
    sam: SelfAttentionModule, layer: Literal["prediction", "feature"] = "prediction"
) -> dict[str, Any]:
    """The constructor arguments that rebuild ``sam`` (plus the layer it works on)."""
    return {
        "num_classes": int(sam.num_classes),
        "embed_channels": int(sam.embed_channels),
        "kernel_size": int(sam.kernel_size),
        "use_conv": bool(sam.use_conv),
        "layer": layer,
    }


def save_sam(
    sam: SelfAttentionModule,
    path: str | os.PathLike[str],
    layer: Literal["prediction", "feature"] = "prediction",
    attention_quality: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """Write ``sam`` as an exported SAM file, atomically (temporary file in the same folder, then rename).

    Args:
        sam: The module to export.
        path: Destination file; parent folders are created.
        layer: The layer the SAM was trained on.
        attention_quality: Optional ``{domain: {figure: value}}`` measured of its attention, stored with it.

    Returns:
        The path written.
    """
    payload: dict[str, Any] = {
        "state_dict": {k: v.detach().cpu().clone() for k, v in sam.state_dict().items()},
        **sam_config(sam, layer),
    }
    if attention_quality:
        payload["attention_quality"] = {
            str(domain): {str(k): float(v) for k, v in figures.items()}
            for domain, figures in attention_quality.items()
        }
    return write_atomically(path, lambda handle: torch.save(payload, handle))


def read_attention_quality(path: str | os.PathLike[str]) -> dict[str, dict[str, float]] | None:
    """The attention quality stored in an exported SAM file, or ``None`` (older files, checkpoints)."""
    obj = read_checkpoint(path, "sam")
    quality = obj.get("attention_quality") if isinstance(obj, Mapping) else None
    return {str(d): dict(f) for d, f in quality.items()} if isinstance(quality, Mapping) else None


def attention_warning(figures: Mapping[str, float]) -> str | None:
    """A message when measured attention is close to uniform (same-class share below ``MIN_ATTENTION_LIFT`` x
    chance), else ``None``. Such a SAM mixes each pixel with the whole image: the self-attention loss then pushes
    every pixel towards the image's dominant classes instead of towards its own class."""
    lift = float(figures.get("lift", float("nan")))
    if not lift < MIN_ATTENTION_LIFT:
        return None
    return (
        f"the attention is close to uniform: {figures['same_class_share']:.3f} of a row's attention lands on its "
        f"own class against {figures['chance_share']:.3f} by chance (lift {lift:.2f} < {MIN_ATTENTION_LIFT}), row "
        f"entropy {figures['entropy']:.3f} against {figures['uniform_entropy']:.3f} for uniform attention; the SAM "
        "has not learnt which pixels belong together (train it longer, at a higher resolution, or from a "
        "pretrained network)"
    )


def read_checkpoint(path: str | os.PathLike[str], option: str, expected: str = _EXPECTED) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with errors that name ``option``, the file and ``expected``.

    A file that is not weights-only (it needs Python objects beyond tensors and plain containers) is refused,
    never executed.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If the file cannot be read as tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{option}: {path} {state}; expected {expected}")
    try:
        return load_weights_only(path)
    except ValueError as error:
        raise ValueError(f"{option}: {error}; expected {expected}") from error


def _config_from_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    weight = state_dict.get("transform.weight")
    if weight is None or weight.ndim != 4:
        return None
    return {
        "num_classes": int(weight.shape[1]),
        "embed_channels": int(weight.shape[0]),
        "kernel_size": int(weight.shape[-1]),
        "use_conv": True,
        "layer": "prediction",
    }


def _split_checkpoint(obj: Any, prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """``(config, state_dict)`` of the SAM stored under ``prefix`` in a Lightning checkpoint, or ``None``."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        return None
    weights = {k[len(prefix) :]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
    configs = obj.get("sam_config")
    config = configs.get(prefix.rstrip(".")) if isinstance(configs, Mapping) else None
    if config is None and not weights:
        return None
    if config is None:
        config = _config_from_weights(weights)
        if config is None:
            return None
    return dict(config), weights


def load_sam(
    path: str | os.PathLike[str],
    expected_channels: int | None = None,
    layer: Literal["prediction", "feature"] = "prediction",
    option: str = "sam",
) -> SelfAttentionModule:
    """Rebuild a SAM from an exported file or from a SAMPretraining Lightning checkpoint.

    Args:
        path: The file.
        expected_channels: The number of channels the SAM must accept (the network's ``num_classes`` for the
            prediction layer, its ``feature_channels`` for the feature layer); ``None`` skips the check.
        layer: The layer the caller applies the SAM to; a file that records another layer is refused.
        option: The option name used in error messages (e.g. ``"SelfAttentionLoss.sam"``).

    Returns:
        The module with its weights loaded, on CPU, in eval mode.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is neither kind, records another layer, or was built for another channel count.
    """
    obj = read_checkpoint(path, option)
    if isinstance(obj, Mapping) and all(key in obj for key in SAM_FILE_KEYS[:5]):
        candidates = [({key: obj[key] for key in SAM_FILE_KEYS[1:] if key in obj}, dict(obj["state_dict"]))]
        kind = "exported SAM file"
    else:
        # SAMPretraining keeps its SAM at "sam."; SelfTraining its frozen SAMs at "self_attention.sam." and
        # "self_attention.feature_sam.".
        prefixes = ("sam.", "self_attention.sam.", "self_attention.feature_sam.")
        candidates = [c for c in (_split_checkpoint(obj, p) for p in prefixes) if c is not None]
        if not candidates:
            keys = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(
                f"{option}: {path} is not a SAM file nor a SAM checkpoint (found {keys}); expected {_EXPECTED}"
            )
        kind = "SAMPretraining checkpoint"
    matching = [c for c in candidates if c[0].get("layer", "prediction") == layer]
    if not matching:
        stored = candidates[0][0].get("layer", "prediction")
        raise ValueError(
            f"{option}: the SAM in {path} was trained on the {stored!r} layer, but it is used on the "
            f"{layer!r} layer here; pass a SAM pretrained with layer={layer!r}"
        )
    config, weights = matching[0]
    if expected_channels is not None and int(config["num_classes"]) != int(expected_channels):
        what = "classes" if layer == "prediction" else "feature channels"
        raise ValueError(
            f"{option}: the SAM in {path} ({kind}) was built for {config['num_classes']} input channels, but the "
            f"network has {expected_channels} {what}; use a SAM pretrained with the same network output"
        )
    sam = SelfAttentionModule(
        num_classes=int(config["num_classes"]),
        embed_channels=int(config["embed_channels"]),
        kernel_size=int(config["kernel_size"]),
        use_conv=bool(config["use_conv"]),
    )
    try:
        sam.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(
            f"{option}: the SAM weights in {path} do not match their recorded configuration: {error}"
        ) from error
    return sam.eval()


def _lightning_network_weights(
    obj: Any, path: str | os.PathLike[str], option: str
) -> dict[str, torch.Tensor]:
    weights = checkpoint_network_state(obj) if isinstance(obj, Mapping) else {}
    if not weights:
        raise ValueError(
            f"{option}: {path} holds no network weights; expected a Lightning checkpoint of a uda_sam task "
            "(state_dict with 'network.*' entries)"
        )
    return weights


def network_state_dict(path: str | os.PathLike[str], option: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``network.*`` weights of a task checkpoint (prefix removed), read with ``weights_only=True``.

    Useful to build a teacher network for pseudo labels from a :class:`~uda_sam.tasks.SegmentationTask`
    checkpoint: ``net.load_state_dict(network_state_dict(path))``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it holds no ``network.*`` weights.
    """
    obj = read_checkpoint(path, option, expected="a Lightning checkpoint of a uda_sam task (.ckpt)")
    return _lightning_network_weights(obj, path, option)


def load_network_weights(
    network: SegmentationNetwork, checkpoint_path: str | os.PathLike[str], option: str = "checkpoint"
) -> None:
    """Load a trained network into ``network`` with its own reader, :meth:`~uda_sam.nn.SegmentationNetwork.load_weights`.

    That reads a uda-sam Lightning checkpoint and the network's own weights files: a :class:`~uda_sam.nn.DeepLabV2`
    also the published models of AdaptSegNet, ADVENT, BDL, FDA and CRST (with ``style="caffe"``), an
    :class:`~uda_sam.nn.FCN8s` BDL's and FDA's VGG16 models (with ``style="caffe"``); so that a published
    source-only model can make generation 1's pseudo labels.

    Args:
        network: The network to fill (same architecture and number of classes as the file's).
        checkpoint_path: The file.
        option: Name of the option that gave the path, put in front of error messages.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If ``network`` is not a :class:`~uda_sam.nn.SegmentationNetwork`, or the file holds no network weights of a layout the network reads, or they do not fit ``network``.
    """
    if not isinstance(network, SegmentationNetwork):
        raise ValueError(
            f"{option}: the network to load into must be a uda_sam.nn.SegmentationNetwork; got {type(network).__name__}"
        )
    network.load_weights(checkpoint_path, option)
