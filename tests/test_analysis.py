"""Tests of uda_sam.evaluation.analysis (eq. 12, eq. 13, Fig. 3, Fig. E.4) and of the entropy/attention callbacks."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader, Dataset

from uda_sam.callbacks.attention import AttentionVisualization
from uda_sam.callbacks.entropy import EntropyAnalysisCallback
from uda_sam.data.labels import CLASS_NAMES
from uda_sam.evaluation.analysis import (
    EntropyAnalysis,
    attention_maps,
    attention_maps_from_logits,
    denormalize,
    entropy_by_correctness,
    jet_colormap,
    label_similarity,
    logits_and_refined,
    most_confident_pixel,
    overlay,
    pixel_similarity,
    pool_to_max_pixels,
    similarity_map,
    similarity_matrices,
)
from uda_sam.nn import DeepLabV2, SegmentationNetwork, SelfAttentionModule, segmentation_loss


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _entropy(*p: float) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


# --------------------------------------------------------------------------------------------------- entropy
def test_entropy_by_correctness_hand_computed() -> None:
    # Four pixels (1 x 4), two classes: correct (0.9 -> 0), correct (0.8 -> 1), wrong (0.7 -> 0, label 1), ignored.
    p0 = torch.tensor([0.9, 0.2, 0.7, 0.5])
    probs = torch.stack([p0, 1 - p0]).reshape(1, 2, 1, 4)
    labels = torch.tensor([[[0, 1, 1, 255]]])
    correct, incorrect = entropy_by_correctness(probs, labels)
    assert correct.shape == incorrect.shape == (1,)
    assert correct.item() == pytest.approx((_entropy(0.9, 0.1) + _entropy(0.2, 0.8)) / 2, rel=1e-6)
    assert incorrect.item() == pytest.approx(_entropy(0.7, 0.3), rel=1e-6)


def test_entropy_nan_for_missing_group_and_nan_skipping_mean() -> None:
    probs = torch.tensor([[0.9, 0.6], [0.1, 0.4]]).reshape(1, 2, 1, 2).repeat(2, 1, 1, 1)
    labels = torch.tensor([[[0, 0]], [[1, 1]]])  # image 0: all correct; image 1: all wrong
    correct, incorrect = entropy_by_correctness(probs, labels)
    assert not math.isnan(correct[0]) and math.isnan(incorrect[0])
    assert math.isnan(correct[1]) and not math.isnan(incorrect[1])
    all_ignored = torch.full((1, 1, 2), 255)
    assert all(math.isnan(v.item()) for v in entropy_by_correctness(probs[:1], all_ignored))

    analysis = EntropyAnalysis()
    analysis.update(probs, labels)
    analysis.update_means(torch.tensor([1.0, math.nan]), torch.tensor([math.nan, 3.0]))
    result = analysis.compute()
    mean_h = (_entropy(0.9, 0.1) + _entropy(0.6, 0.4)) / 2
    assert result["num_images"] == 4
    assert result["entropy_correct"] == pytest.approx((mean_h + 1.0) / 2)
    assert result["entropy_incorrect"] == pytest.approx((mean_h + 3.0) / 2)
    assert math.isnan(EntropyAnalysis().compute()["entropy_correct"])


def test_entropy_analysis_state_adds_up() -> None:
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(4, 3, 5, 6, generator=generator).softmax(dim=1)
    labels = torch.randint(0, 3, (4, 5, 6), generator=generator)
    labels[0, :2] = 255
    combined, first, second = EntropyAnalysis(), EntropyAnalysis(), EntropyAnalysis()
    combined.update(probs, labels)
    first.update(probs[:1], labels[:1])
    second.update(probs[1:], labels[1:])
    summed = first + second
    torch.testing.assert_close(summed.state_tensor(), combined.state_tensor())
    assert summed.compute() == pytest.approx(combined.compute())
    restored = EntropyAnalysis()
    restored.load_state_tensor(first.state_tensor() + second.state_tensor())
    assert restored.compute() == pytest.approx(combined.compute())
    with pytest.raises(ValueError, match="state"):
        restored.load_state_tensor(torch.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        combined.update(probs, labels[:, :2])


# ----------------------------------------------------------------------------------- attention / similarity
def test_most_confident_pixel() -> None:
    logits = torch.zeros(3, 4, 5)
    logits[1, 2, 3] = 5.0
    logits[1, 0, 0] = 2.0
    logits[0] = 1.0  # class 0 wins wherever class 1 does not
    assert most_confident_pixel(logits, 1) == (2, 3)
    assert most_confident_pixel(logits.unsqueeze(0), 1) == (2, 3)
    assert most_confident_pixel(logits.softmax(dim=0), 1) == (2, 3)
    assert most_confident_pixel(logits, 2) is None  # predicted nowhere
    with pytest.raises(ValueError, match="class_index"):
        most_confident_pixel(logits, 3)


def test_similarity_map_range_and_peak() -> None:
    logits = torch.randn(19, 6, 7, generator=torch.Generator().manual_seed(1))
    sim = similarity_map(logits, (4, 2))
    assert sim.shape == (6, 7)
    assert sim[4, 2].item() == pytest.approx(1.0, abs=1e-5)
    assert sim.min() >= 0 and sim.max() <= 1 + 1e-5
    full = pixel_similarity(logits)
    assert full.shape == (42, 42)
    torch.testing.assert_close(full[4 * 7 + 2].reshape(6, 7), sim)
    with pytest.raises(ValueError, match="pixel"):
        similarity_map(logits, (6, 0))


def test_label_similarity() -> None:
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    sim = label_similarity(labels, num_classes=3)
    flat = labels.flatten()
    valid = flat != 255
    expected = ((flat[:, None] == flat[None, :]) & valid[:, None] & valid[None, :]).float()
    torch.testing.assert_close(sim, expected)
    assert sim[6].sum() == 0 and sim[:, 7].sum() == 0  # ignore rows/columns are zero, the diagonal included
    # Nearest resize of a 4x8 label map to the 2x4 grid keeps the class layout.
    big = labels.repeat_interleave(2, 0).repeat_interleave(2, 1)
    torch.testing.assert_close(label_similarity(big, size=(2, 4), num_classes=3), expected)
    with pytest.raises(ValueError, match="labels"):
        label_similarity(torch.tensor([[3, 0]]), num_classes=3)


def test_similarity_matrices_pool_and_sort() -> None:
    logits = torch.randn(19, 40, 80, generator=torch.Generator().manual_seed(2))
    pooled = pool_to_max_pixels(logits, 1024)
    assert pooled.shape[-2] * pooled.shape[-1] <= 1024 and pooled.shape[-2:] == (20, 40)
    labels = torch.randint(0, 19, (80, 160), generator=torch.Generator().manual_seed(3))
    labels[:10] = 255
    out = similarity_matrices(logits, labels)
    n = 20 * 40
    assert out["size"] == (20, 40) and out["logits"].shape == out["labels"].shape == (n, n)
    ordered = torch.diagonal(out["labels"])
    assert torch.all(ordered[:-1] >= ordered[1:])  # labelled pixels first, ignored (zero rows) last


def test_attention_maps_with_deeplab_and_sam() -> None:
    torch.manual_seed(0)
    network = DeepLabV2(num_classes=19, backbone="resnet18")
    sam = SelfAttentionModule(19)
    network.train()
    image = torch.randn(3, 32, 64)
    logits = network.eval()(image[None])[0].detach()
    network.train()
    present = CLASS_NAMES[int(logits.argmax(dim=0)[0, 0])]
    classes = sorted({present, "road", "car"})
    maps = attention_maps(network, image, classes, sam=sam)
    assert network.training and sam.training  # modes restored
    assert set(maps) == set(classes)
    entry = maps[present]
    assert entry["pixel"] is not None
    for key in ("logits", "after_sam"):
        assert isinstance(entry[key], np.ndarray) and entry[key].shape == tuple(logits.shape[-2:]) == (4, 8)
        assert entry[key][entry["pixel"]] == pytest.approx(1.0, abs=1e-4)
    plain = attention_maps(network, image[None], [present])
    assert plain[present]["after_sam"] is None and plain[present]["pixel"] == entry["pixel"]
    with pytest.raises(ValueError, match="classes"):
        attention_maps(network, image, ["not-a-class"])


def test_overlay_colormap_denormalize() -> None:
    rgb = np.zeros((16, 32, 3), dtype=np.uint8)
    out = overlay(rgb, np.array([[0.0, 1.0], [1.0, 0.0]]), alpha=1.0)
    assert out.shape == (16, 32, 3) and out.dtype == np.uint8
    assert tuple(jet_colormap(np.array(0.0))) == (0, 0, 128)
    assert tuple(jet_colormap(np.array(1.0))) == (128, 0, 0)
    assert tuple(out[0, 0]) == (0, 0, 128) and tuple(out[0, -1]) == (128, 0, 0)
    image = torch.zeros(1, 3, 4, 5)
    assert denormalize(image, "imagenet").shape == (4, 5, 3)
    with pytest.raises(ValueError, match="heatmap"):
        overlay(rgb, np.zeros((2, 2, 2)))


# ------------------------------------------------------------------------------------------------ callbacks
class _RandomSegmentation(Dataset):
    """Random normalised 64x32 images with 128x64 "full-resolution" masks (some 255)."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(count, 3, 32, 64, generator=generator)
        self.masks = torch.randint(0, 19, (count, 64, 128), generator=generator)
        self.masks[:, :4] = 255

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "mask": self.masks[index], "name": f"city/img_{index}"}


