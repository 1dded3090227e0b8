"""The ``uda-sam`` command: LightningCLI subcommands (fit/validate/test/predict) plus the package's own commands.

Examples::

    uda-sam make-toy-data data/toy                              # the embedded toy domain pair
    uda-sam fit --config configs/toy/no_pseudo.yaml             # stage 0
    uda-sam fit --config configs/gta5/sam_pretrain.yaml         # stage 1
    uda-sam fit --config configs/gta5/ours_8_10.yaml            # stage 2
    uda-sam validate --config configs/gta5/ours_8_10.yaml --ckpt_path runs/gta5/ours_8_10/checkpoints/last.ckpt
    uda-sam evaluate --pred-dir predictions/labelIds --gt-dir data/cityscapes

A bad config or input file ends the command with one message, the package's own, and exit status 2 (set
``UDA_SAM_TRACEBACK=1`` to see the traceback instead).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import uda_sam.callbacks  # noqa: F401  (registers the callbacks for short class names in configs)
from uda_sam import __version__
from uda_sam.callbacks.divergence import DivergenceError
from uda_sam.data import UDADataModule
from uda_sam.tasks import SegmentationTask

__all__ = [
    "EXTRA_COMMANDS",
    "LIGHTNING_COMMANDS",
    "USER_ERRORS",
    "DiscardFailedStart",
    "RunFolderError",
    "UDASamCLI",
    "discard_offline_wandb_run",
    "earlier_run_files",
    "error_message",
    "main",
    "refuse_earlier_run",
]

LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a task from a YAML config (stage 0, 1 or 2 of the method)",
    "validate": "score a checkpoint on Cityscapes val (mIoU, per-class IoU)",
    "test": "same as validate, logged under test/",
    "predict": "write predictions (with uda_sam.callbacks.PredictionWriter: labelId and colour PNGs)",
}


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


def _respect_wandb_disabled(trainer_config: Any) -> None:
    """``WANDB_MODE=disabled`` wins over ``offline: true`` (Lightning's WandbLogger would set the mode to offline)."""
    if os.environ.get("WANDB_MODE", "").lower() != "disabled" or trainer_config is None:
        return
    loggers = trainer_config.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if str(getattr(logger, "class_path", "")).endswith("WandbLogger"):
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
    """LightningCLI over :class:`~uda_sam.tasks.SegmentationTask` subclasses and :class:`~uda_sam.data.UDADataModule`.

    Tasks configure their own optimiser and schedule (``auto_configure_optimizers=False``); the seed defaults to 0;
    the resolved config is written (overwriting) next to the logs. ``fit`` refuses to start a new run in folders
    holding another run's checkpoints or pseudo labels (:func:`refuse_earlier_run`); resuming with
    ``--ckpt_path`` is fine. ``WANDB_MODE=disabled`` turns off W&B loggers even where a config says
    ``offline: true``, and a command that fails before training leaves no offline W&B run behind.
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
        super().__init__(args=list(args) if args is not None else None, run=run, **kwargs)  # type: ignore[arg-type]

    def before_instantiate_classes(self) -> None:
        """Apply ``WANDB_MODE=disabled`` to W&B loggers configured as offline."""
        _respect_wandb_disabled(self._get(self.config, "trainer"))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured trainer, with :class:`DiscardFailedStart`."""
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(DiscardFailedStart())
        return trainer

    def before_fit(self) -> None:
        """Refuse a new fit into another run's folders."""
        refuse_earlier_run(self.trainer, self.model, self._get(self.config, "ckpt_path"))


def make_toy_data_command(argv: list[str]) -> int:
    """Write the toy domain pair (a game-like source in GTA5 format, a real-looking target in Cityscapes format)."""
    parser = argparse.ArgumentParser(prog="uda-sam make-toy-data", description=make_toy_data_command.__doc__)
    parser.add_argument(
        "root", help="output folder (must not exist, be empty, or hold a toy set with the same options)"
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    parser.add_argument("--num-source", type=int, default=200, help="source images (default: 200)")
    parser.add_argument("--num-target", type=int, default=200, help="target training images (default: 200)")
    parser.add_argument("--num-val", type=int, default=50, help="target validation images (default: 50)")
    parser.add_argument(
        "--num-test", type=int, default=100, help="labelled target test images (default: 100)"
    )
    parser.add_argument(
        "--size", type=int, nargs=2, metavar=("W", "H"), default=(256, 128), help="target image size"
    )
    parser.add_argument(
        "--source-size",
        type=int,
        nargs=2,
        metavar=("W", "H"),
        default=None,
        help="source image size (default: 288 160)",
    )
    args = parser.parse_args(argv)
    from uda_sam.data.toy import make_toy_data

    kwargs = {"source_size": tuple(args.source_size)} if args.source_size is not None else {}
    root = make_toy_data(
        args.root,
        num_source=args.num_source,
        num_target_train=args.num_target,
        num_val=args.num_val,
        num_test=args.num_test,
        size=tuple(args.size),
        seed=args.seed,
        **kwargs,
    )
    print(f"Toy domain pair written to {root}")
    return 0


def evaluate_command(argv: list[str]) -> int:
    """Score a folder of prediction PNGs against Cityscapes gtFine (official-script numbers, mIoU 19/16/13)."""
    from uda_sam.evaluate import main as evaluate_main

    return evaluate_main(argv)


def pseudo_label_command(argv: list[str]) -> int:
    """Make one generation of class-wise thresholded pseudo labels from a checkpoint, offline."""
    from uda_sam.pseudo_label_cli import main as pseudo_label_main

    return pseudo_label_main(argv)


def pipeline_command(argv: list[str]) -> int:
    """Run the whole protocol (No Pseudo, SAM pretraining, generations of self-training) and print the table."""
    from uda_sam.pipeline import main as pipeline_main

    return pipeline_main(argv)


#: Commands handled before LightningCLI: name -> function(argv) returning an exit code. The first line of each
#: function's docstring is its description in ``uda-sam --help``.
EXTRA_COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "make-toy-data": make_toy_data_command,
    "evaluate": evaluate_command,
    "pseudo-label": pseudo_label_command,
    "pipeline": pipeline_command,
}


def usage() -> str:
    """The overview printed by ``uda-sam``, ``uda-sam -h`` and ``uda-sam --help``."""
    lines = [
        f"usage: uda-sam <command> [options]   (uda-sam {__version__})",
        "",
        "Unsupervised domain adaptation for semantic segmentation with a self-attention module (SAM).",
        "",
        "Training and evaluation (LightningCLI; `uda-sam <command> --help` lists every option):",
    ]
    width = max(len(name) for name in [*LIGHTNING_COMMANDS, *EXTRA_COMMANDS]) + 2
    lines += [f"  {name:<{width}}{text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "Other commands (`uda-sam <command> --help` for their options):"]
    for name, function in EXTRA_COMMANDS.items():
        summary = (function.__doc__ or "").strip().splitlines()[0] if function.__doc__ else ""
        lines.append(f"  {name:<{width}}{summary}")
    lines += [
        "",
        "Example: uda-sam fit --config configs/gta5/no_pseudo.yaml --trainer.devices 2",
    ]
    return "\n".join(lines)


#: What a bad config or input file raises: reported as one message instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MisconfigurationException)
_PACKAGE_DIR = Path(__file__).resolve().parent


def _raised_in_package(error: BaseException) -> bool:
    frame = error.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    return Path(frame.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


def error_message(error: BaseException) -> str:
    """The message to show for a user error.

    jsonargparse reports a class that refused its arguments as a ``ValueError`` caused by the class's own error,
    with a dump of every argument; Lightning re-raises a data-loader worker's error with its traceback as text.
    This returns the package's own message where one is in the chain of causes, else the innermost one, without
    argument dumps or worker tracebacks.
    """
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 16:
        chain.append(chain[-1].__cause__)
    own = next((e for e in chain if _raised_in_package(e)), chain[-1])
    lines = [line for line in str(own).splitlines() if not line.lstrip().startswith("Given value")]
    if any(line.startswith("Original Traceback") for line in lines):
        lines = lines[-1:]  # "ValueError: <the worker's message>"
    return "\n".join(lines).strip() or type(own).__name__


def _run(argv: list[str], lightning_args: Sequence[str] | None) -> int:
    if argv[0] in EXTRA_COMMANDS:
        return EXTRA_COMMANDS[argv[0]](argv[1:])
    UDASamCLI(args=lightning_args)  # None: LightningCLI reads sys.argv itself
    return 0


def main(args: Sequence[str] | None = None) -> int | None:
    """Run ``uda-sam``.

    Args:
        args: Command-line arguments without the program name (``None``: ``sys.argv[1:]``), e.g.
            ``["fit", "--config", "configs/toy/no_pseudo.yaml"]``.

    Returns:
        The exit code of an extra command, 0 after the overview or a Lightning subcommand, 2 after a bad config
        or input file (its message printed to stderr), 1 after a run stopped by a ``DivergenceMonitor``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"uda-sam {__version__}")
        return 0
    try:
        return _run(argv, None if args is None else argv)
    except (
        DivergenceError
    ) as error:  # a run that diverged: its own message (step, terms, cause), no traceback
        if os.environ.get("UDA_SAM_TRACEBACK"):
            raise
        print(f"uda-sam {argv[0]}: {error}", file=sys.stderr, flush=True)
        return 1
    except USER_ERRORS as error:
        if os.environ.get("UDA_SAM_TRACEBACK"):
            raise
        print(f"uda-sam {argv[0]}: error: {error_message(error)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
