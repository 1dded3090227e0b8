from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from uda_sam.pseudo_labels.thresholds import (
    ClasswiseThresholdEstimator,
    PseudoLabelStatistics,
    make_pseudo_labels,
    save_label_png,
    threshold_predictions,
)


def random_probs(
    generator: torch.Generator, batch: int = 2, classes: int = 19, size=(16, 20), temperature=3.0
):
    logits = torch.randn(batch, classes, *size, generator=generator) * temperature
    return logits.softmax(dim=1)


def exact_medians(batches: list[torch.Tensor], classes: int) -> list[float | None]:
    """Reference: sort every confidence of each class and take np.sort(x)[len(x) // 2]."""
    conf = np.concatenate([b.max(1).values.numpy().ravel() for b in batches])
    pred = np.concatenate([b.argmax(1).numpy().ravel() for b in batches])
    out: list[float | None] = []
    for c in range(classes):
        x = np.sort(conf[pred == c])
        out.append(float(x[len(x) // 2]) if len(x) else None)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_equal_exact_median_within_one_bin(seed):
    g = torch.Generator().manual_seed(seed)
    batches = [random_probs(g, temperature=0.5 + seed) for _ in range(5)]
    estimator = ClasswiseThresholdEstimator(num_classes=19, num_bins=1000, cap=1.0)
    for probs in batches:
        estimator.update(probs)
    tau = estimator.compute()
    assert tau.dtype == torch.float32 and tau.shape == (19,)
    for c, median in enumerate(exact_medians(batches, 19)):
        assert median is not None
        # documented convention: lower edge of the median's bin, tau <= median < tau + 1/num_bins
        assert float(tau[c]) <= median + 1e-6
        assert median - float(tau[c]) <= 1e-3 + 1e-6


def test_small_counts_exact_convention():
    # confidences chosen at bin centres: the result is the lower bin edge of np.sort(x)[len(x)//2]
    estimator = ClasswiseThresholdEstimator(num_classes=2, cap=1.0)
    conf = torch.tensor([0.6005, 0.7005, 0.8005, 0.9005, 0.5505, 0.9505])
    pred = torch.tensor([0, 0, 0, 0, 1, 1])
    estimator.update_from_predictions(conf, pred)
    tau = estimator.compute()
    assert tau[0] == pytest.approx(0.800)  # sorted 0.6,0.7,0.8,0.9 -> index 2
    assert tau[1] == pytest.approx(0.950)  # sorted 0.55,0.95 -> index 1


def test_cap_and_never_predicted_class():
    probs = torch.zeros(1, 4, 2, 2)
    probs[:, 0] = 0.97  # class 0 very confident
    probs[:, 1] = 0.01
    probs[:, 2] = 0.01
    probs[:, 3] = 0.01
    probs[0, :, 1, 1] = torch.tensor([0.1, 0.6, 0.2, 0.1])  # one pixel of class 1 at 0.6
    estimator = ClasswiseThresholdEstimator(num_classes=4)
    estimator.update(probs)
    tau = estimator.compute()
    assert tau[0] == pytest.approx(0.9)  # min(cap, 0.97)
    assert tau[1] == pytest.approx(0.6, abs=1e-3)
    assert tau[2] == pytest.approx(0.9) and tau[3] == pytest.approx(0.9)  # never predicted -> cap
    assert estimator.counts.tolist() == [3, 1, 0, 0]
    assert ClasswiseThresholdEstimator(num_classes=4, cap=0.8).compute().tolist() == pytest.approx([0.8] * 4)


def test_confidence_one_falls_in_last_bin():
    estimator = ClasswiseThresholdEstimator(num_classes=2, cap=1.0)
    estimator.update_from_predictions(torch.ones(3), torch.zeros(3, dtype=torch.long))
    assert int(estimator.histogram[0, -1]) == 3
    assert float(estimator.compute()[0]) == pytest.approx(0.999)


def test_histogram_addition_equals_combined_update():
    g = torch.Generator().manual_seed(3)
    a_probs, b_probs = random_probs(g), random_probs(g, batch=3)
    a, b, both = ClasswiseThresholdEstimator(), ClasswiseThresholdEstimator(), ClasswiseThresholdEstimator()
    a.update(a_probs)
    b.update(b_probs)
    both.update(a_probs)
    both.update(b_probs)
    assert a.histogram.dtype == torch.int64 and a.histogram.shape == (19, 1000)
    torch.testing.assert_close(a.histogram + b.histogram, both.histogram)
    a.histogram += b.histogram
    torch.testing.assert_close(a.compute(), both.compute())
    assert int(both.histogram.sum()) == 5 * 16 * 20
    a.sync()  # not distributed: a no-op
    torch.testing.assert_close(a.histogram, both.histogram)


def test_state_dict_roundtrip_and_reset():
    g = torch.Generator().manual_seed(4)
    estimator = ClasswiseThresholdEstimator()
    estimator.update(random_probs(g))
    state = estimator.state_dict()
    restored = ClasswiseThresholdEstimator()
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.histogram, estimator.histogram)
    torch.testing.assert_close(restored.compute(), estimator.compute())
    state["histogram"][0, 0] += 1  # the state is a copy
    assert not torch.equal(state["histogram"], estimator.histogram)
    estimator.reset()
    assert int(estimator.histogram.sum()) == 0
    with pytest.raises(ValueError, match="num_classes, num_bins, cap"):
        ClasswiseThresholdEstimator(num_classes=5).load_state_dict(restored.state_dict())
    with pytest.raises(ValueError, match="lacks"):
        restored.load_state_dict({"histogram": torch.zeros(19, 1000)})


def test_bad_input():
    estimator = ClasswiseThresholdEstimator()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        estimator.update(torch.rand(19, 4, 4))
    with pytest.raises(ValueError, match="has 7 classes on axis 1, expected 19"):
        estimator.update(torch.rand(1, 7, 4, 4))
    with pytest.raises(ValueError, match="floating-point"):
        estimator.update(torch.ones(1, 19, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside 0..18"):
        estimator.update_from_predictions(torch.rand(3), torch.tensor([0, 19, 1]))
    with pytest.raises(ValueError, match="num_bins"):
        ClasswiseThresholdEstimator(num_bins=100)
    with pytest.raises(ValueError, match="cap"):
        ClasswiseThresholdEstimator(cap=1.5)
    with pytest.raises(ValueError, match="has 19 classes on axis 1, expected 4"):
        make_pseudo_labels(torch.rand(1, 19, 2, 2), torch.full((4,), 0.5))


def test_make_pseudo_labels():
    probs = torch.tensor([[0.7, 0.2], [0.2, 0.5], [0.1, 0.3]]).reshape(1, 3, 1, 2)  # (B=1, C=3, H=1, W=2)
    # pixel 0: class 0 at 0.7; pixel 1: class 1 at 0.5
    labels = make_pseudo_labels(probs, torch.tensor([0.7, 0.6, 0.1]))
    assert labels.dtype == torch.uint8 and labels.shape == (1, 1, 2)
    assert labels.tolist() == [[[0, 255]]]  # conf == tau keeps the label; conf < tau -> 255
    assert make_pseudo_labels(probs, [0.8, 0.4, 0.1]).tolist() == [[[255, 1]]]


def test_make_pseudo_labels_random_against_reference():
    g = torch.Generator().manual_seed(5)
    probs = random_probs(g)
    tau = torch.rand(19, generator=g) * 0.9
    labels = make_pseudo_labels(probs, tau).numpy()
    conf, pred = probs.max(1)
    expected = np.where(conf.numpy() >= tau.numpy()[pred.numpy()], pred.numpy(), 255)
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(threshold_predictions(conf, pred, tau).numpy(), expected)


def test_save_label_png(tmp_path):
    label = np.array([[0, 18, 255], [3, 4, 5]], dtype=np.uint8)
    path = save_label_png(label, tmp_path / "a" / "b" / "x.png")
    with Image.open(path) as image:
        assert image.mode == "L"
        np.testing.assert_array_equal(np.array(image), label)
    save_label_png(torch.from_numpy(label).long(), tmp_path / "y.png")
    with Image.open(tmp_path / "y.png") as image:
        np.testing.assert_array_equal(np.array(image), label)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        save_label_png(np.zeros((1, 2, 2), np.uint8), tmp_path / "z.png")
    with pytest.raises(ValueError, match="0..255"):
        save_label_png(np.full((2, 2), 300), tmp_path / "z.png")


def test_pseudo_label_statistics():
    stats = PseudoLabelStatistics(num_classes=3)
    pseudo = torch.tensor([[[0, 0, 1, 255], [2, 2, 0, 1]]], dtype=torch.uint8)
    gt = torch.tensor([[[0, 1, 1, 0], [2, 255, 255, 0]]])
    stats.update(pseudo, gt)
    stats.update(torch.full((1, 2, 4), 255, dtype=torch.uint8))  # no GT: counts pixels and labels only
    result = stats.compute()
    assert int(result["total_pixels"]) == 16
    assert result["labelled"].tolist() == [3, 2, 2]
    assert result["share"].tolist() == pytest.approx([3 / 16, 2 / 16, 2 / 16])
    assert float(result["labelled_share"]) == pytest.approx(7 / 16)
    # class 0: evaluated at (0,0) ok and (0,1) gt 1 -> 1/2; class 1: (0,2) ok, (1,3) gt 0 -> 1/2; class 2: (1,0) ok
    assert result["precision"].tolist() == pytest.approx([0.5, 0.5, 1.0])
    # recall over GT pixels: class 0 has 3 GT pixels, 1 hit; class 1 has 2, 1 hit; class 2 has 1, 1 hit
    assert result["recall"].tolist() == pytest.approx([1 / 3, 1 / 2, 1.0])
    records = stats.as_records(thresholds=[0.9, 0.8, 0.7], class_names=["a", "b", "c"])
    assert records[1] == {
        "class": "b",
        "threshold": pytest.approx(0.8),
        "share": 0.125,
        "precision": 0.5,
        "recall": 0.5,
        "labelled_pixels": 2,
    }
    empty = PseudoLabelStatistics(num_classes=3)
    empty.update(torch.zeros(1, 2, 2, dtype=torch.uint8))
    assert np.isnan(empty.compute()["precision"].numpy()).all()
    assert empty.as_records()[0]["precision"] is None
    with pytest.raises(ValueError, match="shape"):
        stats.update(pseudo, gt[:, :1])
    with pytest.raises(ValueError, match="outside"):
        stats.update(torch.full((1, 2), 7, dtype=torch.uint8))
    stats.reset()
    assert int(stats.compute()["total_pixels"]) == 0


def _sync_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        g = torch.Generator().manual_seed(7)
        batches = [random_probs(g) for _ in range(4)]
        estimator = ClasswiseThresholdEstimator()
        stats = PseudoLabelStatistics()
        for probs in batches[rank::world_size]:  # each rank sees its own shard
            estimator.update(probs)
            stats.update(make_pseudo_labels(probs, torch.full((19,), 0.3)))
        estimator.sync()
        stats.sync()
        torch.save(
            {"tau": estimator.compute(), "labelled": stats.compute()["labelled"]}, f"{out_dir}/rank{rank}.pt"
        )
    finally:
        torch.distributed.destroy_process_group()


def test_sync_across_two_processes_equals_single_process(tmp_path):
    torch.multiprocessing.spawn(
        _sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    g = torch.Generator().manual_seed(7)
    estimator, stats = ClasswiseThresholdEstimator(), PseudoLabelStatistics()
    for probs in [random_probs(g) for _ in range(4)]:
        estimator.update(probs)
        stats.update(make_pseudo_labels(probs, torch.full((19,), 0.3)))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["tau"], estimator.compute())
        torch.testing.assert_close(result["labelled"], stats.compute()["labelled"])


def test_sync_sums_through_a_given_reduction() -> None:
    """``sync(reduce_sum, device)``: what a generation sums its histogram and statistics with."""
    seen: list[torch.device] = []

    def two_equal_processes(tensor: torch.Tensor) -> torch.Tensor:
        seen.append(tensor.device)
        return tensor * 2

    probs = torch.softmax(torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    estimator = ClasswiseThresholdEstimator(num_classes=4)
    estimator.update(probs)
    single = estimator.histogram.clone()
    estimator.sync(two_equal_processes, device="cpu")
    assert seen == [torch.device("cpu")]
    assert estimator.histogram.device == single.device and torch.equal(estimator.histogram, 2 * single)
    stats = PseudoLabelStatistics(num_classes=4)
    labels = torch.tensor([[0, 1, 255], [2, 2, 3]])
    stats.update(labels, labels)
    counts, total = stats.counts.clone(), stats.total_pixels.clone()
    stats.sync(two_equal_processes)
    assert torch.equal(stats.counts, 2 * counts) and torch.equal(stats.total_pixels, 2 * total)
