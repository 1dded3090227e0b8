"""The LightningCLI of ``uda-sam fit/validate/test/predict``: :class:`UDASamCLI` and the checks it runs.

It is used by the ``uda-sam`` entry point (:mod:`uda_sam.cli.entry_point`) and by the pipeline command, which builds one
:class:`UDASamCLI` per stage.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import uda_sam.callbacks  # noqa: F401  (registers the callbacks for short class names in configs)
from uda_sam.callbacks.checkpoint import AtomicCheckpointIO
from uda_sam.callbacks.prediction_writer import PredictionWriter
from uda_sam.cli.checkpoint_config import (
    DEFAULT_PREDICTION_DIR,
    CheckpointConfigError,
    checkpoint_to_predict_from,
    read_run_config,
    use_for_prediction,
)
from uda_sam.cli.config_files import expand_config_args, null_arguments_as_configs
from uda_sam.cli.console import quiet_console
from uda_sam.cli.run_lock import run_lock
from uda_sam.datamodules import UDADataModule
from uda_sam.tasks import SegmentationTask

__all__ = [
    "DiscardFailedStart",
    "RunFolderError",
    "UDASamCLI",
    "discard_offline_wandb_run",
    "earlier_run_files",
    "refuse_earlier_run",
    "run_folders",
]


class RunFolderError(FileExistsError):
    """``fit`` would write into folders that hold another run's checkpoints or pseudo labels."""


def _checkpoint_dir(trainer: Trainer, callback: ModelCheckpoint) -> Path | None:
    if callback.dirpath is not None:
        return Path(callback.dirpath)
    # Without a logger Lightning writes to default_root_dir/checkpoints; with one, to the logger's own run folder.
    return Path(trainer.default_root_dir) / "checkpoints" if trainer.logger is None else None


def earlier_run_files(trainer: Trainer, model: Any) -> dict[Path, tuple[list[str], set[str]]]:
    """Files of an earlier run in the folders this fit writes to.

    Looks for ``*.ckpt`` in every checkpoint folder, ``generation_*`` in the pseudo-label folder and the exported
    SAM file.

    Returns:
        ``{folder: (names of the files found there, options that name the folder)}``.
    """
    from uda_sam.callbacks import PseudoLabelRegeneration

    found: dict[Path, tuple[list[str], set[str]]] = {}

    def add(folder: Path, pattern: str, option: str) -> None:
        names = sorted(p.name for p in folder.glob(pattern))
        if names:
            found.setdefault(folder, (names, set()))[1].add(option)

    for callback in trainer.callbacks:
        if (
            isinstance(callback, ModelCheckpoint)
            and (folder := _checkpoint_dir(trainer, callback)) is not None
        ):
            add(folder, "*.ckpt", f"{type(callback).__name__}.dirpath")
        elif isinstance(callback, PseudoLabelRegeneration):
            add(Path(callback.output_dir), "generation_*", "PseudoLabelRegeneration.output_dir")
    export = getattr(model, "sam_export_path", None)
    if export is not None:
        add(Path(export).parent, Path(export).name, "model.init_args.sam_export_path")
    return found


