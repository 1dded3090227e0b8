from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import uda_sam.evaluation.metrics as metrics_module
from uda_sam.data.labels import CLASS_NAMES, SYNTHIA_13_CLASSES, SYNTHIA_16_CLASSES
from uda_sam.evaluation.metrics import (
    SegmentationMetrics,
    confusion_from_labels,
    format_iou_table,
    iou_from_confusion,
    mean_iou,
    pair_counts,
)


def reference_iou(preds: np.ndarray, target: np.ndarray, num_classes: int = 19) -> np.ndarray:
    """Official-script semantics, written independently with numpy: loops over classes."""
    labelled = target != 255
    p, t = preds[labelled], target[labelled]
    iou = np.full(num_classes, np.nan)
    for c in range(num_classes):
        tp = np.sum((p == c) & (t == c))
        fp = np.sum((p == c) & (t != c))
        fn = np.sum((t == c) & (p != c))
        if tp + fp + fn:
            iou[c] = tp / (tp + fp + fn)
    return iou


def random_batch(
    generator: torch.Generator, shape=(2, 9, 11), num_classes: int = 19, ignore_share: float = 0.2
):
    target = torch.randint(0, num_classes, shape, generator=generator)
    target[torch.rand(shape, generator=generator) < ignore_share] = 255
    preds = torch.randint(0, num_classes, shape, generator=generator)
    return preds, target


def test_matches_numpy_reference_over_batches():
    g = torch.Generator().manual_seed(0)
    metric = SegmentationMetrics()
    all_p, all_t = [], []
    for _ in range(4):
        preds, target = random_batch(g)
        metric.update(preds, target)
        all_p.append(preds.numpy().ravel())
        all_t.append(target.numpy().ravel())
    result = metric.compute()
    expected = reference_iou(np.concatenate(all_p), np.concatenate(all_t))
    np.testing.assert_allclose(result["iou"].numpy(), expected, rtol=1e-6, equal_nan=True)
    assert result["iou"].shape == (19,)
    assert math.isclose(float(result["mIoU_19"]), np.nanmean(expected), rel_tol=1e-6)
    assert math.isclose(float(result["mIoU_16"]), np.nanmean(expected[SYNTHIA_16_CLASSES]), rel_tol=1e-6)
    assert math.isclose(float(result["mIoU_13"]), np.nanmean(expected[SYNTHIA_13_CLASSES]), rel_tol=1e-6)
    confusion = result["confusion"]
    assert confusion.dtype == torch.int64 and confusion.shape == (19, 19)
    assert int(confusion.sum()) == sum(int((t != 255).sum()) for t in all_t)


def test_logits_are_reduced_with_argmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 19, 5, 6, generator=g)
    target = torch.randint(0, 19, (2, 5, 6), generator=g)
    a, b = SegmentationMetrics(), SegmentationMetrics()
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    torch.testing.assert_close(a.compute()["confusion"], b.compute()["confusion"])


def test_nan_for_absent_classes_and_nan_skipping_means():
    metric = SegmentationMetrics()
    target = torch.tensor([[[0, 0, 1, 255]]])
    preds = torch.tensor([[[0, 1, 1, 5]]])
    metric.update(preds, target)
    result = metric.compute()
    iou = result["iou"]
    # road: tp 1, fn 1 -> 1/2; sidewalk: tp 1, fp 1 -> 1/2; class 5 only on an ignored pixel -> NaN
    assert iou[0] == pytest.approx(0.5) and iou[1] == pytest.approx(0.5)
    assert torch.isnan(iou[2:]).all()
    assert float(result["mIoU_19"]) == pytest.approx(0.5)
    # the 13-class subset holds road and sidewalk too
    assert float(result["mIoU_13"]) == pytest.approx(0.5)


def test_subset_computed_on_19_class_matrix():
    # terrain (9) ground truth predicted as road: a false positive of road even in the 16-class mean
    metric = SegmentationMetrics()
    metric.update(torch.tensor([[[0, 0]]]), torch.tensor([[[0, 9]]]))
    result = metric.compute()
    assert 9 not in SYNTHIA_16_CLASSES
    assert float(result["mIoU_16"]) == pytest.approx(0.5)


def test_all_undefined_gives_nan():
    metric = SegmentationMetrics()
    metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 255))
    result = metric.compute()
    assert torch.isnan(result["iou"]).all()
    assert math.isnan(float(result["mIoU_19"]))


def test_predictions_outside_range_are_false_negatives():
    metric = SegmentationMetrics()
    target = torch.tensor([[[0, 0, 0, 1]]])
    preds = torch.tensor([[[0, 255, -1, 1]]])
    metric.update(preds, target)
    result = metric.compute()
    assert result["iou"][0] == pytest.approx(1 / 3)  # tp 1, fn 2 (no class), fp 0
    assert result["iou"][1] == pytest.approx(1.0)  # the invalid predictions are nobody's false positive
    assert int(result["confusion"].sum()) == 2
    expected = reference_iou(preds.numpy().ravel(), target.numpy().ravel())
    np.testing.assert_allclose(result["iou"].numpy(), expected, equal_nan=True)


