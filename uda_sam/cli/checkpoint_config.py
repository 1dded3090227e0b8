"""``uda-sam predict --ckpt_path FILE`` without a config: the run's settings read back from its checkpoint.

A checkpoint written by ``uda-sam fit`` holds the task's class and arguments (``hyper_parameters``), the network's
``class_path`` and ``init_args`` (``uda_sam.network``, see ``SegmentationTask.network_config``) and the data module's
arguments (``datamodule_hyper_parameters``). When no ``--config`` section nor ``--model`` option names the model,
``predict`` takes these as its defaults (:func:`read_run_config`), so that the stage's config, its dataset roots
(with ``--data.predict_root``) and its SAM file are not needed, and builds the task for a prediction
(:func:`use_for_prediction`): files that only give initial weights or serve the training loss are not read, since
every weight comes from the checkpoint. The classes a checkpoint names are imported as a config's would be: predict
from checkpoints you trust as you would run their configs.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from uda_sam.cli.config_files import load_config

if TYPE_CHECKING:
    from uda_sam.tasks import SegmentationTask

__all__ = [
    "DEFAULT_PREDICTION_DIR",
    "INITIAL_WEIGHT_OPTIONS",
    "CheckpointConfigError",
    "checkpoint_to_predict_from",
    "read_run_config",
    "use_for_prediction",
]

#: Network arguments that only give initial weights (ImageNet, a published model, an earlier stage): not read for
#: a prediction, whose weights all come from the checkpoint.
INITIAL_WEIGHT_OPTIONS: tuple[str, ...] = ("pretrained", "weights")

#: Where ``predict`` from a checkpoint alone writes its files (``trainer.default_root_dir``) unless told otherwise.
DEFAULT_PREDICTION_DIR = "predictions"


class CheckpointConfigError(ValueError):
    """A checkpoint lacks what ``predict`` needs to rebuild the run without its config."""


def _option_values(args: Sequence[str], names: tuple[str, ...]) -> list[str]:
    """The values given to the options ``names`` (``--name value`` or ``--name=value``), in order."""
    values = []
    for index, token in enumerate(args):
        name, equals, value = token.partition("=")
        if name not in names:
            continue
        if equals:
            values.append(value)
        elif index + 1 < len(args):
            values.append(args[index + 1])
    return values


def _config_sections(value: str) -> Mapping[str, Any]:
    """The top-level sections of a ``--config`` value (a file or a YAML string); empty when unreadable (the parser
    reports that)."""
    try:
        config = load_config(value) if Path(value).is_file() else yaml.safe_load(value)
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return config if isinstance(config, Mapping) else {}


def checkpoint_to_predict_from(args: Sequence[str]) -> str | None:
    """The ``ckpt_path`` of a ``predict`` command whose model is named by no ``--config`` section nor ``--model``
    option (``--model.init_args.*`` options adjust the checkpoint's model), else ``None``.

    Args:
        args: The command's arguments, the subcommand first (``["predict", "--ckpt_path", "last.ckpt", ...]``).
    """
    if not args or args[0] != "predict":
        return None
    options = list(args[1:])
    configs = [_config_sections(value) for value in _option_values(options, ("-c", "--config"))]
    if any(name.partition("=")[0] in ("--model", "--model.class_path") for name in options):
        return None
    if any("model" in config for config in configs):
        return None
    paths = _option_values(options, ("--ckpt_path",))
    paths = paths or [str(config["ckpt_path"]) for config in configs if config.get("ckpt_path")]
    return paths[-1] if paths and paths[-1] not in ("", "null", "None") else None


def read_run_config(path: str) -> dict[str, Any]:
    """The model and data settings a ``uda-sam fit`` checkpoint holds.

    Returns:
        ``{"model": {"class_path": ..., "init_args": {..., "network": {"class_path": ..., "init_args": ...}}},
        "data": {...}}`` as a config would give them.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CheckpointConfigError: If it is not a checkpoint, or lacks the task's, the network's or the data module's
            settings (e.g. a file written by another program): the message says to pass ``--config``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"--ckpt_path {path} does not exist (without --config, give a checkpoint file)"
        )
    try:
        # Memory-mapped: only the few settings are read, not every tensor.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several kinds for a file it cannot read
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointConfigError(
            f"--ckpt_path {path} cannot be read as a checkpoint of tensors and plain values: {reason}"
        ) from error
    checkpoint = checkpoint if isinstance(checkpoint, Mapping) else {}
    task = checkpoint.get("hyper_parameters")
    extra = checkpoint.get("uda_sam")
    network = extra.get("network") if isinstance(extra, Mapping) else None
    data = checkpoint.get("datamodule_hyper_parameters")
    missing = []
    if not isinstance(task, Mapping) or "_class_path" not in task:
        missing.append("the task's class and arguments (hyper_parameters)")
    if not isinstance(network, Mapping) or "class_path" not in network:
        missing.append("the network's class_path and init_args (uda_sam.network)")
    if not isinstance(data, Mapping):
        missing.append("the data module's arguments (datamodule_hyper_parameters)")
    if missing:
        retry = f"pass the config it was trained with as well: --config CONFIG --ckpt_path {path}"
        listed = ", ".join(missing[:-1]) + (" and " if len(missing) > 1 else "") + missing[-1]
        raise CheckpointConfigError(
            f"--ckpt_path {path} lacks {listed}, which the checkpoints of `uda-sam fit` hold and a prediction "
            f"from a checkpoint alone needs; {retry}"
        )
    init_args = {key: value for key, value in task.items() if not key.startswith("_")}
    return {
        "model": {"class_path": task["_class_path"], "init_args": {**init_args, "network": dict(network)}},
        "data": {key: value for key, value in data.items() if not key.startswith("_")},
    }


def _task_class(class_path: str) -> type[SegmentationTask]:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def use_for_prediction(model: Any) -> None:
    """Set a parsed model config (``class_path`` and ``init_args``) to build the task for a prediction.

    The network's :data:`INITIAL_WEIGHT_OPTIONS` are cleared and the task class's ``prediction_overrides()`` applied.
    """
    network = model.init_args.get("network")
    network_args = getattr(network, "init_args", None)
    for name in INITIAL_WEIGHT_OPTIONS:
        if network_args is not None and name in network_args:
            network_args[name] = None
    task = _task_class(model.class_path)
    for name, value in task.prediction_overrides().items():
        if name not in model.init_args:
            raise KeyError(f"{task.__name__}.prediction_overrides() names {name!r}, not one of its arguments")
        model.init_args[name] = value
