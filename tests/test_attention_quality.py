"""Is the SAM any good? Attention quality against labels, measured at the end of SAM pretraining, kept in sam.pt,
and a warning when self-training starts from a SAM whose attention is close to uniform."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from uda_sam.evaluation.analysis import AttentionQuality
from uda_sam.nn import SelfAttentionLoss, SelfAttentionModule, attention_map
from uda_sam.nn.sam_io import read_attention_quality, save_sam
from uda_sam.tasks import SAMPretraining, SelfTraining


def brute_force(query: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    entropy = same = chance = uniform = 0.0
    rows = 0
    for q, y in zip(query, labels, strict=True):
        attention = attention_map(q.flatten(1).t()[None].double())[0]
        flat = y.flatten()
        num = flat.numel()
        for i in range(num):
            if flat[i] == 255:
                continue
            a = attention[i]
            entropy += float(-(a[a > 0] * a[a > 0].log()).sum())
            same += float(a[flat == flat[i]].sum())
            chance += float((flat == flat[i]).sum()) / num
            uniform += math.log(num)
            rows += 1
    return {
        "entropy": entropy / rows,
        "same_class_share": same / rows,
        "chance_share": chance / rows,
        "uniform_entropy": uniform / rows,
    }


def test_matches_a_pixel_by_pixel_reference() -> None:
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 5, 4, 6, generator=g)
    labels = torch.randint(0, 3, (2, 4, 6), generator=g)
    labels[0, 0, :3] = 255
    quality = AttentionQuality(block_size=7)  # blocks that do not divide N = 24
    quality.update(query, labels)
    figures = quality.compute()
    for key, value in brute_force(query, labels).items():
        assert figures[key] == pytest.approx(value, rel=1e-9), key
    assert figures["rows"] == 45 and figures["images"] == 2
    assert figures["lift"] == pytest.approx(figures["same_class_share"] / figures["chance_share"])


def test_label_attention_and_uniform_attention() -> None:
    labels = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 2]]])
    onehot = (
        F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    )  # Q = one-hot labels: rows uniform over the class
    perfect = AttentionQuality()
    perfect.update(onehot, labels)
    figures = perfect.compute()
    assert figures["same_class_share"] == pytest.approx(1.0)
    assert figures["entropy"] == pytest.approx((3 * math.log(3) + 2 * math.log(2) + 3 * math.log(3)) / 8)
    blind = AttentionQuality()
    blind.update(torch.ones(1, 3, 2, 4), labels)  # every row alike: uniform attention
    figures = blind.compute()
    assert figures["entropy"] == pytest.approx(math.log(8))
    assert figures["same_class_share"] == pytest.approx(figures["chance_share"])
    assert figures["lift"] == pytest.approx(1.0)


def test_labels_are_resized_to_the_logits() -> None:
    labels = torch.zeros(1, 32, 64, dtype=torch.long)
    labels[:, :, 32:] = 1
    quality = AttentionQuality()
    quality.update(torch.randn(1, 4, 4, 8), labels)
    assert quality.compute()["rows"] == 32


def test_sam_pretraining_measures_its_attention(tmp_path: Path, tiny_network, toy_datamodule) -> None:
    task = SAMPretraining(
        tiny_network(), lr=0.01, attention_images=10, sam_export_path=str(tmp_path / "sam.pt")
    )
    datamodule = toy_datamodule(source_holdout=1)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=CSVLogger(tmp_path, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(task, datamodule=datamodule)
    assert set(task.attention_quality) == {"source", "target"}
    assert task.attention_quality["source"]["images"] == 1  # the held-out source image
    assert task.attention_quality["target"]["images"] == 2  # the target val split
    # The same figures as measured by hand with the trained network and SAM.
    by_hand = AttentionQuality()
    with torch.no_grad():
        for sample in (datamodule.val_dataset[i] for i in range(2)):
            by_hand.update(
                task.sam.transform(task.network.eval()(sample["image"][None])), sample["mask"][None]
            )
    assert task.attention_quality["target"]["lift"] == pytest.approx(by_hand.compute()["lift"])
    assert read_attention_quality(tmp_path / "sam.pt") == task.attention_quality
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        logged = [row for row in csv.DictReader(handle) if row.get("sam/target/lift")]
    assert float(logged[-1]["sam/target/lift"]) == pytest.approx(task.attention_quality["target"]["lift"])


def test_near_uniform_sam_warns_at_the_start_of_self_training(tmp_path: Path, tiny_network) -> None:
    figures = {
        "entropy": 4.847,
        "uniform_entropy": 4.852,
        "same_class_share": 0.287,
        "chance_share": 0.268,
        "lift": 0.287 / 0.268,
        "images": 20.0,
        "rows": 2560.0,
    }
    path = save_sam(SelfAttentionModule(19), tmp_path / "flat.pt", attention_quality={"target": figures})
    with pytest.warns(
        UserWarning, match=r"flat\.pt: on the target images.*0\.287.*0\.268.*4\.847 against 4\.852"
    ):
        SelfTraining(tiny_network(), self_attention=SelfAttentionLoss(path))
    good = {**figures, "same_class_share": 0.6, "lift": 0.6 / 0.268}
    path = save_sam(SelfAttentionModule(19), tmp_path / "good.pt", attention_quality={"target": good})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SelfTraining(tiny_network(), self_attention=SelfAttentionLoss(path))
