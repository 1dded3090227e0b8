"""UDADataModule on fake GTA5/SYNTHIA/Cityscapes trees: batches, pseudo-label switching, errors, YAML, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader

from uda_sam.data import GTA5, Cityscapes, SegmentationTransform, Synthia
from uda_sam.datamodules import UDADataModule

try:
    from tests.data import fake_datasets as fake
except ImportError:  # tests/ itself is on sys.path (no tests/__init__.py)
    from data import fake_datasets as fake  # type: ignore[no-redef]


@pytest.fixture
def roots(tmp_path: Path) -> dict:
    gta5 = fake.write_fake_gta5(tmp_path / "gta5", num_images=4, mismatched=None)
    synthia = fake.write_fake_synthia(tmp_path / "synthia", num_images=2)
    cityscapes = fake.write_fake_cityscapes(tmp_path / "cs", {"train": 3, "val": 2})
    return {"tmp": tmp_path, "gta5": gta5, "synthia": synthia, "cs": cityscapes}


def make_dm(tmp: Path, **kwargs) -> UDADataModule:
    args = dict(
        source=GTA5(tmp / "gta5"),
        target=Cityscapes(tmp / "cs"),
        source_size=(32, 16),
        target_size=(32, 16),
        batch_size=2,
        num_workers=0,
    )
    args.update(kwargs)
    return UDADataModule(**args)


def test_train_batches(roots: dict) -> None:
    dm = make_dm(roots["tmp"])
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    batch, _, _ = next(iter(loader))
    source, target = batch["source"], batch["target"]
    assert source["image"].shape == (2, 3, 16, 32) and source["mask"].shape == (2, 16, 32)
    assert source["mask"].dtype == torch.int64 and len(source["name"]) == 2
    assert target["image"].shape == (2, 3, 16, 32) and (target["mask"] == 255).all()
    for i, name in enumerate(source["name"]):
        expected = fake.to_train(
            fake.id_blocks(64, 32, fake.LABEL_IDS, int(name) - 1).astype(np.uint8), fake.LABEL_TO_TRAIN
        )
        assert np.array_equal(source["mask"][i].numpy(), expected[::2, ::2])
    # max_size_cycle: as many steps as the longer domain allows (4 source images / 2 = 2 batches)
    assert len(list(iter(dm.train_dataloader()))) == 2
    assert dm.hparams["source"] == {
        "class_path": "uda_sam.data.gta5.GTA5",
        "init_args": {
            "root": str(roots["tmp"] / "gta5"),
            "image_root": None,
            "list_file": None,
            "limit": None,
        },
    }
    assert dm.hparams["batch_size"] == 2


def test_val_test_predict_and_inference_sets(roots: dict) -> None:
    dm = make_dm(roots["tmp"], val_batch_size=2)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 32) and batch["mask"].shape == (2, 32, 64)  # full label size
    for i, name in enumerate(batch["name"]):
        assert np.array_equal(batch["mask"][i].numpy(), roots["cs"]["val"][name])
    dm.setup("test")
    assert next(iter(dm.test_dataloader()))["mask"].shape == (2, 32, 64)
    dm.setup("predict")
    assert next(iter(dm.predict_dataloader()))["image"].shape == (2, 3, 16, 32)
    resized = make_dm(roots["tmp"], val_label_size="resized", val_limit=1)
    resized.setup("validate")
    assert len(resized.val_dataset) == 1 and resized.val_dataset[0]["mask"].shape == (16, 32)

    inference = dm.target_inference_dataset()
    assert isinstance(inference, Cityscapes) and inference.names[0] == "aachen/aachen_000000_000019"
    sample = inference[0]
    assert sample["image"].shape == (3, 16, 32)
    assert np.array_equal(sample["mask"].numpy(), roots["cs"]["train"][inference.names[0]][::2, ::2])
    (
        roots["tmp"] / "cs" / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
    ).unlink()
    assert (dm.target_inference_dataset()[0]["mask"] == 255).all()  # GT where present, else 255


def test_pseudo_label_switching(roots: dict) -> None:
    tmp = roots["tmp"]
    names = sorted(roots["cs"]["train"])
    gen1 = fake.write_pseudo_labels(tmp / "gen1", names, size=(32, 16), seed=1)
    gen2 = fake.write_pseudo_labels(tmp / "gen2", names, size=(32, 16), seed=2)
    dm = make_dm(tmp, pseudo_label_root=str(tmp / "gen1"))
    dm.setup("fit")

    def target_masks() -> dict[str, np.ndarray]:
        out = {}
        for batch, _, _ in dm.train_dataloader():
            for name, mask in zip(batch["target"]["name"], batch["target"]["mask"], strict=True):
                out[name] = mask.numpy()
        return out

    for name, mask in target_masks().items():
        assert np.array_equal(mask, gen1[name])
    dm.set_pseudo_label_root(tmp / "gen2")
    for name, mask in target_masks().items():
        assert np.array_equal(mask, gen2[name])
    assert dm.state_dict()["pseudo_label_root"] == str(tmp / "gen2")
    assert dm.hparams["pseudo_label_root"] == str(tmp / "gen2")

    (tmp / "gen3").mkdir()
    with pytest.raises(FileNotFoundError, match=r"3 of 3 .*no pseudo-label file"):
        dm.set_pseudo_label_root(tmp / "gen3")
    assert dm.pseudo_label_root == str(tmp / "gen2")  # unchanged after a failed switch
    dm.set_pseudo_label_root(None)
    assert all((m == 255).all() for m in target_masks().values())

    fresh = make_dm(tmp)
    fresh.load_state_dict({"pseudo_label_root": str(tmp / "gen1")})
    fresh.setup("fit")
    assert fresh.target_train.pseudo_label_root == tmp / "gen1"


@pytest.mark.parametrize("persistent", [True, False])
def test_one_train_loader_reads_each_switched_folder_in_its_workers(roots: dict, persistent: bool) -> None:
    """The loader made once keeps its 2 workers (persistent or not); after a switch they read the new labels."""
    tmp = roots["tmp"]
    names = sorted(roots["cs"]["train"])
    gen1 = fake.write_pseudo_labels(tmp / "gen1", names, size=(32, 16), seed=1)
    gen2 = fake.write_pseudo_labels(tmp / "gen2", names, size=(32, 16), seed=2)
    assert any(not np.array_equal(gen1[n], gen2[n]) for n in names)
    dm = make_dm(
        tmp,
        pseudo_label_root=str(tmp / "gen1"),
        num_workers=2,
        persistent_workers=persistent,
        batch_size=1,
        steps_per_epoch=3,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    target = loader.iterables["target"]
    assert target.num_workers == 2 and target.persistent_workers is persistent

    def epoch_masks(epoch: int) -> dict[str, np.ndarray]:
        target.sampler.set_epoch(epoch)  # as Lightning does at every epoch start
        out = {}
        for batch, _, _ in loader:
            for name, mask in zip(batch["target"]["name"], batch["target"]["mask"], strict=True):
                out[name] = mask.numpy()
        return out

    seen = epoch_masks(0)
    assert seen.keys() == set(names) and all(np.array_equal(m, gen1[n]) for n, m in seen.items())
    workers = target._iterator._workers if persistent else None  # the workers that read generation 1
    dm.set_pseudo_label_root(tmp / "gen2")
    seen = epoch_masks(1)
    assert seen.keys() == set(names) and all(np.array_equal(m, gen2[n]) for n, m in seen.items())
    if persistent:
        assert target._iterator._workers == workers  # the same processes, not new ones
    dm.set_pseudo_label_root(None)
    assert all((m == 255).all() for m in epoch_masks(2).values())


def test_missing_pseudo_labels_fail_in_setup(roots: dict) -> None:
    tmp = roots["tmp"]
    fake.write_pseudo_labels(tmp / "partial", sorted(roots["cs"]["train"])[:2], size=(32, 16))
    dm = make_dm(tmp, pseudo_label_root=str(tmp / "partial"))
    with pytest.raises(FileNotFoundError, match=r"1 of 3 .*bochum_000001_000019"):
        dm.setup("fit")


def test_synthia_source(roots: dict) -> None:
    dm = make_dm(roots["tmp"], source=Synthia(roots["tmp"] / "synthia"), source_size=None)
    dm.setup("fit")
    batch, _, _ = next(iter(dm.train_dataloader()))
    for name, mask in zip(batch["source"]["name"], batch["source"]["mask"], strict=True):
        assert np.array_equal(mask.numpy(), roots["synthia"][name])


def test_setup_errors(roots: dict) -> None:
    tmp = roots["tmp"]
    with pytest.raises(FileNotFoundError, match=r"^data.source: GTA5 root .*nowhere"):
        make_dm(tmp, source=GTA5(tmp / "nowhere")).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"^data.target: Cityscapes root .*nowhere"):
        make_dm(tmp, target=Cityscapes(tmp / "nowhere")).setup("validate")
    make_dm(tmp, source=GTA5(tmp / "nowhere")).setup("validate")  # a source that validation never reads
    with pytest.raises(ValueError, match=r"source \(Synthia\) training set has 2 images, fewer than .* 4"):
        make_dm(tmp, source=Synthia(tmp / "synthia"), batch_size=4).setup("fit")
    with pytest.raises(
        ValueError, match=r"data.source must be a dataset reader, in YAML \{class_path: uda_sam.data.GTA5"
    ):
        make_dm(tmp, source="gta5")
    with pytest.raises(
        ValueError,
        match=r"data.target must be .*GTA5 lacks the argument\(s\) split, labels, pseudo_label_root",
    ):
        make_dm(tmp, target=GTA5(tmp / "gta5"))
    with pytest.raises(ValueError, match="set data.pseudo_label_root instead"):
        make_dm(tmp, target=Cityscapes(tmp / "cs", pseudo_label_root=tmp))
    with pytest.raises(ValueError, match="batch_size"):
        make_dm(tmp, batch_size=0)
    with pytest.raises(ValueError, match="target_size"):
        make_dm(tmp, target_size=(32,))
    with pytest.raises(RuntimeError, match="setup"):
        make_dm(tmp).train_dataloader()


def test_loader_options(roots: dict) -> None:
    dm = make_dm(
        roots["tmp"],
        num_workers=0,
        persistent_workers=True,
        hflip=True,
        crop_size=(16, 16),
        random_scale=(0.75, 1.5),
    )
    dm.setup("fit")
    source = dm.train_dataloader().iterables["source"]
    assert source.persistent_workers is False and source.drop_last
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert batch["source"]["image"].shape == (2, 3, 16, 16) and batch["target"]["mask"].shape == (2, 16, 16)


def test_workers_draw_different_augmentations(roots: dict) -> None:
    from torch.utils.data import DataLoader, Subset

    ds = GTA5(
        roots["tmp"] / "gta5", transform=SegmentationTransform(size=(32, 16), crop_size=(8, 8), hflip=True)
    )
    same_image = Subset(ds, [0] * 8)  # batches alternate between the two workers
    torch.manual_seed(0)
    crops = [b["image"] for b in DataLoader(same_image, batch_size=1, num_workers=2)]
    # Copies of one generator state would give worker 0's k-th crop == worker 1's k-th crop.
    assert not all(torch.equal(crops[i], crops[i + 1]) for i in range(0, 8, 2))
    torch.manual_seed(0)
    again = [b["image"] for b in DataLoader(same_image, batch_size=1, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(crops, again, strict=True))  # reproducible under a seed


def test_configurable_from_yaml(roots: dict) -> None:
    from jsonargparse import ArgumentParser

    tmp = roots["tmp"]
    parser = ArgumentParser()
    parser.add_class_arguments(UDADataModule, "data")
    config = {
        "data": {
            "source": {"class_path": "uda_sam.data.GTA5", "init_args": {"root": str(tmp / "gta5")}},
            "target": {"class_path": "uda_sam.data.Cityscapes", "init_args": {"root": str(tmp / "cs")}},
            "source_size": [32, 16],
            "target_size": [32, 16],
            "random_scale": [0.5, 1.5],
            "num_workers": 0,
        }
    }
    cfg = parser.parse_string(json.dumps(config))
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, UDADataModule)
    assert dm.source_size == (32, 16) and dm.random_scale == (0.5, 1.5) and dm.val_label_size == "full"
    assert (
        isinstance(dm.source, GTA5) and dm.source.root == tmp / "gta5" and isinstance(dm.target, Cityscapes)
    )
    not_a_reader = {"class_path": "uda_sam.data.SegmentationTransform", "init_args": {}}
    with pytest.raises(SystemExit):
        parser.parse_string(json.dumps({"data": {**config["data"], "source": not_a_reader}}))


class Recorder(pl.LightningModule):
    """Writes the sample names each rank saw (``ddp_spawn`` returns only weights to the parent)."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[str, list[str]] = {"source": [], "target": [], "val": []}

    def training_step(self, batch, batch_idx):
        self.seen["source"] += batch["source"]["name"]
        self.seen["target"] += batch["target"]["name"]
        return (self.weight * batch["source"]["image"].mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.seen["val"] += batch["name"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def on_fit_end(self) -> None:
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))