def run_folders(trainer: Trainer) -> list[Path]:
    """The folders a fit keeps its run in, those its lock covers: each checkpoint folder (when not the logger's own)
    and each pseudo-label folder."""
    from uda_sam.callbacks import PseudoLabelRegeneration

    folders = [_checkpoint_dir(trainer, c) for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    folders += [Path(c.output_dir) for c in trainer.callbacks if isinstance(c, PseudoLabelRegeneration)]
    return [folder for folder in folders if folder is not None and "://" not in str(folder)]


def _resumes_this_run(trainer: Trainer, ckpt_path: str | None) -> bool:
    if ckpt_path is None:
        return False
    if ckpt_path in ("last", "hpc") or ckpt_path.startswith("registry"):
        return True  # Lightning finds the checkpoint among this run's own
    folders = [_checkpoint_dir(trainer, c) for c in trainer.checkpoint_callbacks]  # type: ignore[arg-type]
    parent = Path(ckpt_path).resolve().parent
    return any(folder is not None and folder.resolve() == parent for folder in folders)


def refuse_earlier_run(trainer: Trainer, model: Any, ckpt_path: str | None) -> None:
    """Refuse to start a new fit whose folders hold another run's files (a resume of that run is fine).

    Raises:
        RunFolderError: Naming the files, the options that name their folders, and how to resume instead.
    """
    if _resumes_this_run(trainer, ckpt_path):
        return
    found = earlier_run_files(trainer, model)
    if not found:
        return
    listing = "; ".join(
        f"{folder} holds {', '.join(names)} (folder set by {', '.join(sorted(options))})"
        for folder, (names, options) in found.items()
    )
    last = next((folder / "last.ckpt" for folder, (names, _) in found.items() if "last.ckpt" in names), None)
    resume = f" To continue that run, add --ckpt_path {last}." if last is not None else ""
    raise RunFolderError(
        f"this fit would mix its files with an earlier run's: {listing}.{resume} To start a new run, set those "
        "options (and trainer.default_root_dir, the logger's save_dir) to other folders, or delete the files."
    )


def _wandb_loggers(trainer_config: Any) -> list[Any]:
    if trainer_config is None:
        return []
    loggers = trainer_config.get("logger")
    return [
        logger
        for logger in (loggers if isinstance(loggers, list) else [loggers])
        if str(getattr(logger, "class_path", "")).endswith("WandbLogger")
    ]


def _quiet_wandb(trainer_config: Any) -> None:
    """Make each W&B logger's run folder before wandb starts (see the comment below)."""
    for logger in _wandb_loggers(trainer_config):
        init_args = logger.get("init_args") or {}
        # wandb looks for the git repository from the run folder and warns "git root ... does not exist" when
        # the folder is not there yet: make it, so that the run records the repository's commit instead.
        save_dir = init_args.get("save_dir") or init_args.get("dir")
        if save_dir:
            Path(save_dir).mkdir(parents=True, exist_ok=True)


def _respect_wandb_disabled(trainer_config: Any) -> None:
    """``WANDB_MODE=disabled`` wins over ``offline: true`` (Lightning's WandbLogger would set the mode to offline)."""
    if os.environ.get("WANDB_MODE", "").lower() != "disabled":
        return
    for logger in _wandb_loggers(trainer_config):
        logger.init_args.offline = False
        # Passed on to wandb.init, which otherwise may keep a mode read earlier in this process.
        logger["dict_kwargs"] = {**(logger.get("dict_kwargs") or {}), "mode": "disabled"}


def discard_offline_wandb_run(logger: Any) -> None:
    """Finish a WandbLogger's run and, when it is an offline run, delete its folder (and links to it)."""
    import wandb

    run = logger._experiment
    if run is None:
        return
    folder = Path(run.dir).parent if getattr(run, "dir", None) else None
    if folder is not None and not folder.resolve().is_relative_to(Path(logger.save_dir or ".").resolve()):
        return  # a run this logger took over from an earlier one in the process: not its own to discard
    with contextlib.suppress(Exception):  # no "wandb sync <folder>" advice for a folder about to be deleted
        run._settings.silent = True
    wandb.finish(exit_code=1)
    logger._experiment = None
    if folder is None or not folder.name.startswith("offline-run-") or not folder.is_dir():
        return
    shutil.rmtree(folder)
    for link in folder.parent.iterdir():  # latest-run, debug.log, ... now pointing at nothing
        if link.is_symlink() and not link.exists():
            link.unlink()
    if not any(folder.parent.iterdir()):
        folder.parent.rmdir()


class DiscardFailedStart(Callback):
    """A fit (or validate, test, predict) that fails before its first training step leaves no offline W&B run."""

    def __init__(self) -> None:
        self.trained = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.trained = True

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.loggers import WandbLogger

        if self.trained or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                discard_offline_wandb_run(logger)


class UDASamCLI(LightningCLI):
    """LightningCLI over :class:`~uda_sam.tasks.SegmentationTask` subclasses and :class:`~uda_sam.datamodules.UDADataModule`.

    Tasks configure their own optimiser and schedule (``auto_configure_optimizers=False``); the seed defaults to 0;
    the resolved config is written (overwriting) next to the logs. ``fit`` stops at once when another live command
    uses its checkpoint or pseudo-label folders (:func:`~uda_sam.cli.run_lock.run_lock`), and refuses to start a
    new run in folders holding another run's checkpoints or pseudo labels (:func:`refuse_earlier_run`); resuming
    with ``--ckpt_path`` is fine. Checkpoints are written whole or not at all (:class:`AtomicCheckpointIO`).
    A ``--config`` file may extend others through a top-level ``_base_`` key (:mod:`uda_sam.cli.config_files`).
    ``WANDB_MODE=disabled`` turns off W&B loggers even where a config says ``offline: true``, and a command that
    fails before training leaves no offline W&B run behind.

    Every task records its network's configuration (``SegmentationTask.network_config``) for its checkpoints, so
    that ``predict --ckpt_path FILE`` needs no config: when no ``--config`` section nor ``--model`` option names the
    model, the task, network and data settings default to those the checkpoint holds
    (:mod:`uda_sam.cli.checkpoint_config`), the task is built for a prediction (no SAM file, no initial-weight
    file), no logger is set up, and unless another ``PredictionWriter`` is configured one writes the PNGs into
    ``trainer.default_root_dir`` (default ``predictions``), next to the ``config.yaml`` the command ran with.
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: object) -> None:
        kwargs.setdefault("model_class", SegmentationTask)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", UDADataModule)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault(
            "parser_kwargs",
            {
                "prog": "uda-sam",
                "description": "Unsupervised domain adaptation for semantic segmentation with a self-attention "
                "module. Run `uda-sam <subcommand> --help` for every option of a subcommand.",
            },
        )
        quiet_console()
        command = list(sys.argv[1:] if args is None else args)
        #: The checkpoint ``predict`` rebuilds the run from, when no config names the model (else ``None``).
        self.predict_checkpoint = checkpoint_to_predict_from(command) if run else None
        self._run_config = read_run_config(self.predict_checkpoint) if self.predict_checkpoint else None
        super().__init__(args=list(args) if args is not None else None, run=run, **kwargs)  # type: ignore[arg-type]

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """For ``predict`` from a checkpoint alone: the checkpoint's task, network and data settings as defaults,
        no logger, and ``predictions`` as ``trainer.default_root_dir``."""
        if self._run_config is None:
            return
        defaults = {f"data.{name}": value for name, value in self._run_config["data"].items()}
        defaults |= {"model": self._run_config["model"]}
        defaults |= {"trainer.logger": False, "trainer.default_root_dir": DEFAULT_PREDICTION_DIR}
        try:
            parser.set_defaults(defaults)
        except KeyError as error:
            raise CheckpointConfigError(
                f"--ckpt_path {self.predict_checkpoint}: its settings do not fit this version of uda-sam ({error}); "
                f"pass the config it was trained with as well: --config CONFIG --ckpt_path {self.predict_checkpoint}"
            ) from error

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse the command, each ``--config`` file's ``_base_`` files merged into it (the parser gets the merged
        YAML in place of the file name), and nested options set to ``null`` read as ``None``."""
        if args is None:  # from the command line
            self.config = parser.parse_args(null_arguments_as_configs(expand_config_args(sys.argv[1:])))
        elif isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
        else:
            super().parse_arguments(parser, null_arguments_as_configs(expand_config_args(args)))

    def before_instantiate_classes(self) -> None:
        """Apply ``WANDB_MODE=disabled`` to W&B loggers configured as offline; make their run folders. For
        ``predict`` from a checkpoint alone, set the model to be built for a prediction."""
        trainer_config = self._get(self.config, "trainer")
        _quiet_wandb(trainer_config)
        _respect_wandb_disabled(trainer_config)
        if self.predict_checkpoint is not None:
            use_for_prediction(self._get(self.config, "model"))

    def after_instantiate_classes(self) -> None:
        """Give the task its network's configuration, for its checkpoints."""
        if isinstance(self.model, SegmentationTask):
            self.model.network_config = self._network_config()

    def _network_config(self) -> dict[str, Any] | None:
        """The model's ``network`` section as plain YAML values (what a checkpoint can hold and load safely)."""
        dump = self.parser.dump(self.config, format="yaml", skip_none=False, skip_link_targets=False)
        dump = yaml.safe_load(dump)
        if self.subcommand is not None:
            dump = dump[self.subcommand]
        network = (dump.get("model") or {}).get("init_args", {}).get("network")
        return network if isinstance(network, dict) and "class_path" in network else None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured trainer, with :class:`DiscardFailedStart` and (unless configured otherwise)
        :class:`AtomicCheckpointIO`; for ``predict`` from a checkpoint alone, a :class:`PredictionWriter` into
        ``trainer.default_root_dir`` unless one is configured."""
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(DiscardFailedStart())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if self.predict_checkpoint is not None and not any(
            isinstance(callback, PredictionWriter) for callback in trainer.callbacks
        ):
            trainer.callbacks.append(PredictionWriter(output_dir=trainer.default_root_dir))
        return trainer

    def predict(self, model: LightningModule, **kwargs: Any) -> None:
        """``trainer.predict``; from a checkpoint alone, without Lightning's note that the training callbacks whose
        states the checkpoint holds are missing (a prediction does not use them)."""
        with warnings.catch_warnings():
            if self.predict_checkpoint is not None:
                warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks")
            self.trainer.predict(model, **kwargs)

    def fit(self, model: LightningModule, **kwargs: Any) -> None:
        """``trainer.fit``, holding the lock of the run's folders; a new run into another run's folders is refused."""
        with run_lock(run_folders(self.trainer), "uda-sam fit"):
            refuse_earlier_run(self.trainer, model, kwargs.get("ckpt_path"))
            self.trainer.fit(model, **kwargs)
