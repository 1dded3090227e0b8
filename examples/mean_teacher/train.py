"""Command line of the mean-teacher example: a plain LightningCLI over the example module and uda-sam's datamodule.

    python examples/mean_teacher/train.py fit --config examples/mean_teacher/toy.yaml
    python examples/mean_teacher/train.py fit --config examples/mean_teacher/toy.yaml \\
        --config examples/mean_teacher/sam_loss.yaml          # + the self-attention loss
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the example's module sits next to this script

from mean_teacher import MeanTeacher  # noqa: E402

from uda_sam import UDADataModule  # noqa: E402


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(
        MeanTeacher,
        UDADataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