@pytest.mark.slow
def test_ddp_shards_both_domains(roots: dict) -> None:
    tmp = roots["tmp"]
    dm = make_dm(tmp, batch_size=1, val_batch_size=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0,
        val_check_interval=2,
    )
    trainer.fit(Recorder(str(tmp)), datamodule=dm)
    seen = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    # 4 source images over 2 ranks, 2 steps each: disjoint shards covering the set
    assert set(seen[0]["source"]).isdisjoint(seen[1]["source"])
    assert set(seen[0]["source"]) | set(seen[1]["source"]) == {"00001", "00002", "00003", "00004"}
    # 3 target images: a DistributedSampler pads to 2 per rank; the shards still differ
    assert len(seen[0]["target"]) == len(seen[1]["target"]) == 2
    assert set(seen[0]["target"]) | set(seen[1]["target"]) == set(roots["cs"]["train"])
    assert set(seen[0]["val"]).isdisjoint(seen[1]["val"]) and len(seen[0]["val"]) == 1


def test_source_holdout_keeps_the_last_images_out_of_training(roots: dict) -> None:
    dm = make_dm(roots["tmp"], source_holdout=1, hflip=True)
    dm.setup("fit")
    trained = {dm.source_train[i]["name"] for i in range(len(dm.source_train))}
    assert trained == {"00001", "00002", "00003"}
    held_out = dm.source_holdout_dataset()
    assert [held_out[i]["name"] for i in range(len(held_out))] == ["00004"]
    sample = held_out[0]
    again = held_out[0]
    assert torch.equal(sample["image"], again["image"])  # no augmentation (hflip is for training only)
    assert make_dm(roots["tmp"]).source_holdout_dataset() is None
    with pytest.raises(ValueError, match="source_holdout=4 keeps no training image"):
        make_dm(roots["tmp"], source_holdout=4).setup("fit")
    with pytest.raises(ValueError, match="source_holdout must be a non-negative integer"):
        make_dm(roots["tmp"], source_holdout=-1)


def test_test_split_is_scored_when_asked(roots: dict) -> None:
    cs = fake.write_fake_cityscapes(roots["tmp"] / "cs_test", {"train": 2, "val": 1, "test": 2})
    # The fake test labels are Cityscapes-style placeholders; they stand for a labelled test split here.
    dm = make_dm(
        roots["tmp"], target=Cityscapes(roots["tmp"] / "cs_test"), test_split="test", val_batch_size=2
    )
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert sorted(batch["name"]) == sorted(cs["test"])
    default = make_dm(roots["tmp"], target=Cityscapes(roots["tmp"] / "cs_test"))
    default.setup("test")
    assert [s for s in default.test_dataset.names] == list(cs["val"])
    with pytest.raises(ValueError, match="test_split must be 'val' or 'test'"):
        make_dm(roots["tmp"], test_split="train")
