"""One generation of pseudo labels and the regeneration callback: exact labels, atomic folders, DDP, resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

import uda_sam.callbacks.pseudo_labels as callback_module
import uda_sam.pseudo_labels.generation as generation_module
from uda_sam.callbacks import LastStepCheckpoint, PseudoLabelRegeneration
from uda_sam.nn.sam_io import load_network_weights
from uda_sam.pseudo_labels.generation import generate_pseudo_labels
from uda_sam.pseudo_labels.thresholds import ClasswiseThresholdEstimator, make_pseudo_labels
from uda_sam.tasks import SelfTraining

try:
    from tests.conftest import TinySegNet
except ImportError:  # tests/ itself is on sys.path (no tests/__init__.py)
    from conftest import TinySegNet  # type: ignore[no-redef]


def read_labels(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.array(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def teacher_checkpoint(path: Path, network: torch.nn.Module) -> Path:
    torch.save({"state_dict": {f"network.{k}": v for k, v in network.state_dict().items()}}, path)
    return path


def test_labels_equal_direct_thresholding(
    tmp_path: Path, tiny_network: Callable, toy_datamodule: Callable
) -> None:
    network = tiny_network(seed=3)
    dataset = toy_datamodule().target_inference_dataset()
    result = generate_pseudo_labels(network, dataset, tmp_path / "gen1", num_workers=0, progress=False)

    # Reference: all probabilities in memory, thresholds from the estimator, labels from make_pseudo_labels.
    estimator = ClasswiseThresholdEstimator()
    probs = []
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            logits = network.upsample_logits(network(sample["image"][None]), tuple(sample["mask"].shape))
            probs.append(torch.softmax(logits, dim=1))
    for p in probs:
        estimator.update(p)
    thresholds = estimator.compute()
    assert result.thresholds == pytest.approx(thresholds.tolist())
    written = read_labels(result.label_dir)
    assert len(written) == len(dataset)
    for i, p in enumerate(probs):
        expected = make_pseudo_labels(p, thresholds)[0].numpy()
        np.testing.assert_array_equal(written[f"{dataset[i]['name']}.png"], expected)

    record = json.loads((result.label_dir / "thresholds.json").read_text())
    assert list(record["thresholds"].values()) == pytest.approx(thresholds.tolist())
    stats = json.loads((result.label_dir / "statistics.json").read_text())
    assert len(stats["classes"]) == 19 and 0.0 <= stats["labelled_share"] <= 1.0
    assert stats["precision"] is not None  # the toy target has ground truth: agreement is reported
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


def test_interrupted_generation_leaves_no_folder(
    tmp_path: Path, tiny_network: Callable, toy_datamodule: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = toy_datamodule().target_inference_dataset()
    calls = {"n": 0}
    real_save = generation_module.save_label_png

    def failing_save(label: Any, path: Any) -> Path:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_save(label, path)

    monkeypatch.setattr(generation_module, "save_label_png", failing_save)
    with pytest.raises(OSError, match="disk full"):
        generate_pseudo_labels(tiny_network(), dataset, tmp_path / "gen1", num_workers=0, progress=False)
    assert not (tmp_path / "gen1").exists()

    monkeypatch.setattr(generation_module, "save_label_png", real_save)
    result = generate_pseudo_labels(tiny_network(), dataset, tmp_path / "gen1", num_workers=0, progress=False)
    assert len(read_labels(result.label_dir)) == len(dataset)
    assert [p.name for p in tmp_path.iterdir()] == ["gen1"]  # the stale temporary folder was cleaned up


def test_finished_folder_is_reused_only_when_made_the_same_way(
    tmp_path: Path, tiny_network: Callable, toy_datamodule: Callable
) -> None:
    dataset = toy_datamodule().target_inference_dataset()
    out = tmp_path / "gen1"

    def generate(network: torch.nn.Module, data: Any = dataset, **kwargs: Any) -> Any:
        return generate_pseudo_labels(network, data, out, num_workers=0, progress=False, **kwargs)

    first = generate(tiny_network(seed=0), description={"teacher": "a"})
    key = json.loads((out / "thresholds.json").read_text())["key"]
    assert key["num_images"] == 4 and key["size"] == [64, 32] and key["normalization"] == "imagenet"
    # The same weights (another description, another object): reused.
    again = generate(tiny_network(seed=0), description={"teacher": "b"})
    assert again.reused and not again.replaced

    # Other weights: made again and replaced, saying why.
    other = generate(tiny_network(seed=1))
    assert not other.reused and other.replaced[0].startswith("teacher_sha256:")
    assert json.loads((out / "thresholds.json").read_text())["key"]["teacher_sha256"] != key["teacher_sha256"]
    assert other.thresholds != first.thresholds
    # Another inference size: labels at the new size.
    smaller = generate(tiny_network(seed=1), toy_datamodule(target_size=(32, 16)).target_inference_dataset())
    assert [r.split(":")[0] for r in smaller.replaced] == ["size"]
    assert {Image.open(p).size for p in out.rglob("*.png")} == {(32, 16)}
    assert not [
        p.name for p in tmp_path.iterdir() if p.name != "gen1"
    ]  # no temporary or outdated folder left

    # Asked to reuse: refused when made otherwise, naming what differs; or when there is nothing to reuse.
    with pytest.raises(FileExistsError, match=r"differs in cap: 0\.9 there, 0\.8 now"):
        generate(
            tiny_network(seed=1),
            toy_datamodule(target_size=(32, 16)).target_inference_dataset(),
            cap=0.8,
            reuse="require",
        )
    with pytest.raises(FileNotFoundError, match="no finished pseudo-label generation"):
        generate_pseudo_labels(tiny_network(), dataset, tmp_path / "none", progress=False, reuse="require")
    assert generate(
        tiny_network(seed=1), reuse="never"
    ).replaced  # made again although the size is all that differed
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "x.png").write_bytes(b"")
    with pytest.raises(FileExistsError, match="not a finished"):
        generate_pseudo_labels(tiny_network(), dataset, stray, num_workers=0, progress=False)


def test_callback_regenerates_for_a_retrained_teacher_or_another_size(
    tmp_path: Path, tiny_network: Callable, toy_datamodule: Callable
) -> None:
    """A teacher retrained at the same path, or another target_size, gives new labels, not the old ones."""
    teacher = tmp_path / "teacher.ckpt"
    labels = tmp_path / "labels" / "generation_1"

    def fit(teacher_seed: int, **data: Any) -> dict[str, np.ndarray]:
        teacher_checkpoint(teacher, tiny_network(seed=teacher_seed))
        callback = PseudoLabelRegeneration(
            teacher_checkpoint=str(teacher), output_dir=str(labels.parent), num_workers=0
        )
        fit_with_regeneration(tmp_path, tiny_network(), toy_datamodule(**data), callback, max_steps=1)
        return read_labels(labels)

    first = fit(teacher_seed=5)
    retrained = fit(teacher_seed=6)
    expected = generate_pseudo_labels(
        tiny_network(seed=6),
        toy_datamodule().target_inference_dataset(),
        tmp_path / "reference",
        num_workers=0,
        progress=False,
    )
    assert retrained.keys() == first.keys()
    assert any(not np.array_equal(first[n], retrained[n]) for n in first)
    for name, label in read_labels(expected.label_dir).items():
        np.testing.assert_array_equal(retrained[name], label)
    resized = fit(teacher_seed=6, target_size=(32, 16))
    assert {label.shape for label in resized.values()} == {(16, 32)}


def test_bad_input(tmp_path: Path, tiny_network: Callable, toy_datamodule: Callable) -> None:
    dataset = toy_datamodule().target_inference_dataset()
    with pytest.raises(ValueError, match="predicts 7 classes"):
        generate_pseudo_labels(
            tiny_network(num_classes=7), dataset, tmp_path / "g", num_workers=0, progress=False
        )
    with pytest.raises(ValueError, match="no images"):
        generate_pseudo_labels(
            tiny_network(), torch.utils.data.Subset(dataset, []), tmp_path / "h", progress=False
        )
    with pytest.raises(ValueError, match=r"num_bins must lie in 1\.\.32768"):
        generate_pseudo_labels(tiny_network(), dataset, tmp_path / "i", num_bins=40_000, progress=False)
    with pytest.raises(FileNotFoundError, match="teacher_checkpoint"):
        load_network_weights(tiny_network(), tmp_path / "missing.ckpt", "teacher_checkpoint")
    torch.save({"state_dict": {"sam.transform.weight": torch.zeros(1)}}, tmp_path / "sam.ckpt")
    with pytest.raises(ValueError, match="no network weights"):
        load_network_weights(tiny_network(), tmp_path / "sam.ckpt", "teacher_checkpoint")
    teacher_checkpoint(tmp_path / "seven.ckpt", tiny_network(num_classes=7))
    with pytest.raises(ValueError, match="number of classes"):
        load_network_weights(tiny_network(), tmp_path / "seven.ckpt", "teacher_checkpoint")


# ------------------------------------------------------------------------------------------------ the callback
def fit_with_regeneration(
    root: Path,
    network: torch.nn.Module,
    datamodule: Any,
    callback: PseudoLabelRegeneration,
    max_steps: int,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> tuple[Trainer, SelfTraining]:
    task = SelfTraining(network=network, lr=1e-3)
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(root),
        "callbacks": [callback],
        "enable_checkpointing": False,
    }
    options.update(trainer_kwargs)
    trainer = Trainer(**options)
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, task


def test_callback_generations_and_resume(
    tmp_path: Path, tiny_network: Callable, toy_datamodule: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher = teacher_checkpoint(tmp_path / "teacher.ckpt", tiny_network(seed=5))
    calls: list[int] = []
    real_generate = callback_module.generate_pseudo_labels

    def counting_generate(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["description"]["generation"])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(callback_module, "generate_pseudo_labels", counting_generate)
    # 4 target images, batch 1 -> 4 steps an epoch; generations of 4 steps; a checkpoint at step 6 (generation 2).
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)

    def regeneration() -> PseudoLabelRegeneration:
        return PseudoLabelRegeneration(
            teacher_checkpoint=str(teacher),
            output_dir=str(tmp_path / "labels"),
            num_generations=2,
            steps_per_generation=4,
            num_workers=0,
        )

    callback = regeneration()
    datamodule = toy_datamodule()
    trainer, task = fit_with_regeneration(
        tmp_path,
        tiny_network(),
        datamodule,
        callback,
        max_steps=8,
        callbacks=[callback, checkpoint],
        enable_checkpointing=True,
    )
    assert calls == [1, 2]
    assert trainer.global_step == 8
    assert callback.generation == 2 and datamodule.pseudo_label_root == str(
        tmp_path / "labels" / "generation_2"
    )
    assert task.schedule_origin == 4 and task.schedule_steps == 4  # the schedule restarted with generation 2
    gen1 = read_labels(tmp_path / "labels" / "generation_1")
    assert len(gen1) == 4 and len(read_labels(tmp_path / "labels" / "generation_2")) == 4

    # Resume from the mid-generation-2 checkpoint: generation 2 labels are reused, nothing is regenerated.
    calls.clear()
    resumed_callback = regeneration()
    resumed_dm = toy_datamodule()
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert saved, "no mid-run checkpoint"
    trainer, _ = fit_with_regeneration(
        tmp_path, tiny_network(), resumed_dm, resumed_callback, max_steps=8, ckpt_path=str(saved[0])
    )
    assert calls == []
    assert resumed_callback.generation == 2
    assert resumed_dm.pseudo_label_root == str(tmp_path / "labels" / "generation_2")
    assert trainer.global_step == 8


class RecordTargets(Callback):
    """Records, per training step, the train loader and the target names and masks of the batch."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, Any, list[str], torch.Tensor]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        target = batch["target"]
        self.steps.append(
            (trainer.global_step, trainer.train_dataloader, list(target["name"]), target["mask"])
        )


