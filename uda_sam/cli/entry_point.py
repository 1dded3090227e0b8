"""The ``uda-sam`` command: LightningCLI subcommands (fit/validate/test/predict) plus the package's own commands.

Examples::

    uda-sam make-toy-data data/toy                              # the embedded toy domain pair
    uda-sam fit --config configs/toy/no_pseudo.yaml             # stage 0
    uda-sam fit --config configs/gta5/sam_pretrain.yaml         # stage 1
    uda-sam fit --config configs/gta5/ours_8_10.yaml            # stage 2
    uda-sam validate --config configs/gta5/ours_8_10.yaml --ckpt_path runs/gta5/ours_8_10/checkpoints/last.ckpt
    uda-sam predict --ckpt_path runs/gta5/ours_8_10/checkpoints/last.ckpt --data.predict_root my_frames
    uda-sam evaluate --pred-dir predictions/labelIds --gt-dir data/cityscapes

A config file may extend others through a top-level ``_base_`` key (:mod:`uda_sam.cli.config_files`).
A bad config or input file ends the command with one message, the package's own, and exit status 2 (set
``UDA_SAM_TRACEBACK=1`` to see the traceback instead).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from uda_sam import __version__
from uda_sam.callbacks.divergence import DivergenceError
from uda_sam.cli import evaluate, make_toy_data, pipeline, pseudo_label
from uda_sam.cli.lightning import UDASamCLI

__all__ = ["EXTRA_COMMANDS", "LIGHTNING_COMMANDS", "USER_ERRORS", "error_message", "main", "usage"]

LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a task from a YAML config (stage 0, 1 or 2 of the method)",
    "validate": "score a checkpoint on Cityscapes val (mIoU, per-class IoU)",
    "test": "same as validate, logged under test/",
    "predict": "write predictions (with uda_sam.callbacks.PredictionWriter: labelId and colour PNGs)",
}


#: Commands handled before LightningCLI: name -> function(argv) returning an exit code, each the ``main`` of its
#: module in :mod:`uda_sam.cli`. The first line of the module's docstring, after ``uda-sam <name>:``, is its
#: description in ``uda-sam --help``.
EXTRA_COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "make-toy-data": make_toy_data.main,
    "evaluate": evaluate.main,
    "pseudo-label": pseudo_label.main,
    "pipeline": pipeline.main,
}


def _summary(command: Callable[[list[str]], int]) -> str:
    """The first line of the command module's docstring without its ``uda-sam <name>:`` prefix."""
    doc = sys.modules[command.__module__].__doc__ or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    return first.split(": ", 1)[1] if first.startswith("``uda-sam") and ": " in first else first


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
    lines += [f"  {name:<{width}}{_summary(command)}" for name, command in EXTRA_COMMANDS.items()]
    lines += [
        "",
        "Example: uda-sam fit --config configs/gta5/no_pseudo.yaml --trainer.devices 2",
        "",
        "A config file may extend others: a top-level `_base_: FILE` (or a list of files, relative to the config)",
        "names what it starts from, and its own keys override theirs (mappings merge key by key, a list is replaced",
        "whole). `uda-sam fit --config FILE --print_config` prints the result.",
    ]
    return "\n".join(lines)


#: What a bad config or input file raises: reported as one message instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MisconfigurationException)
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # uda_sam/


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