def test_reset_and_state_is_summable():
    g = torch.Generator().manual_seed(2)
    p1, t1 = random_batch(g)
    p2, t2 = random_batch(g)
    a, b, both = SegmentationMetrics(), SegmentationMetrics(), SegmentationMetrics()
    a.update(p1, t1)
    b.update(p2, t2)
    both.update(p1, t1)
    both.update(p2, t2)
    # what DDP's dist_reduce_fx="sum" does to the states
    torch.testing.assert_close(a.confusion + b.confusion, both.confusion)
    assert a._reductions["confusion"] is not None
    a.reset()
    assert int(a.confusion.sum()) == 0 and int(a.unmatched.sum()) == 0


def test_bad_input():
    metric = SegmentationMetrics()
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="target holds values"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 19))
    with pytest.raises(ValueError, match=r"\(B, 19, H, W\)"):
        metric.update(torch.zeros(1, 5, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="class_subsets"):
        SegmentationMetrics(class_subsets={"x": [25]})


def test_other_class_count():
    metric = SegmentationMetrics(num_classes=3)
    metric.update(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0, 1, 1]]]))
    result = metric.compute()
    assert set(result) == {"iou", "mIoU_3", "confusion"}
    assert float(result["mIoU_3"]) == pytest.approx((1 + 0.5 + 0) / 3)


def test_iou_from_confusion_and_mean():
    confusion = torch.tensor([[3, 1], [0, 0]])
    iou = iou_from_confusion(confusion)
    assert iou[0] == pytest.approx(0.75) and iou[1] == pytest.approx(0.0)
    iou = iou_from_confusion(confusion, unmatched=torch.tensor([1, 0]))
    assert iou[0] == pytest.approx(0.6)
    assert float(mean_iou(torch.tensor([0.5, float("nan"), 1.0]))) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="square"):
        iou_from_confusion(torch.zeros(2, 3))


def test_format_iou_table():
    iou = torch.linspace(0.0, 0.9, 19)
    iou[9] = float("nan")
    table = format_iou_table(iou)
    header, rule, row = table.splitlines()
    names = [c.strip() for c in header.strip("|").split("|")]
    assert names == list(CLASS_NAMES) + ["mIoU (19)"]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "0.0" and cells[18] == "90.0" and cells[9] == "n/a"
    assert cells[-1] == f"{100 * float(np.nanmean(iou.numpy())):.1f}"
    table16 = format_iou_table(iou, subset="16", digits=2)
    assert "terrain" not in table16 and "mIoU (16)" in table16
    cells16 = [c.strip() for c in table16.splitlines()[2].strip("|").split("|")]
    assert cells16[-1] == f"{100 * float(np.nanmean(iou.numpy()[SYNTHIA_16_CLASSES])):.2f}"
    as_dict = format_iou_table(dict(zip(CLASS_NAMES, iou.tolist(), strict=True)), subset="13")
    assert as_dict == format_iou_table(iou, subset="13")
    with pytest.raises(ValueError, match="subset"):
        format_iou_table(iou, subset="7")
    with pytest.raises(ValueError, match="19 values"):
        format_iou_table(iou[:5])


def test_pair_counts_hold_every_pixel_once() -> None:
    preds = torch.tensor([[0, 1, 7, -1, 2, 0]])
    target = torch.tensor([[0, 1, 1, 2, 255, 9]])  # 9: neither one of 3 classes nor the ignore index
    counts = pair_counts(preds, target, num_classes=3, ignore_index=255)
    assert counts.shape == (3 * 3 + 3 + 2,) and int(counts.sum()) == preds.numel()
    confusion = counts[:9].view(3, 3)
    assert confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert counts[9:12].tolist() == [0, 1, 1]  # class 1 predicted as 7, class 2 predicted as -1
    assert int(counts[12]) == 1 and int(counts[13]) == 1  # one unlabelled pixel, one invalid ground truth
    valid = target != 9
    same = confusion_from_labels(preds[valid], target[valid], num_classes=3, ignore_index=255)
    assert torch.equal(same[0], confusion) and torch.equal(same[1], counts[9:12])


def test_invalid_ground_truth_is_refused_when_scored(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an accelerator the check waits for compute() (no synchronisation per batch); on the CPU, update()."""
    metric = SegmentationMetrics()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = torch.full((1, 2, 2), 19, device=device)
    preds = torch.zeros(1, 2, 2, dtype=torch.long, device=device)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="target holds values.*min 19, max 19"):
            metric.update(preds, target)
        assert int(metric.invalid) == 0  # nothing of the refused batch was added
        # As for a target on an accelerator: the count is kept and compute() refuses.
        monkeypatch.setattr(metrics_module, "_check_at_once", lambda target: False)
    metric.update(preds, target)
    assert int(metric.invalid) == 4
    with pytest.raises(ValueError, match="target holds values.*4 such pixels"):
        metric.compute()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_update_on_cuda_makes_no_device_synchronisation() -> None:
    generator = torch.Generator().manual_seed(3)
    preds, target = random_batch(generator, shape=(2, 64, 128))
    metric = SegmentationMetrics().cuda()
    reference = SegmentationMetrics()
    reference.update(preds, target)
    preds, target = preds.cuda(), target.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metric.update(preds, target)
        metric.update(torch.randn(2, 19, 64, 128, device="cuda"), target)  # logits: argmax on the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(metric.confusion.sum()) == 2 * int(reference.confusion.sum())
    metric.reset()
    metric.update(preds, target)
    assert torch.equal(metric.confusion.cpu(), reference.confusion)
    assert torch.equal(metric.unmatched.cpu(), reference.unmatched)
