"""Every shipped config's `data` section builds the datamodule it always built: same readers, roots, transforms, sets.

``tests/data/shipped_datamodules.json`` holds, for each shipped config, what its datamodule makes on small data laid
out at the config's own (relative) roots: every dataset's reader, root, split, label source, sample names and
transform, and the loaders' options. The test rebuilds each datamodule from the config and compares.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from torch.utils.data import Dataset, Subset

from uda_sam.cli.config_files import load_config

try:
    from tests.data import fake_datasets as fake
except ImportError:  # tests/ itself is on sys.path (no tests/__init__.py)
    from data import fake_datasets as fake  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "data" / "shipped_datamodules.json"
CONFIGS = sorted(
    p
    for p in [*(REPO / "configs").rglob("*.yaml"), *(REPO / "examples").rglob("*.yaml")]
    if "data" in load_config(p) and p.parent.name not in ("init", "_base_")
)
#: Stage configs composed with the fragments that change their data (as `uda-sam fit --config A --config B`).
COMPOSED = [
    ("configs/gta5/ours_8_10.yaml", "configs/init/deeplab_caffe.yaml"),
    ("configs/fcn8s/synthia/ours_8_10.yaml", "configs/init/fcn8s_caffe.yaml"),
]
CASES = [(p.relative_to(REPO).as_posix(),) for p in CONFIGS] + COMPOSED


def case_id(case: tuple[str, ...]) -> str:
    return "+".join(case)


def write_data(root: Path) -> None:
    """Small data at the shipped configs' roots, below ``root`` (their working folder)."""
    from uda_sam.data.toy import make_toy_data

    fake.write_fake_gta5(root / "data" / "gta5", num_images=4, mismatched=None)
    fake.write_fake_synthia(root / "data" / "synthia", num_images=3)
    fake.write_fake_cityscapes(root / "data" / "cityscapes", {"train": 3, "val": 2, "test": 1})
    # The toy configs keep 20 source images out of training and draw batches of 8.
    make_toy_data(
        root / "data" / "toy",
        num_source=30,
        num_target_train=9,
        num_val=3,
        num_test=2,
        size=(64, 32),
        source_size=(72, 40),
    )


@contextmanager
def working_dir(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def build_datamodule(files: tuple[str, ...]) -> Any:
    """The datamodule of the configs' merged `data` sections, parsed and instantiated as the CLI does."""
    from jsonargparse import ArgumentParser

    from uda_sam.cli import lightning  # the datamodule class `uda-sam` parses `data` into

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(lightning.UDADataModule, "data")
    merged: dict[str, Any] = {}
    for file in files:
        merged.update(load_config(REPO / file)["data"])
    config = parser.parse_object({"data": merged})
    return parser.instantiate_classes(config).data


def describe_dataset(dataset: Dataset | None) -> Any:
    """What a dataset reads and how: reader, root, split, labels, names, transform."""
    if dataset is None:
        return None
    if isinstance(dataset, Subset):
        return {"subset": list(dataset.indices), "of": describe_dataset(dataset.dataset)}
    dataset = getattr(dataset, "dataset", dataset)  # the target training set's current reader
    described = {
        "reader": type(dataset).__name__,
        "root": str(dataset.root),
        "names": list(dataset.names),
        "labelled": sum(s.label is not None for s in dataset.samples),
        "first_label": str(dataset.samples[0].label),
        "transform": repr(dataset.transform),
    }
    for key in ("split", "pseudo_label_root", "image_dir"):
        if hasattr(dataset, key):
            value = getattr(dataset, key)
            described[key] = None if value is None else str(value)
    return described


def describe_loader(loader: Any) -> dict[str, Any]:
    return {
        "batch_size": loader.batch_size,
        "num_workers": loader.num_workers,
        "persistent_workers": loader.persistent_workers,
        "drop_last": loader.drop_last,
        "length": len(loader),
    }


def describe(datamodule: Any) -> dict[str, Any]:
    """Every dataset and loader the datamodule makes for fit, validate, test and predict."""
    for stage in ("fit", "validate", "test", "predict"):
        datamodule.setup(stage)
    train = datamodule.train_dataloader()
    return {
        "datamodule": type(datamodule).__name__,
        "source_train": describe_dataset(datamodule.source_train),
        "source_holdout": describe_dataset(datamodule.source_holdout_dataset()),
        "target_train": describe_dataset(datamodule.target_train),
        "target_inference": describe_dataset(datamodule.target_inference_dataset()),
        "val": describe_dataset(datamodule.val_dataset),
        "test": describe_dataset(datamodule.test_dataset),
        "predict": describe_dataset(datamodule.predict_dataset),
        "train_loaders": {key: describe_loader(loader) for key, loader in train.iterables.items()},
        "val_loader": describe_loader(datamodule.val_dataloader()),
        "test_loader": describe_loader(datamodule.test_dataloader()),
        "predict_loader": describe_loader(datamodule.predict_dataloader()),
        "epoch_length": datamodule.train_epoch_length(),
        "test_split": datamodule.test_split,
        "pseudo_label_root": datamodule.pseudo_label_root,
        "predict_root": datamodule.predict_root,
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shipped")
    write_data(root)
    return root


def test_every_shipped_data_config_is_recorded() -> None:
    assert sorted(json.loads(FIXTURE.read_text())) == sorted(case_id(c) for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_shipped_config_builds_the_recorded_datamodule(case: tuple[str, ...], data_dir: Path) -> None:
    expected = json.loads(FIXTURE.read_text())[case_id(case)]
    with working_dir(data_dir):
        assert describe(build_datamodule(case)) == expected


def record() -> None:
    """Write the fixture from the current code (run once: ``python tests/test_data_shipped_configs.py``)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_data(Path(tmp))
        with working_dir(Path(tmp)):
            out = {case_id(c): describe(build_datamodule(c)) for c in CASES}
    lines = [f"{json.dumps(key)}: {json.dumps(out[key], sort_keys=True)}" for key in sorted(out)]
    FIXTURE.write_text("{\n" + ",\n".join(lines) + "\n}\n")


if __name__ == "__main__":
    record()
