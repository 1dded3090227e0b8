"""Kill `uda-sam pipeline` anywhere, run it again, get the same table: SIGKILL in each kind of work.

A shortened toy pipeline (No Pseudo, then one generation of Pseudo-Only; 6 steps a stage with random scale, crop
and flip; last.ckpt every 2 steps, validation at step 4) runs once uninterrupted, and once as a series of
commands each killed by SIGKILL at a chosen moment: in a training step, while writing a checkpoint, in validation,
while writing pseudo labels, in the second stage's training, and while writing the results table, each command
resuming what the one before left. The last command, not killed, must end with the uninterrupted run's
``results.json`` and the weights of its every ``last.ckpt``, with no temporary file left.

Each command runs ``uda_sam.cli.entry_point.main(["pipeline", ...])`` in a forked process (no interpreter start, so the 8
commands take seconds), which sends itself SIGKILL when it reaches the chosen call: the moments are exact, and no
hook is needed in the package.
"""

from __future__ import annotations

import functools
import inspect
import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import uda_sam.pseudo_labels.generation as generation_module
from uda_sam.cli.config_files import load_config
from uda_sam.cli.entry_point import main
from uda_sam.tasks import SegmentationTask, SelfTraining

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy"

#: Where each command is killed: (kind of work, object, attribute, which call, which calls count).
Fault = tuple[str, Any, str, int, Callable[..., bool]]


def _any(*args: Any, **kwargs: Any) -> bool:
    return True


def _replacing(name: str) -> Callable[..., bool]:
    """Calls of ``os.replace`` that move a finished temporary file onto ``name``."""
    return lambda source, destination, *args, **kwargs: Path(destination).name == name


FAULTS: list[Fault] = [
    ("training step", SelfTraining, "training_step", 3, _any),  # No Pseudo, step 3 (last.ckpt at step 2)
    ("checkpoint write", os, "replace", 1, _replacing("last.ckpt.partial")),  # No Pseudo, step 4's last.ckpt
    ("validation", SegmentationTask, "validation_step", 1, _any),  # No Pseudo, at step 4
    ("pseudo-label write", generation_module, "save_label_png", 2, _any),  # Pseudo-Only's generation 1
    ("training step", SelfTraining, "training_step", 3, _any),  # Pseudo-Only, step 3
    ("results table", os, "replace", 1, _replacing("results.json")),  # results.md written, results.json not
]


def stage_config(tmp_path: Path, name: str) -> str:
    """A toy stage config whose last.ckpt is written every 2 steps, its network trained from its initialisation."""
    config = load_config(TOY / name)
    config["model"]["init_args"]["network"].get("init_args", {}).pop("weights", None)
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("LastStepCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = 2
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def pipeline_file(tmp_path: Path, toy_root: Path, output_dir: Path) -> Path:
    config = {
        "output_dir": str(output_dir),
        "seeds": [0],
        "generations": 1,
        "no_pseudo": {"config": stage_config(tmp_path, "no_pseudo.yaml")},
        "settings": [{"name": "Pseudo-Only", "config": stage_config(tmp_path, "pseudo_only.yaml")}],
        "common_args": [
            f"--data.source.root={toy_root / 'gta5'}",
            f"--data.target.root={toy_root / 'cityscapes'}",
            "--data.source_size=[72,40]",
            "--data.target_size=[64,32]",
            "--data.batch_size=1",
            "--data.source_holdout=1",
            "--data.random_scale=[0.75,1.5]",
            "--data.crop_size=[48,24]",
            "--data.hflip=true",
            "--trainer.max_steps=6",
            "--trainer.val_check_interval=4",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.logger=false",
        ],
    }
    path = output_dir.parent / f"{output_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_command(pipeline: Path, fault: Fault | None = None) -> int:
    """Run the pipeline command in a forked process, killed at ``fault``; its exit code (-9: killed)."""

    def command() -> None:
        # The same arithmetic in every command; set in the main thread before any other starts, which a forked
        # process needs (threads that start torch's thread pool at once after a fork fail).
        torch.set_num_threads(1)
        if fault is not None:
            _, owner, attribute, which, counts = fault
            real, calls = getattr(owner, attribute), [0]

            @functools.wraps(real)
            def killing(*args: Any, **kwargs: Any) -> Any:
                if counts(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == which:
                        os.kill(os.getpid(), signal.SIGKILL)
                return real(*args, **kwargs)

            if not isinstance(owner, type(os)):  # a method: Lightning reads the hooks' parameters
                killing.__signature__ = inspect.signature(real)  # type: ignore[attr-defined]
            setattr(owner, attribute, killing)
        sys.exit(main(["pipeline", "--config", str(pipeline)]))

    process = multiprocessing.get_context("fork").Process(target=command)
    process.start()
    process.join()
    return process.exitcode


def results(output_dir: Path) -> str:
    """``results.json`` without the stages' durations, with paths relative to the output folder, as JSON text (in
    which NaN, the IoU of a class absent from the images, equals NaN)."""
    record = json.loads((output_dir / "results.json").read_text().replace(str(output_dir), "<output>"))
    for rows in record.values():
        for generations in rows.values():
            for stage in generations.values():
                stage.pop("seconds")
    return json.dumps(record, sort_keys=True)


@pytest.mark.slow
def test_pipeline_killed_in_each_kind_of_work_ends_as_an_uninterrupted_one(
    tmp_path: Path, toy_root: Path
) -> None:
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    assert run_command(pipeline_file(tmp_path, toy_root, uninterrupted)) == 0

    pipeline = pipeline_file(tmp_path, toy_root, resumed)
    for fault in FAULTS:
        assert run_command(pipeline, fault) == -signal.SIGKILL, f"not killed in the {fault[0]}"
    assert run_command(pipeline) == 0

    assert results(resumed) == results(uninterrupted)
    checkpoints = sorted(p.relative_to(uninterrupted) for p in uninterrupted.rglob("last.ckpt"))
    assert (
        len(checkpoints) == 2
        and sorted(p.relative_to(resumed) for p in resumed.rglob("last.ckpt")) == checkpoints
    )
    for relative in checkpoints:
        a, b = (torch.load(run / relative, weights_only=True) for run in (uninterrupted, resumed))
        assert a["global_step"] == b["global_step"] == 6
        assert a["state_dict"].keys() == b["state_dict"].keys()
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), relative

    # Nothing temporary is left: no partial checkpoint, temporary file or folder, outdated labels, or lock.
    leftovers = [
        p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".partial", ".outdated", ".lock"))
    ]
    assert not leftovers, leftovers
    # And every file the uninterrupted run wrote is there, but one: the validation killed midway is not run again
    # (Lightning resumes after the step's checkpoint, written before its validation), so No Pseudo never had its
    # best validated network of step 4 written; the table validates each stage's last step anew.
    files = {
        run: {p.relative_to(run) for p in run.rglob("*") if p.is_file()} for run in (uninterrupted, resumed)
    }
    assert files[uninterrupted] - files[resumed] == {Path("seed_0/no_pseudo/checkpoints/best.ckpt")}
    assert files[resumed] <= files[uninterrupted]
