"""Score a folder of prediction PNGs against Cityscapes ``gtFine``, as the official script does.

The numbers equal cityscapesscripts' ``evalPixelLevelSemanticLabeling`` on the same files: ground-truth labelIds
are mapped to the 19 trainIds (every other id is ignored), IoU is ``TP / (TP + FP + FN)`` with NaN for an absent
class, and means skip NaN. A prediction of a void labelId (one of the non-evaluated ids, e.g. 0 "unlabeled") on a
labelled pixel is a false negative of the ground-truth class and a false positive of no class. The 16- and
13-class means are taken from the 19-class confusion matrix (BDL convention, see :mod:`uda_sam.evaluation.metrics`).

Predictions are matched to ground truth ``{city}_{seq}_{frame}_gtFine_labelIds.png`` by the ``{city}_{seq}_{frame}``
key anywhere in the prediction's file name, searching ``pred_dir`` recursively. The ``uda-sam evaluate`` command
(:mod:`uda_sam.cli.evaluate`) prints and saves these numbers.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from uda_sam.data.labels import CLASS_NAMES, CLASS_SUBSETS, IGNORE_INDEX, LABEL_ID_TO_TRAIN_ID, NUM_CLASSES
from uda_sam.evaluation.metrics import confusion_from_labels, iou_from_confusion, mean_iou

__all__ = ["EvaluationError", "evaluate_folder", "label_space_hint"]

GT_SUFFIX = "_gtFine_labelIds.png"
MAX_LABEL_ID = 33  # largest Cityscapes labelId (bicycle); -1 (license plate) and 255 are void as well
_FRAME_RE = re.compile(r"(?=(\d{6}_\d{6}))")  # lookahead: overlapping "{seq}_{frame}" candidates


class EvaluationError(ValueError):
    """The predictions cannot be scored; ``problems`` lists every problem found, one line each."""

    def __init__(self, problems: Sequence[str], pred_dir: str | os.PathLike[str] = "") -> None:
        self.problems = list(problems)
        where = f" in {pred_dir}" if pred_dir else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) with the predictions{where}:\n{lines}")


def _ground_truth_files(gt_dir: Path, split: str) -> dict[str, Path]:
    pattern = f"gtFine/{split}/*/*{GT_SUFFIX}"
    files = sorted(gt_dir.glob(pattern))
    if not files:
        raise FileNotFoundError(
            f"gt_dir: no ground truth found as {gt_dir / pattern} (gt_dir must be the Cityscapes root holding gtFine/)"
        )
    return {f.name[: -len(GT_SUFFIX)]: f for f in files}


def _match_predictions(pred_dir: Path, keys: Sequence[str]) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """Map each ground-truth key to the prediction PNG whose name contains it; also return ambiguous keys."""
    by_frame: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        by_frame[key[-13:]].append(key)  # "{seq:06}_{frame:06}" is the last 13 characters of a key
    found: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(pred_dir.rglob("*.png")):
        name = path.name
        candidates = {m.group(1) for m in _FRAME_RE.finditer(name)}
        for frame in candidates:
            for key in by_frame.get(frame, ()):
                if key in name:
                    found[key].append(path)
    unique = {k: v[0] for k, v in found.items() if len(v) == 1}
    ambiguous = {k: v for k, v in found.items() if len(v) > 1}
    return unique, ambiguous


def _describe_values(values: np.ndarray, limit: int = 10) -> str:
    uniq = np.unique(values)
    shown = ", ".join(str(int(v)) for v in uniq[:limit])
    return shown + (f", ... ({len(uniq)} distinct)" if len(uniq) > limit else "")


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


def _score_pair(
    pred_path: Path, gt_path: Path, pred_format: Literal["labelIds", "trainIds"]
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, list[str]]:
    """``confusion_from_labels`` of one image (void predictions are false negatives only), or the problems found."""
    problems: list[str] = []
    try:
        gt = _read_png(gt_path)
    except Exception as error:  # PIL raises several types for broken files
        return None, [f"{gt_path}: ground truth cannot be read ({error})"]
    try:
        pred = _read_png(pred_path)
    except Exception as error:
        return None, [f"{pred_path}: cannot be read as a PNG ({error})"]
    if gt.ndim != 2:
        problems.append(
            f"{gt_path}: ground truth has shape {gt.shape}, expected a single-channel labelIds PNG"
        )
    elif gt.size and ((gt > MAX_LABEL_ID) & (gt != 255)).any():
        bad = gt[(gt > MAX_LABEL_ID) & (gt != 255)]
        problems.append(
            f"{gt_path}: ground truth holds values outside the labelIds 0..{MAX_LABEL_ID}: {_describe_values(bad)}"
        )
    if pred.ndim != 2:
        channels = pred.shape[2] if pred.ndim == 3 else "?"
        problems.append(f"{pred_path}: has {channels} channels, expected a single-channel {pred_format} PNG")
    elif gt.ndim == 2 and pred.shape != gt.shape:
        problems.append(
            f"{pred_path}: wrong size, expected {gt.shape[1]}x{gt.shape[0]} (WxH, as {gt_path.name}), "
            f"got {pred.shape[1]}x{pred.shape[0]}"
        )
    if pred.ndim == 2 and np.issubdtype(pred.dtype, np.integer):
        pred = pred.astype(np.int64)
        if pred_format == "labelIds":
            invalid = ((pred > MAX_LABEL_ID) & (pred != 255)) | (pred < -1)
            space = f"labelIds 0..{MAX_LABEL_ID} (255 and -1 void)"
        else:
            invalid = ((pred >= NUM_CLASSES) & (pred != IGNORE_INDEX)) | (pred < 0)
            space = f"trainIds 0..{NUM_CLASSES - 1} (255 void)"
        if invalid.any():
            problems.append(f"{pred_path}: values outside the {space}: {_describe_values(pred[invalid])}")
    elif pred.ndim == 2:
        problems.append(f"{pred_path}: pixel type {pred.dtype}, expected integer ids")
    if problems:
        return None, problems

    if pred_format == "labelIds":
        pred = LABEL_ID_TO_TRAIN_ID[np.where(pred < 0, 255, pred)]
    return confusion_from_labels(torch.from_numpy(pred), torch.from_numpy(LABEL_ID_TO_TRAIN_ID[gt])), []


def _list_missing(gt_files: dict[str, Path], missing: Sequence[str], limit: int) -> str:
    shown = ", ".join(gt_files[k].name for k in missing[:limit])
    more = f", ... and {len(missing) - limit} more" if len(missing) > limit else ""
    return f"{len(missing)} of {len(gt_files)} ground-truth images have no prediction: {shown}{more}"


def evaluate_folder(
    pred_dir: str | os.PathLike[str],
    gt_dir: str | os.PathLike[str],
    pred_format: Literal["labelIds", "trainIds"] = "labelIds",
    split: str = "val",
    num_workers: int | None = None,
    max_listed: int = 20,
) -> dict[str, Any]:
    """Score every ``{gt_dir}/gtFine/{split}/*/*_gtFine_labelIds.png`` against its prediction in ``pred_dir``.

    Args:
        pred_dir: Folder searched recursively for prediction PNGs; a file matches a ground-truth image when its
            name contains ``{city}_{seq}_{frame}`` (e.g. ``frankfurt_000000_000294_leftImg8bit.png``).
        gt_dir: The Cityscapes root (holding ``gtFine/``).
        pred_format: ``"labelIds"`` (official Cityscapes format, ids 0..33; void ids count as wrong) or
            ``"trainIds"`` (0..18, 255 counts as wrong).
        split: The ``gtFine`` split to score.
        num_workers: Threads reading and scoring images (default: up to 8, by CPU count).
        max_listed: How many missing files the error lists by name before giving a count.

    Returns:
        ``{"mIoU_19", "mIoU_16", "mIoU_13": float in [0, 1] (NaN when undefined), "iou": {class name: float},
        "num_images": int, "confusion": 19x19 list of int (rows ground truth, columns prediction)}``.

    Raises:
        FileNotFoundError: If ``pred_dir`` is not a folder or ``gt_dir`` holds no ground truth for ``split``.
        ValueError: If ``pred_format`` is not one of the two choices.
        EvaluationError: Listing every problem found: ground-truth images without a prediction, several
            predictions for one image, unreadable or multi-channel files, predictions of the wrong size, values
            outside the label space.
    """
    if pred_format not in ("labelIds", "trainIds"):
        raise ValueError(f"pred_format must be 'labelIds' or 'trainIds', got {pred_format!r}")
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"pred_dir: {pred_dir} is not a folder")
    gt_files = _ground_truth_files(gt_dir, split)
    predictions, ambiguous = _match_predictions(pred_dir, list(gt_files))

    problems: list[str] = []
    missing = [k for k in gt_files if k not in predictions and k not in ambiguous]
    if missing:
        problems.append(_list_missing(gt_files, missing, max_listed))
    for key, paths in ambiguous.items():
        problems.append(f"{key}: several predictions match ({', '.join(str(p) for p in paths)}); keep one")

    pairs = [(predictions[k], gt_files[k]) for k in gt_files if k in predictions]
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    unmatched = torch.zeros(NUM_CLASSES, dtype=torch.long)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PNG decoding releases the GIL
        for counts, pair_problems in pool.map(lambda pair: _score_pair(*pair, pred_format), pairs):
            problems.extend(pair_problems)
            if counts is not None:
                confusion += counts[0]
                unmatched += counts[1]
    if problems:
        raise EvaluationError(problems, pred_dir)

    iou = iou_from_confusion(confusion, unmatched)
    result: dict[str, Any] = {
        f"mIoU_{name}": float(mean_iou(iou, classes)) for name, classes in CLASS_SUBSETS.items()
    }
    result["iou"] = {name: float(value) for name, value in zip(CLASS_NAMES, iou.tolist(), strict=True)}
    result["num_images"] = len(pairs)
    result["confusion"] = confusion.tolist()
    return result


#: trainIds a labelId file cannot hold (its ids 0..6 are void ids, never predicted): road ... traffic light.
_TRAIN_IDS_NOT_IN_LABEL_IDS = range(7)


def label_space_hint(result: dict[str, Any], pred_format: Literal["labelIds", "trainIds"]) -> str | None:
    """A hint when predictions scored as trainIds look like labelIds, else ``None``.

    Official labelId files cannot hold the trainIds 0..6 (their ids 0..6 are void ids, never predicted), so
    labelId files scored with ``--trainids`` predict none of them (and score about 0.1 mIoU).

    Args:
        result: What :func:`evaluate_folder` returned.
        pred_format: The format the predictions were scored in.
    """
    predicted = torch.tensor(result["confusion"]).sum(dim=0)
    if pred_format != "trainIds" or not int(predicted.sum()):
        return None
    if int(predicted[list(_TRAIN_IDS_NOT_IN_LABEL_IDS)].sum()) > 0:
        return None
    names = f"{CLASS_NAMES[0]} ... {CLASS_NAMES[6]}"
    return (
        f"no labelled pixel is predicted as trainIds 0..6 ({names}): these look like labelId files, which hold "
        "no such ids. Score them without --trainids."
    )
