"""A full disk or a read-only folder while writing checkpoints or pseudo labels: one error naming the path, nothing
half-written, and the next run makes the file anew. Tests run as root, where chmod stops no write: the failures
are simulated by making the write raise the error the system would."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

import uda_sam.pseudo_labels.generation as generation_module
from uda_sam.callbacks import LastStepCheckpoint
from uda_sam.callbacks.checkpoint import AtomicCheckpointIO
from uda_sam.cli.entry_point import main
from uda_sam.files import WriteError, remove_stale_temporaries, write_atomically
from uda_sam.pseudo_labels.generation import generate_pseudo_labels
from uda_sam.tasks import SelfTraining

try:
    from tests.conftest import TinySegNet
except ImportError:  # tests/ itself is on sys.path (no tests/__init__.py)
    from conftest import TinySegNet  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy"
DISK_FULL = os.strerror(errno.ENOSPC)


def full_disk_after(calls: int, real: Callable[..., Any]) -> Callable[..., Any]:
    """``real`` for its first ``calls`` calls; then a write that fails halfway on a full disk."""
    count = {"n": 0}

    def write(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> Any:
        count["n"] += 1
        if count["n"] <= calls:
            return real(obj, handle, *args, **kwargs)
        if hasattr(handle, "write"):
            handle.write(b"half a file")
        raise OSError(errno.ENOSPC, DISK_FULL)

    return write


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------------------------------------ write_atomically
def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    path.write_bytes(b"old")

    def fill_the_disk(handle: Any) -> None:
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, DISK_FULL)

    with pytest.raises(WriteError) as failed:
        write_atomically(path, fill_the_disk)
    assert str(failed.value) == f"could not write {path}: {DISK_FULL}"
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["result.json"]


def test_a_read_only_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(args[0]))

    import uda_sam.files as files_module

    monkeypatch.setattr(files_module, "open", read_only, raising=False)
    with pytest.raises(WriteError, match=f"^could not write {tmp_path / 'a.json'}: Read-only file system$"):
        write_atomically(tmp_path / "a.json", lambda handle: handle.write(b"{}"))
    assert os.listdir(tmp_path) == []


def test_temporaries_of_killed_writers_are_removed(tmp_path: Path) -> None:
    killed = tmp_path / f".result.json.{dead_pid()}.0123abcd.tmp"
    live = tmp_path / f".result.json.{os.getpid()}.0123abcd.tmp"  # another thread of a live process writes
    other = tmp_path / f".best.ckpt.{dead_pid()}.89abcdef.tmp"
    for path in (killed, live, other):
        path.write_bytes(b"half")
    write_atomically(tmp_path / "result.json", lambda handle: handle.write(b"{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "result.json"])
    assert remove_stale_temporaries(tmp_path) == [other] and live.exists()


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("writer", ["lightning", "atomic"])
def test_a_full_disk_while_writing_last_ckpt(
    tmp_path: Path, toy_datamodule: Callable, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    """The fit stops naming last.ckpt, which keeps the step before; the next run resumes from it to the end."""
    checkpoints = tmp_path / "checkpoints"

    def fit(ckpt_path: str | None = None) -> Trainer:
        trainer = Trainer(
            accelerator="cpu",
            max_steps=4,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[LastStepCheckpoint(dirpath=str(checkpoints), every_n_train_steps=1)],
            plugins=[AtomicCheckpointIO()] if writer == "atomic" else None,
            default_root_dir=str(tmp_path),
        )
        task = SelfTraining(network=TinySegNet(), use_target=False)
        trainer.fit(task, datamodule=toy_datamodule(), ckpt_path=ckpt_path)
        return trainer

    real_save = torch.save
    monkeypatch.setattr(torch, "save", full_disk_after(2, real_save))
    with pytest.raises(WriteError) as failed:
        fit()
    assert str(failed.value) == f"could not write {checkpoints / 'last.ckpt'}: {DISK_FULL}"
    assert os.listdir(checkpoints) == ["last.ckpt"]  # no partial or temporary file
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2

    monkeypatch.setattr(torch, "save", real_save)
    assert fit(str(checkpoints / "last.ckpt")).global_step == 4
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 4


def test_fit_on_a_full_disk_ends_with_one_error_naming_the_checkpoint(
    tmp_path: Path,
    toy_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "save", full_disk_after(0, torch.save))
    args = ["fit", "--config", str(TOY / "no_pseudo.yaml"), "--trainer.logger=false"]
    args += [f"--data.source.root={toy_root / 'gta5'}", f"--data.target.root={toy_root / 'cityscapes'}"]
    args += ["--data.source_size=[72, 40]", "--data.target_size=[64, 32]", "--data.source_holdout=1"]
    args += ["--data.batch_size=1"]
    args += ["--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"]
    assert main(args) == 2
    checkpoints = tmp_path / "runs" / "toy" / "no_pseudo" / "checkpoints"
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"uda-sam fit: error: could not write {checkpoints / 'last.ckpt'}: {DISK_FULL}"
    assert not checkpoints.exists() or not os.listdir(checkpoints)


# ------------------------------------------------------------------------------------------------ pseudo labels
def test_a_full_disk_while_writing_pseudo_labels(
    tmp_path: Path, tiny_network: Callable, toy_datamodule: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = toy_datamodule().target_inference_dataset()
    out = tmp_path / "labels" / "generation_1"

    def generate() -> Any:
        return generate_pseudo_labels(tiny_network(), dataset, out, num_workers=0, progress=False)

    real = generation_module.save_label_png
    monkeypatch.setattr(generation_module, "save_label_png", full_disk_after(2, real))
    with pytest.raises(WriteError) as failed:
        generate()
    assert str(failed.value) == f"could not write {out}: {DISK_FULL}"
    assert os.listdir(out.parent) == []  # neither the folder nor its temporary one

    monkeypatch.setattr(generation_module, "save_label_png", real)
    assert len(list(generate().label_dir.rglob("*.png"))) == 4


def test_pseudo_label_command_on_a_read_only_folder(
    tmp_path: Path, toy_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`uda-sam pseudo-label` ends with one line naming the output folder; run again, it makes the labels."""
    from uda_sam.nn import DeepLabV2

    data = tmp_path / "data.yaml"
    network_args = {"num_classes": 19, "backbone": "resnet18", "pretrained": None, "freeze_bn": False}
    data.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "source": {"init_args": {"root": str(toy_root / "gta5")}},
                    "target": {"init_args": {"root": str(toy_root / "cityscapes")}},
                    "source_size": [72, 40],
                    "target_size": [64, 32],
                },
                "model": {
                    "init_args": {
                        "network": {"class_path": "uda_sam.nn.DeepLabV2", "init_args": network_args}
                    }
                },
            }
        )
    )
    torch.manual_seed(0)
    network = DeepLabV2(**network_args)
    teacher = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {f"network.{k}": v for k, v in network.state_dict().items()}}, teacher)
    out = tmp_path / "labels" / "generation_1"
    args = ["pseudo-label", "--config", str(TOY / "pseudo_only.yaml"), "--config", str(data)]
    args += ["--num-workers", "0", "--checkpoint", str(teacher), "--output", str(out)]

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(generation_module, "save_label_png", read_only)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"uda-sam pseudo-label: error: could not write {out}: {os.strerror(errno.EROFS)}"
    assert os.listdir(out.parent) == []

    monkeypatch.undo()
    assert main(args) == 0
    assert len(list(out.rglob("*.png"))) == 4 and os.listdir(out.parent) == ["generation_1"]
