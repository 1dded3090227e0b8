"""Every shipped config parses through the CLI, carries the paper's hyper-parameters, and the stages link up."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from uda_sam.cli.config_files import load_config
from uda_sam.cli.entry_point import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OVERLAYS = ("logger", "trainer", "init")
STAGE_CONFIGS = sorted(
    p
    for p in CONFIGS.rglob("*.yaml")
    if p.relative_to(CONFIGS).parts[0] not in OVERLAYS
    and p.name != "pipeline.yaml"
    and "_base_" not in p.parts
)
PAPER_CONFIGS = [p for p in STAGE_CONFIGS if p.relative_to(CONFIGS).parts[0] != "toy"]


def rel(path: Path) -> str:
    return path.relative_to(CONFIGS).as_posix()


def load(path: Path) -> dict[str, Any]:
    return load_config(path)


def callbacks(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        cb["class_path"].rsplit(".", 1)[-1]: cb.get("init_args", {})
        for cb in config["trainer"].get("callbacks", [])
    }


def print_config(capsys: pytest.CaptureFixture[str], *files: Path) -> dict[str, Any]:
    args = ["fit"]
    for file in files:
        args += ["--config", str(file)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    captured = capsys.readouterr()
    assert exit_info.value.code in (0, None), captured.err[-2000:]
    return yaml.safe_load(captured.out)


def test_configs_exist() -> None:
    names = {rel(p) for p in STAGE_CONFIGS}
    table1 = [
        "no_pseudo",
        "sam_pretrain",
        "sam_pretrain_no_skip",
        "pseudo_only",
        "ours_8_10",
        "ours_9_10",
        "ours_8_11",
    ]
    table1 += [
        "ours_9_11",
        "no_conv",
        "ours_no_skip",
        "ours_kl",
        "ours_cosine",
        "ours_feature",
        "ours_both_layers",
    ]
    for source in ("gta5", "synthia"):
        assert {f"{source}/{n}.yaml" for n in table1} <= names
        assert {
            f"fcn8s/{source}/{n}.yaml" for n in ("no_pseudo", "sam_pretrain", "pseudo_only", "ours_8_10")
        } <= names
    assert {f"toy/{n}.yaml" for n in ("no_pseudo", "sam_pretrain", "pseudo_only", "ours")} <= names


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=rel)
def test_config_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    printed = print_config(capsys, path)
    raw = load(path)
    assert printed["model"]["class_path"] == raw["model"]["class_path"]
    assert printed["trainer"]["max_steps"] == raw["trainer"]["max_steps"]


@pytest.mark.parametrize("overlay", ["logger/wandb.yaml", "trainer/ddp.yaml"])
def test_overlays_compose(overlay: str, capsys: pytest.CaptureFixture[str]) -> None:
    printed = print_config(capsys, CONFIGS / "gta5" / "no_pseudo.yaml", CONFIGS / overlay)
    trainer = printed["trainer"]
    if overlay.startswith("logger"):
        args = trainer["logger"]["init_args"]
        assert args["project"] == "uda-sam" and args["offline"] is True
        assert args["save_dir"] == "runs/gta5/no_pseudo"  # the stage's own settings are kept
    else:
        assert trainer["strategy"] == "ddp" and trainer["sync_batchnorm"] is False
        assert trainer["max_steps"] == 120000


def test_caffe_init_fragment_composes(capsys: pytest.CaptureFixture[str]) -> None:
    fragment = CONFIGS / "init" / "deeplab_caffe.yaml"
    printed = print_config(capsys, CONFIGS / "gta5" / "ours_8_10.yaml", fragment)
    network = printed["model"]["init_args"]["network"]
    assert network["class_path"] == "uda_sam.nn.DeepLabV2"
    assert network["init_args"]["style"] == "caffe" and network["init_args"]["aspp_branches"] == 4
    assert network["init_args"]["pretrained"].endswith("DeepLab_resnet_pretrained_init-f81d91e8.pth")
    # The stage's own settings are kept: the paper's network, the SAM loss, the data.
    assert network["init_args"]["backbone"] == "resnet101" and network["init_args"]["freeze_bn"] is True
    assert printed["model"]["init_args"]["self_attention"]["init_args"]["weight"] == 0.1
    assert printed["data"]["normalization"] == "caffe" and printed["data"]["target_size"] == [1024, 512]


def test_fcn8s_caffe_fragment_composes(capsys: pytest.CaptureFixture[str]) -> None:
    fragment = CONFIGS / "init" / "fcn8s_caffe.yaml"
    printed = print_config(capsys, CONFIGS / "fcn8s" / "gta5" / "ours_8_10.yaml", fragment)
    network = printed["model"]["init_args"]["network"]
    assert network["class_path"] == "uda_sam.nn.FCN8s"
    assert network["init_args"]["style"] == "caffe" and network["init_args"]["weights"] is None
    assert network["init_args"]["pretrained"].endswith("vgg16_from_caffe.pth")
    assert network["init_args"]["num_classes"] == 19
    assert printed["model"]["init_args"]["lr"] == 1.0e-5  # the stage's own recipe is kept
    assert printed["data"]["normalization"] == "caffe"


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=rel)
def test_paper_hyperparameters(path: Path) -> None:
    config = load(path)
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]
    parts = path.relative_to(CONFIGS).parts
    fcn = parts[0] == "fcn8s"
    source = parts[1] if fcn else parts[0]
    name = path.stem

    assert trainer["max_steps"] == 120000 and trainer["val_check_interval"] == 2000
    assert trainer["check_val_every_n_epoch"] is None
    best, last = callbacks(config)["ModelCheckpoint"], callbacks(config)["LastStepCheckpoint"]
    assert best["monitor"] == "val/mIoU" and best["mode"] == "max" and best["filename"] == "best"
    assert best["save_last"] is False  # last.ckpt is LastStepCheckpoint's: a monitored one would lag
    assert last["every_n_train_steps"] == 2000 and last["dirpath"] == best["dirpath"]
    reader = {"gta5": "uda_sam.data.GTA5", "synthia": "uda_sam.data.Synthia"}[source]
    assert data["source"] == {"class_path": reader, "init_args": {"root": f"data/{source}"}}
    assert data["target"] == {
        "class_path": "uda_sam.data.Cityscapes",
        "init_args": {"root": "data/cityscapes"},
    }
    assert data["batch_size"] == 1 and data["target_size"] == [1024, 512]
    assert data["source_size"] == ([1280, 720] if source == "gta5" else [1280, 760])
    assert model["val_class_subsets"] == (["19"] if source == "gta5" else ["16", "13"])

    network = model["network"]
    if fcn:
        assert network["class_path"] == "uda_sam.nn.FCN8s"
        assert model["optimizer"] == "adam" and float(model["lr"]) == 1e-5 and model["betas"] == [0.9, 0.99]
        assert model["lr_schedule"] == "step" and model["step_size"] == 50000 and model["step_gamma"] == 0.1
    else:
        assert (
            network["class_path"] == "uda_sam.nn.DeepLabV2"
            and network["init_args"]["backbone"] == "resnet101"
        )
        assert (
            model["optimizer"] == "sgd"
            and float(model["lr"]) == 2.5e-4
            and float(model["weight_decay"]) == 5e-4
        )
        assert model["momentum"] == 0.9 and model["lr_schedule"] == "poly" and model["poly_power"] == 0.9
    assert network["init_args"]["pretrained"] == "imagenet"

    if config["model"]["class_path"] == "uda_sam.tasks.SAMPretraining":
        assert model["skip_connection"] is (name != "sam_pretrain_no_skip")
        return
    assert config["model"]["class_path"] == "uda_sam.tasks.SelfTraining"
    if name == "no_pseudo":
        assert model["self_attention"] is None and model["use_target"] is False
        return
    assert model["use_target"] is True
    if name == "pseudo_only":
        assert model["self_attention"] is None
        return
    assert model["self_attention"]["class_path"] == "uda_sam.nn.SelfAttentionLoss"
    loss = model["self_attention"]["init_args"]
    assert loss["weight"] == (0.001 if fcn else 0.1)
    match = re.fullmatch(r"ours_(8|9)_(10|11)", name)
    if match:
        eq_target, eq_domains = match.groups()
    else:  # ablations and appendix variants use the source's best setting
        eq_target, eq_domains = ("8", "10") if source == "gta5" else ("9", "11")
    assert loss["target"] == {"8": "residual", "9": "attended"}[eq_target]
    assert loss["domains"] == {"10": "both", "11": "target"}[eq_domains]
    no_conv = {
        "class_path": "uda_sam.nn.SelfAttentionModule",
        "init_args": {"num_classes": 19, "use_conv": False},
    }
    variants = {
        "ours_kl": {"distance": "kl"},
        "ours_cosine": {"distance": "cosine"},
        "no_conv": {"sam": no_conv},
        "ours_feature": {"layer": "feature"},
        "ours_both_layers": {"layer": "both"},
    }
    for key, value in ({"distance": "l2", "layer": "prediction"} | variants.get(name, {})).items():
        assert loss[key] == value, key


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=rel)
def test_stage2_inputs_come_from_earlier_stages(path: Path) -> None:
    """Every SAM file and teacher checkpoint a config reads is what a sibling config writes."""
    config = load(path)
    siblings = [load(p) for p in path.parent.glob("*.yaml") if p.name != "pipeline.yaml"]
    exported = {c["model"]["init_args"].get("sam_export_path") for c in siblings}
    last_checkpoints = {f"{callbacks(c)['LastStepCheckpoint']['dirpath']}/last.ckpt" for c in siblings}
    loss = (config["model"]["init_args"].get("self_attention") or {}).get("init_args", {})
    for key in ("sam", "feature_sam"):
        if isinstance(loss.get(key), str):
            assert loss[key] in exported, f"{key} {loss[key]} is written by no config in {path.parent.name}"
    regeneration = callbacks(config).get("PseudoLabelRegeneration")
    if regeneration is not None:
        assert regeneration["teacher_checkpoint"] in last_checkpoints
        assert regeneration["teacher_checkpoint"].endswith("no_pseudo/checkpoints/last.ckpt")
    run_dir = config["trainer"]["default_root_dir"]
    assert callbacks(config)["ModelCheckpoint"]["dirpath"] == f"{run_dir}/checkpoints"
    assert callbacks(config)["LastStepCheckpoint"]["dirpath"] == f"{run_dir}/checkpoints"
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == run_dir


def test_toy_configs_run_offline_on_cpu() -> None:
    for path in STAGE_CONFIGS:
        if rel(path).startswith("toy/"):
            config = load(path)
            assert config["trainer"]["accelerator"] == "auto"  # the GPU when there is one
            assert config["trainer"]["logger"]["init_args"]["offline"] is True
            network = config["model"]["init_args"]["network"]
            assert network["class_path"] == "uda_sam.nn.DilatedFCN"
            # Stages 0 and 1 train from scratch; every later stage starts from the No Pseudo network and trains
            # BatchNorm (self-training in one pass over both domains).
            starts_from_no_pseudo = (
                network["init_args"].get("weights") == "runs/toy/no_pseudo/checkpoints/last.ckpt"
            )
            assert starts_from_no_pseudo == (path.name not in ("no_pseudo.yaml", "sam_pretrain.yaml"))
            assert network["init_args"]["freeze_bn"] is False
            if config["model"]["class_path"] == "uda_sam.tasks.SelfTraining" and path.name != "no_pseudo.yaml":
                assert config["model"]["init_args"]["joint_forward"] is True
