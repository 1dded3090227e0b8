"""``uda-sam evaluate``: score a folder of prediction PNGs against Cityscapes gtFine, print the IoU tables.

The scoring itself is :func:`uda_sam.evaluation.scoring.evaluate_folder` (official-script numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uda_sam.data.labels import CLASS_SUBSETS
from uda_sam.evaluation.metrics import format_iou_table
from uda_sam.evaluation.scoring import EvaluationError, evaluate_folder, label_space_hint

__all__ = ["main", "run_evaluate"]


def _json_ready(value: Any) -> Any:
    """Replace NaN by None (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    return value


def run_evaluate(
    pred_dir: str | os.PathLike[str],
    gt_dir: str | os.PathLike[str],
    trainids: bool = False,
    output_json: str | os.PathLike[str] | None = None,
    split: str = "val",
) -> int:
    """Evaluate a prediction folder, print per-class IoU tables, optionally write JSON; return an exit code.

    Args:
        pred_dir: Folder of prediction PNGs (see :func:`evaluate_folder`).
        gt_dir: The Cityscapes root.
        trainids: Predictions hold trainIds instead of labelIds.
        output_json: Where to write the result as JSON (NaN written as ``null``); parent folders are created.
        split: The ``gtFine`` split to score.

    Returns:
        0 on success; 1 when the input cannot be scored (each problem is printed to stderr).
    """
    try:
        result = evaluate_folder(
            pred_dir, gt_dir, pred_format="trainIds" if trainids else "labelIds", split=split
        )
    except (EvaluationError, FileNotFoundError, ValueError) as error:
        print(f"uda-sam evaluate: error: {error}", file=sys.stderr)
        return 1
    print(
        f"Scored {result['num_images']} images of gtFine/{split} (IoU in %, 16/13 classes from the 19-class matrix)."
    )
    for subset in CLASS_SUBSETS:
        print()
        print(format_iou_table(result["iou"], subset=subset))
    hint = label_space_hint(result, "trainIds" if trainids else "labelIds")
    if hint is not None:
        print(f"\nHint: {hint}")
    if output_json is not None:
        output = Path(output_json)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(_json_ready(result), indent=2) + "\n")
        print(f"\nWrote {output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``uda-sam evaluate --pred-dir DIR --gt-dir ROOT [--trainids] [--output F]``."""
    parser = argparse.ArgumentParser(
        prog="uda-sam evaluate", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    parser.add_argument("--pred-dir", required=True, help="folder of prediction PNGs (searched recursively)")
    parser.add_argument("--gt-dir", required=True, help="Cityscapes root holding gtFine/")
    parser.add_argument(
        "--trainids", action="store_true", help="predictions hold trainIds (default: labelIds)"
    )
    parser.add_argument("--output", default=None, help="write the result as JSON to this file")
    parser.add_argument("--split", default="val", help="gtFine split to score (default: val)")
    args = parser.parse_args(argv)
    return run_evaluate(
        args.pred_dir, args.gt_dir, trainids=args.trainids, output_json=args.output, split=args.split
    )


if __name__ == "__main__":
    sys.exit(main())
