from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uda_sam.cli.evaluate import main, run_evaluate
from uda_sam.data.labels import CLASS_NAMES, LABEL_ID_TO_TRAIN_ID
from uda_sam.evaluation.scoring import EvaluationError, evaluate_folder

SIZE = (48, 24)  # (W, H)
KEYS = [
    "frankfurt_000000_000294",
    "frankfurt_000001_007973",
    "lindau_000000_000019",
    "munster_000012_000019",
]
TRAIN_LABEL_ID = 31  # never used below, so "train" is NaN everywhere


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_ground_truth(root: Path, keys=KEYS, split: str = "val", seed: int = 0) -> dict[str, np.ndarray]:
    """Fake Cityscapes gtFine labelIds: blocks of random labelIds (void ids included) on the real layout."""
    rng = np.random.default_rng(seed)
    ids = np.array([i for i in range(34) if i != TRAIN_LABEL_ID])
    out = {}
    w, h = SIZE
    for key in keys:
        blocks = rng.choice(ids, size=(h // 4, w // 4))
        gt = np.kron(blocks, np.ones((4, 4), dtype=np.int64)).astype(np.uint8)
        city = key.split("_")[0]
        write_png(root / "gtFine" / split / city / f"{key}_gtFine_labelIds.png", gt)
        out[key] = gt
    return out


def make_predictions(
    pred_dir: Path, gts: dict[str, np.ndarray], seed: int = 1, trainids: bool = False
) -> dict[str, Path]:
    """Ground truth with 30% of pixels replaced by random labelIds (void ids too), in nested folders."""
    rng = np.random.default_rng(seed)
    ids = np.array([i for i in range(34) if i != TRAIN_LABEL_ID])
    paths = {}
    for key, gt in gts.items():
        pred = gt.copy()
        flip = rng.random(gt.shape) < 0.3
        pred[flip] = rng.choice(ids, size=int(flip.sum()))
        if trainids:
            pred = LABEL_ID_TO_TRAIN_ID[pred]
        city = key.split("_")[0]
        paths[key] = write_png(pred_dir / city / f"{key}_leftImg8bit.png", pred)
    return paths


@pytest.fixture
def dataset(tmp_path):
    gt_root = tmp_path / "cityscapes"
    gts = make_ground_truth(gt_root)
    make_ground_truth(gt_root, keys=["aachen_000000_000019"], split="train")  # other splits are not scored
    pred_dir = tmp_path / "preds"
    preds = make_predictions(pred_dir, gts)
    return gt_root, pred_dir, gts, preds


def official_scores(preds: dict[str, Path], gt_root: Path) -> dict:
    evaluation = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    args = evaluation.args
    args.evalInstLevelScore = False  # needs instanceIds files, and is not the class IoU
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.quiet = True
    gt_list = [str(gt_root / "gtFine" / "val" / k.split("_")[0] / f"{k}_gtFine_labelIds.png") for k in preds]
    return evaluation.evaluateImgLists([str(p) for p in preds.values()], gt_list, args)


def test_equals_cityscapesscripts(dataset):
    gt_root, pred_dir, _, preds = dataset
    official = official_scores(preds, gt_root)
    result = evaluate_folder(pred_dir, gt_root)
    assert result["num_images"] == len(KEYS)
    for name in CLASS_NAMES:
        expected = official["classScores"][name]
        if math.isnan(expected):
            assert math.isnan(result["iou"][name]), name
        else:
            assert result["iou"][name] == pytest.approx(expected, rel=1e-12, abs=1e-12), name
    assert math.isnan(result["iou"]["train"])
    assert result["mIoU_19"] == pytest.approx(official["averageScoreClasses"], rel=1e-12)
    iou = np.array([result["iou"][n] for n in CLASS_NAMES])
    from uda_sam.data.labels import SYNTHIA_13_CLASSES, SYNTHIA_16_CLASSES

    assert result["mIoU_16"] == pytest.approx(np.nanmean(iou[SYNTHIA_16_CLASSES]))
    assert result["mIoU_13"] == pytest.approx(np.nanmean(iou[SYNTHIA_13_CLASSES]))
    assert 0.0 < result["mIoU_19"] < 1.0


def test_trainids_format_gives_same_scores(dataset, tmp_path):
    gt_root, pred_dir, gts, _ = dataset
    train_dir = tmp_path / "preds_train"
    make_predictions(train_dir, gts, trainids=True)
    a = evaluate_folder(pred_dir, gt_root)
    b = evaluate_folder(train_dir, gt_root, pred_format="trainIds")
    assert a["confusion"] == b["confusion"]
    for name in CLASS_NAMES:
        assert a["iou"][name] == pytest.approx(b["iou"][name], nan_ok=True)


def test_matches_key_anywhere_in_name(tmp_path):
    gt_root = tmp_path / "cs"
    gts = make_ground_truth(gt_root)
    pred_dir = tmp_path / "p"
    for key, gt in gts.items():  # prefix and suffix around the key, flat folder
        write_png(pred_dir / f"epoch3_{key}_pred.png", gt)
    result = evaluate_folder(pred_dir, gt_root)
    assert result["num_images"] == len(KEYS)
    assert result["mIoU_19"] == pytest.approx(1.0)


def test_run_evaluate_prints_and_writes_json(dataset, tmp_path, capsys):
    gt_root, pred_dir, _, _ = dataset
    output = tmp_path / "out" / "result.json"
    assert run_evaluate(pred_dir, gt_root, output_json=output) == 0
    printed = capsys.readouterr().out
    assert "| road | sidewalk |" in printed and "mIoU (16)" in printed and "mIoU (13)" in printed
    saved = json.loads(output.read_text())
    assert saved["iou"]["train"] is None  # NaN -> null
    assert saved["mIoU_19"] == pytest.approx(evaluate_folder(pred_dir, gt_root)["mIoU_19"])
    assert main(["--pred-dir", str(pred_dir), "--gt-dir", str(gt_root)]) == 0


def test_labelid_files_scored_as_trainids_get_a_hint(dataset, tmp_path, capsys):
    gt_root, _, gts, _ = dataset
    # A weak model's official labelId output, holding labelIds 7..17 only: valid trainIds as well.
    pred_dir = tmp_path / "labelid_preds"
    for key, gt in gts.items():
        write_png(
            pred_dir / f"{key}_leftImg8bit.png",
            np.where(gt < 7, 7, np.where(gt > 17, 11, gt)).astype(np.uint8),
        )
    assert run_evaluate(pred_dir, gt_root, trainids=True) == 0
    assert (
        "Hint: no labelled pixel is predicted as trainIds 0..6 (road ... traffic light)"
        in capsys.readouterr().out
    )
    assert run_evaluate(pred_dir, gt_root) == 0  # as labelIds, the files are what they are: no hint
    assert "Hint" not in capsys.readouterr().out
    trainid_dir = tmp_path / "trainid_preds"
    make_predictions(trainid_dir, gts, trainids=True)
    assert run_evaluate(trainid_dir, gt_root, trainids=True) == 0
    assert "Hint" not in capsys.readouterr().out


def test_missing_predictions_are_listed(dataset, capsys):
    gt_root, pred_dir, _, preds = dataset
    preds[KEYS[0]].unlink()
    preds[KEYS[2]].unlink()
    with pytest.raises(EvaluationError) as info:
        evaluate_folder(pred_dir, gt_root)
    message = str(info.value)
    assert "2 of 4 ground-truth images have no prediction" in message
    assert f"{KEYS[0]}_gtFine_labelIds.png" in message and f"{KEYS[2]}_gtFine_labelIds.png" in message
    assert run_evaluate(pred_dir, gt_root) == 1
    assert "no prediction" in capsys.readouterr().err


def test_many_missing_predictions_are_counted(tmp_path):
    gt_root = tmp_path / "cs"
    keys = [f"frankfurt_000000_{i:06d}" for i in range(25)]
    make_ground_truth(gt_root, keys=keys)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match=r"25 of 25 .* and 5 more"):
        evaluate_folder(tmp_path / "empty", gt_root)


def test_wrong_size_and_bad_values_are_each_reported(dataset, capsys):
    gt_root, pred_dir, gts, preds = dataset
    write_png(preds[KEYS[0]], np.zeros((10, 12), dtype=np.uint8))
    bad = gts[KEYS[1]].copy()
    bad[0, :3] = [40, 41, 254]
    write_png(preds[KEYS[1]], bad)
    write_png(preds[KEYS[2]], np.zeros((SIZE[1], SIZE[0], 3), dtype=np.uint8))  # a colour image
    with pytest.raises(EvaluationError) as info:
        evaluate_folder(pred_dir, gt_root)
    problems = info.value.problems
    assert len(problems) == 3
    assert any(KEYS[0] in p and "expected 48x24" in p and "got 12x10" in p for p in problems)
    assert any(KEYS[1] in p and "outside the labelIds" in p and "40, 41, 254" in p for p in problems)
    assert any(KEYS[2] in p and "3 channels" in p for p in problems)
    assert isinstance(info.value, ValueError)
    assert run_evaluate(pred_dir, gt_root) == 1
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and "got 12x10" in err


def test_trainids_out_of_range(dataset, tmp_path):
    gt_root, _, gts, _ = dataset
    train_dir = tmp_path / "preds_train"
    paths = make_predictions(train_dir, gts, trainids=True)
    pred = LABEL_ID_TO_TRAIN_ID[gts[KEYS[3]]].copy()
    pred[0, 0] = 19
    write_png(paths[KEYS[3]], pred)
    with pytest.raises(EvaluationError, match=r"outside the trainIds 0..18 \(255 void\): 19"):
        evaluate_folder(train_dir, gt_root, pred_format="trainIds")
    # 255 in trainIds is allowed (a wrong prediction), and labelId 0 is a valid (void) labelId
    pred[0, 0] = 255
    write_png(paths[KEYS[3]], pred)
    assert evaluate_folder(train_dir, gt_root, pred_format="trainIds")["num_images"] == 4


def test_void_prediction_is_false_negative(tmp_path):
    gt_root = tmp_path / "cs"
    gts = make_ground_truth(gt_root, keys=KEYS[:1])
    gt = gts[KEYS[0]]
    gt[:] = 7  # all road
    write_png(gt_root / "gtFine" / "val" / "frankfurt" / f"{KEYS[0]}_gtFine_labelIds.png", gt)
    pred = gt.copy()
    pred[:, : SIZE[0] // 2] = 0  # "unlabeled" on half the road
    write_png(tmp_path / "p" / f"{KEYS[0]}.png", pred)
    result = evaluate_folder(tmp_path / "p", gt_root)
    assert result["iou"]["road"] == pytest.approx(0.5)
    assert math.isnan(result["iou"]["sidewalk"])


def test_duplicate_and_missing_folders(dataset, tmp_path):
    gt_root, pred_dir, gts, _ = dataset
    write_png(pred_dir / "copy" / f"{KEYS[1]}_other.png", gts[KEYS[1]])
    with pytest.raises(EvaluationError, match="several predictions match"):
        evaluate_folder(pred_dir, gt_root)
    with pytest.raises(FileNotFoundError, match="pred_dir"):
        evaluate_folder(tmp_path / "nope", gt_root)
    with pytest.raises(FileNotFoundError, match="gt_dir"):
        evaluate_folder(pred_dir, tmp_path)
    with pytest.raises(ValueError, match="pred_format"):
        evaluate_folder(pred_dir, gt_root, pred_format="colors")  # type: ignore[arg-type]
    assert run_evaluate(tmp_path / "nope", gt_root) == 1
