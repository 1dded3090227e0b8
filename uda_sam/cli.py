"""The ``uda-sam`` command: LightningCLI subcommands (fit/validate/test/predict) plus the package's own commands.

Examples::

    uda-sam make-toy-data data/toy                              # the embedded toy domain pair
    uda-sam fit --config configs/toy/no_pseudo.yaml             # stage 0
    uda-sam fit --config configs/gta5/sam_pretrain.yaml         # stage 1
    uda-sam fit --config configs/gta5/ours_8_10.yaml            # stage 2
    uda-sam validate --config configs/gta5/ours_8_10.yaml --ckpt_path runs/gta5/ours_8_10/checkpoints/last.ckpt
    uda-sam evaluate --pred-dir predictions/labelIds --gt-dir data/cityscapes
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

import uda_sam.callbacks  # noqa: F401  (registers the callbacks for short class names in configs)
from uda_sam import __version__
from uda_sam.data import UDADataModule
from uda_sam.tasks import SegmentationTask

__all__ = ["EXTRA_COMMANDS", "LIGHTNING_COMMANDS", "RunFolderError", "UDASamCLI", "main"]

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


class UDASamCLI(LightningCLI):
    """LightningCLI over :class:`~uda_sam.tasks.SegmentationTask` subclasses and :class:`~uda_sam.data.UDADataModule`.

    Tasks configure their own optimiser and schedule (``auto_configure_optimizers=False``); the seed defaults to 0;
    the resolved config is written (overwriting) next to the logs. ``fit`` refuses to start a new run in folders
    holding another run's checkpoints or pseudo labels (:func:`refuse_earlier_run`); resuming with
    ``--ckpt_path`` is fine.
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


def main(args: Sequence[str] | None = None) -> int | None:
    """Run ``uda-sam``.

    Args:
        args: Command-line arguments without the program name (``None``: ``sys.argv[1:]``), e.g.
            ``["fit", "--config", "configs/toy/no_pseudo.yaml"]``.

    Returns:
        The exit code of an extra command, 0 after the overview or a Lightning subcommand.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"uda-sam {__version__}")
        return 0
    if argv[0] in EXTRA_COMMANDS:
        return EXTRA_COMMANDS[argv[0]](argv[1:])
    UDASamCLI(args=None if args is None else argv)  # None: LightningCLI reads sys.argv itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
