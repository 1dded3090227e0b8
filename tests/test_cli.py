"""The ``uda-sam`` command: overview, extra commands, the toy pipeline through LightningCLI, bad input."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SMALL_TOY_RUN, TOY_CONFIGS

from uda_sam.cli.entry_point import EXTRA_COMMANDS, main
from uda_sam.nn import DeepLabV2

REPO = Path(__file__).resolve().parents[1]
TOY = TOY_CONFIGS
SMALL = SMALL_TOY_RUN

NO_LOGGER = ["--trainer.logger=false"]


@contextmanager
def working_dir(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def one_error(capsys: pytest.CaptureFixture[str], text: str) -> str:
    """The command's stderr, checked to end with its one error message, printed once, without object dumps."""
    err = capsys.readouterr().err
    assert err.count(text) == 1, err
    assert text in err.strip().splitlines()[-1] and "Traceback" not in err and "Namespace(" not in err
    return err


@pytest.fixture(scope="module")
def toy_runs(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stages 0 and 1 of the toy pipeline run through the CLI (in their own working directory)."""
    work = tmp_path_factory.mktemp("cli")
    (work / "data").mkdir()
    (work / "data" / "toy").symlink_to(toy_root, target_is_directory=True)
    with working_dir(work):
        # With the offline WandbLogger; 3 steps, validated at step 2 only.
        assert main(["fit", "--config", str(TOY / "no_pseudo.yaml"), *SMALL, "--trainer.max_steps=3"]) == 0
        assert main(["fit", "--config", str(TOY / "sam_pretrain.yaml"), *SMALL, *NO_LOGGER]) == 0
    return work


def test_overview_lists_all_commands(capsys: pytest.CaptureFixture[str]) -> None:
    for args in ([], ["--help"], ["-h"]):
        assert main(args) == 0
        out = capsys.readouterr().out
        for command in ("fit", "validate", "test", "predict", *EXTRA_COMMANDS):
            assert f"  {command} " in out


def test_python_dash_m(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "uda_sam", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0 and "make-toy-data" in done.stdout


def test_make_toy_data_and_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "toy"
    args = [
        "make-toy-data",
        str(root),
        "--num-source",
        "1",
        "--num-target",
        "1",
        "--num-val",
        "2",
        "--num-test",
        "1",
        "--size",
        "32",
        "16",
    ]
    assert main(args) == 0
    val = sorted((root / "cityscapes" / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    assert len(val) == 2 and (root / "gta5" / "images" / "00001.png").is_file()
    assert len(list((root / "cityscapes" / "gtFine" / "test").glob("*/*_gtFine_labelIds.png"))) == 1
    # Ground truth copied as predictions scores 100 %.
    pred = tmp_path / "pred"
    for path in val:
        (pred / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, pred / path.parent.name / path.name.replace("_gtFine_labelIds", "_pred"))
    output = tmp_path / "result.json"
    assert (
        main(
            [
                "evaluate",
                "--pred-dir",
                str(pred),
                "--gt-dir",
                str(root / "cityscapes"),
                "--output",
                str(output),
            ]
        )
        == 0
    )
    assert json.loads(output.read_text())["mIoU_19"] == pytest.approx(1.0)
    assert (
        main(["evaluate", "--pred-dir", str(tmp_path / "empty"), "--gt-dir", str(root / "cityscapes")]) != 0
    )


def test_make_toy_data_option_errors_are_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["make-toy-data", str(tmp_path / "toy"), "--size", "16", "8"]) == 2
    one_error(capsys, "uda-sam make-toy-data: error: size must be at least 32x16 pixels, got 16x8")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["make-toy-data", str(tmp_path / "other"), "--num-val", "1"]) == 2
    one_error(
        capsys, f"uda-sam make-toy-data: error: toy data root {tmp_path / 'other'} is a non-empty folder"
    )


def test_toy_stage0_and_stage1(toy_runs: Path) -> None:
    no_pseudo = toy_runs / "runs" / "toy" / "no_pseudo"
    assert (no_pseudo / "checkpoints" / "last.ckpt").is_file()
    assert (no_pseudo / "config.yaml").is_file()
    assert list((no_pseudo / "wandb").glob("offline-run-*"))
    ckpt = torch.load(no_pseudo / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and not any(k.startswith("self_attention.") for k in ckpt["state_dict"])
    # The best-on-validation network is kept under its own name.
    assert sorted(p.name for p in (no_pseudo / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(no_pseudo / "checkpoints" / "best.ckpt", weights_only=True)["global_step"] == 2
    sam = torch.load(toy_runs / "runs" / "toy" / "sam_pretrain" / "sam.pt", weights_only=True)
    assert sam["num_classes"] == 19 and sam["use_conv"]


def test_fit_refuses_an_earlier_runs_folder_but_resumes_it(
    toy_runs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = toy_runs / "runs" / "toy" / "no_pseudo"
    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    args = ["fit", "--config", str(TOY / "no_pseudo.yaml"), *SMALL, *NO_LOGGER, "--trainer.max_steps=3"]
    with working_dir(toy_runs):
        assert main(args) == 2
    message = one_error(capsys, "uda-sam fit: error: this fit would mix its files with an earlier run's")
    checkpoints = run.resolve() / "checkpoints"
    assert f"{checkpoints} holds best.ckpt, last.ckpt" in message
    assert "LastStepCheckpoint.dirpath, ModelCheckpoint.dirpath" in message
    assert f"--ckpt_path {checkpoints / 'last.ckpt'}" in message
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before  # nothing written
    # Resuming the run from its own checkpoint is fine (it is finished: nothing more is trained).
    with working_dir(toy_runs):
        assert main([*args, "--ckpt_path", "runs/toy/no_pseudo/checkpoints/last.ckpt"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    # The SAM file counts as the run's too.
    sam = ["fit", "--config", str(TOY / "sam_pretrain.yaml"), *SMALL, *NO_LOGGER]
    with working_dir(toy_runs):
        assert main(sam) == 2
    assert "sam_pretrain holds sam.pt" in one_error(capsys, "uda-sam fit: error: this fit would mix")


def test_toy_validate_and_predict(toy_runs: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = "runs/toy/no_pseudo/checkpoints/last.ckpt"
    with working_dir(toy_runs), caplog.at_level("INFO"):
        base = ["--config", str(TOY / "no_pseudo.yaml"), "--ckpt_path", ckpt, *SMALL, *NO_LOGGER]
        assert main(["validate", *base]) == 0
        assert "mIoU (19)" in caplog.text  # per-class table reported by validate
        writer = [
            "--trainer.callbacks+=uda_sam.callbacks.PredictionWriter",
            "--trainer.callbacks.output_dir=preds",
        ]
        assert main(["predict", *base, *writer]) == 0
    labels = sorted((toy_runs / "preds" / "labelIds").glob("*/*_labelIds.png"))
    colors = sorted((toy_runs / "preds" / "color").glob("*/*_color.png"))
    assert len(labels) == len(colors) == 2


def test_toy_predict_on_a_folder_of_images(toy_runs: Path) -> None:
    """`uda-sam predict --data.predict_root DIR`: PNGs at each image's own size under the images' relative paths."""
    from PIL import Image

    folder = toy_runs / "my_frames"
    sizes = {"drive_a/0001.png": (50, 30), "drive_b/night/0002.jpg": (70, 44)}
    for relative, size in sizes.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (90, 120, 60)).save(folder / relative)
    ckpt = "runs/toy/no_pseudo/checkpoints/last.ckpt"
    with working_dir(toy_runs):
        args = ["--config", str(TOY / "no_pseudo.yaml"), "--ckpt_path", ckpt, *SMALL, *NO_LOGGER]
        args += ["--data.predict_root=my_frames", "--trainer.callbacks+=uda_sam.callbacks.PredictionWriter"]
        assert main(["predict", *args, "--trainer.callbacks.output_dir=folder_preds"]) == 0
    for relative, size in sizes.items():
        stem = str(Path(relative).with_suffix(""))
        for kind, mode in (("labelIds", "L"), ("color", "RGB")):
            with Image.open(toy_runs / "folder_preds" / kind / f"{stem}_{kind}.png") as written:
                assert written.size == size and written.mode == mode


def test_toy_stage2_ours(toy_runs: Path) -> None:
    """Stage 2 as shipped: pseudo labels from the stage-0 checkpoint (PseudoLabelRegeneration) and the stage-1 SAM."""
    with working_dir(toy_runs):
        assert main(["fit", "--config", str(TOY / "ours.yaml"), *SMALL, *NO_LOGGER]) == 0
    run = toy_runs / "runs" / "toy" / "ours"
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    exported = torch.load(toy_runs / "runs" / "toy" / "sam_pretrain" / "sam.pt", weights_only=True)[
        "state_dict"
    ]
    for key, value in exported.items():
        assert torch.equal(
            state[f"self_attention.sam.{key}"], value
        )  # the frozen SAM is bit-identical after training
    assert list((run / "pseudo_labels").rglob("*.png"))


def test_missing_dataset_root_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import wandb

    wandb.finish()  # an earlier test's run would be taken over by the logger instead of a new one
    # With the config's offline W&B logger: the failed start leaves no W&B run behind.
    with working_dir(tmp_path):
        assert (
            main(["fit", "--config", str(TOY / "no_pseudo.yaml"), *SMALL, "--data.source.root=nowhere/gta5"])
            == 2
        )
    one_error(capsys, "uda-sam fit: error: data.source: GTA5 root nowhere/gta5 does not exist")
    assert list((tmp_path / "runs").rglob("*")) == [
        tmp_path / "runs" / "toy",
        tmp_path / "runs" / "toy" / "no_pseudo",
    ]


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        (
            "fit",
            ["--model.init_args.self_attention.weight=-1"],
            "SelfAttentionLoss: weight must be >= 0, got -1.0",
        ),
        (
            "validate",
            ["--model.init_args.self_attention.weight=-1"],
            "SelfAttentionLoss: weight must be >= 0",
        ),
        (
            "fit",
            ["--model.init_args.self_attention.sam=nowhere/sam.pt"],
            "SelfAttentionLoss.sam: nowhere/sam.pt does not exist",
        ),
    ],
)
def test_bad_config_gives_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, args: list[str], message: str
) -> None:
    with working_dir(tmp_path):
        assert main([command, "--config", str(TOY / "no_pseudo.yaml"), *SMALL, *NO_LOGGER, *args]) == 2
    one_error(capsys, f"uda-sam {command}: error: {message}")
    assert not (tmp_path / "runs").exists()


def test_wandb_disabled_wins_over_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    from uda_sam.cli.lightning import UDASamCLI

    wandb.finish()  # an earlier test's run would be taken over by the logger instead of a new one
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with working_dir(tmp_path):
        cli = UDASamCLI(args=["--config", str(TOY / "no_pseudo.yaml"), *SMALL], run=False)
        cli.trainer.logger.experiment.log({"x": 1.0})
    assert os.environ["WANDB_MODE"] == "disabled"
    assert not list(tmp_path.rglob("wandb"))  # no offline run written


def test_unknown_choice_is_rejected_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(TOY / "ours.yaml"),
                "--model.init_args.self_attention.init_args.target=residuals",
                "--print_config",
            ]
        )
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "self_attention.init_args.target" in err and "'residual', 'attended'" in err


def test_published_model_validates_and_teaches(toy_root: Path, tmp_path: Path) -> None:
    """A published multi-level model (AdaptSegNet's layout) scored by `validate` and used by `pseudo-label`."""
    torch.manual_seed(0)
    trained = DeepLabV2(backbone="resnet50", style="caffe", aspp_branches=2).state_dict()
    published = {
        f"module.{k.removeprefix('backbone.')}": v for k, v in trained.items() if k.startswith("backbone.")
    }
    for i, param in itertools.product(
        range(4), ("weight", "bias")
    ):  # AdaptSegNet's files hold 4 branches, use 2
        main_head = trained[f"classifier.conv2d_list.{min(i, 1)}.{param}"]
        published[f"module.layer6.conv2d_list.{i}.{param}"] = (
            main_head if i < 2 else torch.randn_like(main_head)
        )
        aux_shape = (19, 1024, 3, 3) if param == "weight" else (19,)
        published[f"module.layer5.conv2d_list.{i}.{param}"] = torch.randn(aux_shape)
    model = tmp_path / "GTA2Cityscapes_multi.pth"
    torch.save(published, model)
    network = {"backbone": "resnet50", "style": "caffe", "aspp_branches": 2, "pretrained": None}
    overlay = {
        "model": {"init_args": {"network": {"class_path": "uda_sam.nn.DeepLabV2", "init_args": network}}}
    }
    overlay["data"] = {"normalization": "caffe"}
    (tmp_path / "published.yaml").write_text(
        yaml.safe_dump(overlay)
    )  # `uda-sam pseudo-label` reads configs only
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "toy").symlink_to(toy_root, target_is_directory=True)
    configs = ["--config", str(TOY / "no_pseudo.yaml"), "--config", str(tmp_path / "published.yaml")]
    with working_dir(tmp_path):
        weights = f"--model.init_args.network.init_args.weights={model}"
        assert main(["validate", *configs, *SMALL, *NO_LOGGER, weights]) == 0
        args = ["--checkpoint", str(model), "--output", "generation_1", "--num-workers", "0"]
        assert main(["pseudo-label", *configs, *args]) == 0
    assert len(list((tmp_path / "generation_1").rglob("*.png"))) == 4


def test_pseudo_label_merges_network_sections_as_fit_does() -> None:
    from uda_sam.cli.pseudo_label import merge_network_sections

    stage = {"class_path": "uda_sam.nn.FCN8s", "init_args": {"num_classes": 7, "pretrained": "imagenet"}}
    fragment = {"class_path": "FCN8s", "init_args": {"style": "caffe", "pretrained": "vgg16_from_caffe.pth"}}
    merged = merge_network_sections(stage, fragment)
    assert merged["init_args"] == {"num_classes": 7, "pretrained": "vgg16_from_caffe.pth", "style": "caffe"}
    assert (
        merge_network_sections(merged, {"init_args": {"weights": "m.pth"}})["init_args"]["num_classes"] == 7
    )
    other = {"class_path": "uda_sam.nn.DeepLabV2", "init_args": {"style": "caffe"}}
    assert merge_network_sections(stage, other) == other  # another class replaces the section