@pytest.mark.parametrize("persistent", [True, False])
def test_next_generation_batches_carry_its_labels_with_two_workers(
    tmp_path: Path, tiny_network: Callable, toy_datamodule: Callable, persistent: bool
) -> None:
    """With 2 loader workers (persistent or not), generation 2's steps train on generation 2's labels, from the
    same train loader (no private Lightning state reset)."""
    teacher = teacher_checkpoint(tmp_path / "teacher.ckpt", tiny_network(seed=5))
    callback = PseudoLabelRegeneration(
        teacher_checkpoint=str(teacher),
        output_dir=str(tmp_path / "labels"),
        num_generations=2,
        steps_per_generation=4,
        num_workers=0,
    )
    record = RecordTargets()
    datamodule = toy_datamodule(num_workers=2, persistent_workers=persistent)
    fit_with_regeneration(
        tmp_path, tiny_network(), datamodule, callback, max_steps=8, callbacks=[callback, record]
    )
    labels = {g: read_labels(tmp_path / "labels" / f"generation_{g}") for g in (1, 2)}
    assert any(not np.array_equal(labels[1][n], labels[2][n]) for n in labels[1])  # the generations differ
    assert [step for step, *_ in record.steps] == list(range(8))
    assert len({id(loader) for _, loader, _, _ in record.steps}) == 1
    for step, _, names, masks in record.steps:
        generation = 1 if step < 4 else 2
        for name, mask in zip(names, masks, strict=True):
            assert np.array_equal(mask.numpy(), labels[generation][f"{name}.png"]), (step, name)