class _DataModule(pl.LightningDataModule):
    normalization = "imagenet"

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_RandomSegmentation(4, 0), batch_size=1)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_RandomSegmentation(3, 1), batch_size=2)


class _Task(pl.LightningModule):
    """Holds ``network`` and ``sam`` the way the package's tasks do; trains P + SAM(P)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.network = DeepLabV2(num_classes=19, backbone="resnet18")
        self.sam = SelfAttentionModule(19)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.network(batch["image"])
        logits = logits + self.sam(logits)
        return segmentation_loss(
            self.network.upsample_logits(logits, batch["mask"].shape[-2:]), batch["mask"]
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _fit(
    tmp_path: Path, logger: object, callbacks: list, val_check_interval: int | None = None
) -> pl.Trainer:
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        logger=logger,
        callbacks=callbacks,
        max_steps=4,
        limit_val_batches=1,
        val_check_interval=val_check_interval,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(_Task(), datamodule=_DataModule())
    return trainer


def test_callbacks_write_csv_and_pngs(tmp_path: Path) -> None:
    entropy = EntropyAnalysisCallback(every_n_steps=2, max_images=2)
    attention = AttentionVisualization(classes=["road", "car"], num_images=1)
    _fit(tmp_path, CSVLogger(tmp_path, name="run"), [entropy, attention], val_check_interval=2)
    log_dir = tmp_path / "run" / "version_0"
    with (log_dir / "entropy.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [2, 4]  # the final step is not repeated at the end
    assert all(int(row["num_images"]) == 2 for row in rows)
    assert all(float(row["entropy_correct"]) >= 0 or row["entropy_correct"] == "nan" for row in rows)
    assert all(0 <= float(row["entropy_incorrect"]) <= math.log(19) + 1e-4 for row in rows)
    with (log_dir / "metrics.csv").open() as handle:
        logged = list(csv.DictReader(handle))
    assert any(row.get("analysis/entropy_incorrect") for row in logged)
    pngs = sorted(p.name for p in (log_dir / "attention" / "step_4").glob("*.png"))
    assert pngs == ["car_0_city_img_0.png", "road_0_city_img_0.png", "similarity_0_city_img_0.png"]


def test_callbacks_without_logger_and_with_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    csv_path = tmp_path / "custom" / "entropy.csv"
    _fit(
        tmp_path / "plain",
        False,
        [
            EntropyAnalysisCallback(every_n_steps=3, output_csv=str(csv_path), max_images=1),
            AttentionVisualization(every_n_steps=2, classes=["sky"], num_images=1, log_similarity=False),
        ],
        val_check_interval=1,  # step 3's validation pass is analysed; step 4 (not due) by a pass at the end
    )
    assert [row.split(",")[0] for row in csv_path.read_text().splitlines()] == ["step", "3", "4"]
    assert (tmp_path / "plain" / "attention" / "step_2" / "sky_0_city_img_0.png").is_file()
    assert (tmp_path / "plain" / "attention" / "step_4").is_dir()

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    logger = WandbLogger(save_dir=str(wandb_dir), offline=True, project="uda-sam-test")
    try:
        _fit(
            wandb_dir,
            logger,
            [EntropyAnalysisCallback(every_n_steps=4, max_images=1), AttentionVisualization(num_images=1)],
        )
    finally:
        logger.experiment.finish()
    assert (wandb_dir / "entropy.csv").is_file()  # WandbLogger: log_dir is its save_dir
    assert not (wandb_dir / "attention").exists()  # images went to W&B ...
    media = {p.name.split("_")[0] for p in wandb_dir.glob("wandb/*/files/media/images/attention/*.png")}
    assert media == {"road", "car", "person", "sky", "similarity"}  # ... as media of the offline run


def test_attention_visualization_rejects_unknown_class() -> None:
    with pytest.raises(ValueError, match="classes"):
        AttentionVisualization(classes=["road", "spaceship"])
    with pytest.raises(ValueError, match="every_n_steps"):
        EntropyAnalysisCallback(every_n_steps=0)


def test_attention_visualization_runs_network_and_sam_once_per_image() -> None:
    task = _Task()
    calls = {"network": 0, "sam": 0}
    task.network.register_forward_hook(lambda *_: calls.__setitem__("network", calls["network"] + 1))
    task.sam.register_forward_hook(lambda *_: calls.__setitem__("sam", calls["sam"] + 1))
    dataset = _RandomSegmentation(2, 4)
    samples = [dataset[0], dataset[1]]
    figures = AttentionVisualization(classes=["road", "car"], num_images=2).draw(task, samples)
    assert calls == {"network": 2, "sam": 2}  # one pass per image for the maps and the similarity matrices
    assert sorted(figures) == ["attention/car", "attention/road", "attention/similarity"]
    assert all(len(images) == 2 for images, _ in figures.values())
    # The maps equal those of attention_maps, which runs the network itself.
    expected = attention_maps(task.network, samples[0]["image"], ["road"], sam=task.sam)
    logits, refined = logits_and_refined(task.network, samples[0]["image"], sam=task.sam)
    assert expected["road"]["pixel"] == attention_maps_from_logits(logits, ["road"], refined)["road"]["pixel"]


class _CountingNet(SegmentationNetwork):
    """Wraps a network (of output stride 8) and counts its forward calls."""

    output_stride = 8

    def __init__(self, network: SegmentationNetwork) -> None:
        super().__init__()
        self.inner = network
        self.num_classes = network.num_classes
        self.feature_channels = network.feature_channels
        self.calls = 0

    def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        self.calls += 1
        return self.inner(x, **kwargs)

    def upsample_logits(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.inner.upsample_logits(logits, size)

    def classifier_parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.inner.classifier_parameters()


def test_entropy_analysis_reads_the_validation_logits(tmp_path: Path, tiny_network, toy_datamodule) -> None:
    """No pass of its own during training: the network runs once per validation batch, and the figures equal
    those of a pass of the callback's own over the same images at the same weights."""
    from uda_sam.tasks import SelfTraining

    network = _CountingNet(tiny_network())
    task = SelfTraining(network=network, use_target=False, lr=1e-3, num_val_images_logged=0)
    callback = EntropyAnalysisCallback(every_n_steps=2, output_csv=str(tmp_path / "entropy.csv"))
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[callback],
        max_steps=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    datamodule = toy_datamodule()
    trainer.fit(task, datamodule=datamodule)
    val_batches = len(datamodule.val_dataloader())
    assert network.calls == 4 + 2 * val_batches  # 4 training steps (source only) and two validation passes
    rows = list(csv.DictReader((tmp_path / "entropy.csv").open()))
    assert [int(row["step"]) for row in rows] == [2, 4]
    own = callback.analyse(trainer, task)
    assert own is not None
    expected = own.compute()
    assert int(rows[-1]["num_images"]) == expected["num_images"] == len(datamodule.val_dataset)
    assert float(rows[-1]["entropy_incorrect"]) == pytest.approx(expected["entropy_incorrect"], abs=1e-6)
    if not math.isnan(expected["entropy_correct"]):
        assert float(rows[-1]["entropy_correct"]) == pytest.approx(expected["entropy_correct"], abs=1e-6)