class Killed(Exception):
    """Stands for the run being killed."""


class KillAt(Callback):
    """Raises before the step after ``step``, whose checkpoint was written."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed after step {self.step}")


class DropoutNet(TinySegNet):
    """A tiny network that draws from the global random generator at every training step."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> Any:
        features = F.dropout2d(self.backbone(x), 0.2, self.training)
        logits = self.classifier(features)
        return (logits, features) if return_features else logits


def test_resume_from_last_checkpoint_is_exact(tmp_path: Path, toy_datamodule: Callable) -> None:
    """Two generations in one fit, killed in generation 1 (mid-epoch), at its last step and in generation 2, each
    time resumed from last.ckpt: the weights equal those of an uninterrupted run."""
    teacher = teacher_checkpoint(tmp_path / "teacher.ckpt", TinySegNet())

    def fit(run: Path, kill_at: int | None = None) -> SelfTraining:
        last = run / "checkpoints" / "last.ckpt"
        callbacks = [
            PseudoLabelRegeneration(
                teacher_checkpoint=str(teacher),
                output_dir=str(run / "labels"),
                num_generations=2,
                steps_per_generation=4,
                num_workers=0,
            ),
            LastStepCheckpoint(dirpath=str(run / "checkpoints"), every_n_train_steps=1),
            KillAt(kill_at),
        ]
        torch.manual_seed(0)
        task = SelfTraining(network=DropoutNet(), lr=1e-2)
        trainer = Trainer(
            accelerator="cpu",
            max_steps=8,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            val_check_interval=3,
            check_val_every_n_epoch=None,
            limit_val_batches=1,
            default_root_dir=str(run),
            callbacks=callbacks,
        )
        # 4 images, batch 1, 2 steps an epoch: generation 1 is steps 1-4, generation 2 steps 5-8.
        datamodule = toy_datamodule(steps_per_epoch=2)
        trainer.fit(task, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
        return task

    uninterrupted = {k: v.clone() for k, v in fit(tmp_path / "a").network.state_dict().items()}
    run = tmp_path / "b"
    for step in (
        3,
        4,
        7,
    ):  # generation 1 mid-epoch; generation 1's last step (before generation 2); generation 2
        with pytest.raises(Killed):
            fit(run, kill_at=step)
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step
    resumed = fit(run)
    assert resumed.trainer.global_step == 8 and resumed.schedule_origin == 4
    weights = resumed.network.state_dict()
    assert weights.keys() == uninterrupted.keys() and all(
        torch.equal(weights[k], uninterrupted[k]) for k in weights
    )
    for generation in ("generation_1", "generation_2"):
        a, b = read_labels(tmp_path / "a" / "labels" / generation), read_labels(run / "labels" / generation)
        assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


def test_callback_rejects_misaligned_generations(
    tmp_path: Path, tiny_network: Callable, toy_datamodule: Callable
) -> None:
    teacher = teacher_checkpoint(tmp_path / "teacher.ckpt", tiny_network(seed=5))
    callback = PseudoLabelRegeneration(
        teacher_checkpoint=str(teacher),
        output_dir=str(tmp_path / "labels"),
        num_generations=2,
        steps_per_generation=3,
        num_workers=0,
    )
    # 4 images, batch 1: epochs of 4 steps, which 3 is not a multiple of. Refused before any label is made.
    with pytest.raises(
        ValueError, match=r"steps_per_generation=3 is not a multiple of the training epoch \(4 steps\)"
    ):
        fit_with_regeneration(tmp_path, tiny_network(), toy_datamodule(), callback, max_steps=6)
    assert not (tmp_path / "labels").exists()


def test_callback_missing_teacher(tmp_path: Path, tiny_network: Callable, toy_datamodule: Callable) -> None:
    callback = PseudoLabelRegeneration(teacher_checkpoint=str(tmp_path / "nope.ckpt"), num_workers=0)
    with pytest.raises(FileNotFoundError, match="teacher_checkpoint"):
        fit_with_regeneration(tmp_path, tiny_network(), toy_datamodule(), callback, max_steps=1)


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(
    tmp_path: Path, tiny_network: Callable, toy_datamodule: Callable
) -> None:
    teacher = teacher_checkpoint(tmp_path / "teacher.ckpt", tiny_network(seed=5))
    folders = {}
    for devices in (1, 2):
        out = tmp_path / f"labels_{devices}"
        callback = PseudoLabelRegeneration(
            teacher_checkpoint=str(teacher), output_dir=str(out), num_workers=0
        )
        strategy = "ddp_spawn" if devices == 2 else "auto"
        fit_with_regeneration(
            tmp_path / f"run_{devices}",
            tiny_network(),
            toy_datamodule(batch_size=1),
            callback,
            max_steps=1,
            devices=devices,
            strategy=strategy,
        )
        folders[devices] = out / "generation_1"
    one, two = read_labels(folders[1]), read_labels(folders[2])
    assert one.keys() == two.keys() and len(one) == 4
    for name in one:
        np.testing.assert_array_equal(one[name], two[name])
    records = [json.loads((folders[d] / "thresholds.json").read_text()) for d in (1, 2)]
    assert [r["num_processes"] for r in records] == [1, 2]
    assert records[0]["thresholds"] == records[1]["thresholds"]
    stats = [json.loads((folders[d] / "statistics.json").read_text()) for d in (1, 2)]
    assert stats[0] == stats[1]


# ------------------------------------------------------------------------------------------ the offline command
def test_offline_pseudo_label_command(
    tmp_path: Path, toy_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from uda_sam.cli.entry_point import main
    from uda_sam.nn import DilatedFCN

    config = Path(__file__).resolve().parents[1] / "configs" / "toy" / "pseudo_only.yaml"
    data = tmp_path / "data.yaml"
    data.write_text(
        # the data roots update the config's readers (their class_path stays the config's)
        f"data:\n  source: {{init_args: {{root: {toy_root / 'gta5'}}}}}\n"
        f"  target: {{init_args: {{root: {toy_root / 'cityscapes'}}}}}\n"
        "  source_size: [72, 40]\n  target_size: [64, 32]\n"
        # the teacher comes from --checkpoint; the config's starting weights (No Pseudo's) are not needed
        "model:\n  init_args:\n    network:\n      init_args:\n        weights: null\n"
    )
    torch.manual_seed(0)
    checkpoint = teacher_checkpoint(tmp_path / "teacher.ckpt", DilatedFCN(19))
    out = tmp_path / "labels" / "generation_1"
    args = [
        "pseudo-label",
        "--config",
        str(config),
        "--config",
        str(data),
        "--num-workers",
        "0",
        "--output",
        str(out),
    ]
    assert main([*args, "--checkpoint", str(checkpoint)]) == 0
    assert len(read_labels(out)) == 4 and (out / "thresholds.json").is_file()
    assert "pseudo-label maps" in capsys.readouterr().out

    # The same run again reuses the folder; a missing checkpoint is refused with a message naming the option.
    assert main([*args, "--checkpoint", str(checkpoint)]) == 0
    assert "Reused" in capsys.readouterr().out
    assert main([*args, "--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    # Another teacher, with --reuse require: refused, naming what differs; by default: made again.
    torch.manual_seed(1)
    other = teacher_checkpoint(tmp_path / "other.ckpt", DilatedFCN(19))
    assert main([*args, "--checkpoint", str(other), "--reuse", "require"]) == 2
    assert "differs in teacher_sha256" in capsys.readouterr().err
    assert main([*args, "--checkpoint", str(other)]) == 0
    assert "Replaced the labels made otherwise" in capsys.readouterr().out
