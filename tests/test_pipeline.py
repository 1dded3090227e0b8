"""`uda-sam pipeline`: the toy protocol end to end at the smallest size, resume, and refusals before training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from uda_sam.cli.config_files import load_config
from uda_sam.cli.entry_point import main
from uda_sam.cli.pipeline import _claim_output_dir
from uda_sam.cli.pipeline_config import PipelineConfigError, load_pipeline_config
from uda_sam.cli.pipeline_report import StageResult
from uda_sam.nn.sam_io import network_state_dict
from uda_sam.pseudo_labels.generation import state_dict_sha256

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy"


def pipeline_file(tmp_path: Path, toy_root: Path, **changes: object) -> Path:
    """The shipped toy pipeline, shrunk: the session's tiny toy set, Pseudo-Only and Ours (9)&(11), no Oracle, 6
    steps per stage."""
    config = yaml.safe_load((TOY / "pipeline.yaml").read_text())
    config["settings"] = [s for s in config["settings"] if s["name"] in ("Pseudo-Only", "Ours (9)&(11)")]
    config.pop("oracle", None)
    for stage in ("no_pseudo", "sam_pretraining", "oracle"):
        if stage in config:
            config[stage]["config"] = str(TOY / Path(config[stage]["config"]).name)
    for setting in config["settings"]:
        setting["config"] = str(TOY / Path(setting["config"]).name)
    config.pop("toy_data", None)
    config["output_dir"] = str(tmp_path / "out")
    config["common_args"] = [
        f"--data.source.root={toy_root / 'gta5'}",
        f"--data.target.root={toy_root / 'cityscapes'}",
        "--data.source_size=[72,40]",
        "--data.target_size=[64,32]",
        "--data.batch_size=1",
        "--data.source_holdout=1",
        "--trainer.max_steps=6",  # validated at step 4 only: last.ckpt must still hold step 6
        "--trainer.val_check_interval=4",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
    ]
    config.update(changes)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_toy_pipeline_end_to_end(
    tmp_path: Path, toy_root: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = pipeline_file(tmp_path, toy_root, generations=2)
    assert main(["pipeline", "--config", str(path)]) == 0
    out = tmp_path / "out"
    seed = out / "seed_0"
    config = load_pipeline_config(path)

    # Every stage's artefacts exist; last.ckpt holds the last step, best.ckpt the validated one.
    stages = [seed / "no_pseudo", seed / "sam_pretraining"]
    stages += [seed / s / f"generation_{g}" for s in ("pseudo_only", "ours_9_11") for g in (1, 2)]
    for stage in stages:
        assert torch.load(stage / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
        assert torch.load(stage / "checkpoints" / "best.ckpt", weights_only=True)["global_step"] == 4
    assert (seed / "sam_pretraining" / "sam.pt").is_file()
    shared = seed / "no_pseudo" / "pseudo_labels" / "generation_1"  # generation 1's labels, made once
    for setting in ("pseudo_only", "ours_9_11"):
        for generation in (1, 2):
            stage = seed / setting / f"generation_{generation}"
            labels = shared if generation == 1 else stage / "pseudo_labels" / f"generation_{generation}"
            assert (labels / "thresholds.json").is_file() and (labels / "statistics.json").is_file()
            assert len(list(labels.rglob("*.png"))) == 4
            result = json.loads((stage / "result.json").read_text())
            assert result["pseudo_labels"] == str(labels)
            assert (
                0.0 <= result["metrics"]["val/mIoU"] <= 1.0 and 0.0 <= result["metrics"]["test/mIoU"] <= 1.0
            )
            assert result["metrics"]["train/peak_loss_growth"] < 100  # nothing diverged
        assert not (seed / setting / "generation_1" / "pseudo_labels").exists()
    sam = json.loads((seed / "sam_pretraining" / "result.json").read_text())["metrics"]
    assert sam["sam/source/images"] == 1 and sam["sam/target/images"] == 2  # held-out source, target val
    assert sam["sam/target/lift"] > 0

    # Generation 2's labels come from generation 1's network.
    record = json.loads(
        (
            seed / "pseudo_only" / "generation_2" / "pseudo_labels" / "generation_2" / "thresholds.json"
        ).read_text()
    )
    teacher = seed / "pseudo_only" / "generation_1" / "checkpoints" / "last.ckpt"
    assert record["description"]["teacher"] == str(teacher)
    assert record["key"]["teacher_sha256"] == state_dict_sha256(network_state_dict(teacher))

    # The table parses: a row per setting, a column per generation, numbers in percent.
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[-2:] == ["gen 1", "gen 2"]
    assert "on the test split" in table  # the toy configs report on their labelled test split
    body = {
        cells[0]: cells[1:] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows[1:5])
    }
    assert set(body) == {"No Pseudo", "SAM pretraining (network + SAM)", "Pseudo-Only", "Ours (9)&(11)"}
    assert (
        "same-class share" in table and "| held-out source | 1 |" in table and "| target val | 2 |" in table
    )
    assert "| Ours (9)&(11) gen 2 |" in table  # the peak-growth table
    for name in ("Pseudo-Only", "Ours (9)&(11)"):
        assert all(0.0 <= float(v) <= 100.0 for v in body[name][1:])
    assert float(body["No Pseudo"][0]) >= 0.0
    captured = capsys.readouterr()
    printed = captured.out
    assert "generation 1 (reused)" in caplog.text  # Ours reused the labels Pseudo-Only's made
    assert "Checkpoints:" in printed and "SAM weights" in printed and str(out / "results.md") in printed
    assert len(config.settings) == 2

    # A second run resumes: every stage is skipped.
    assert main(["pipeline", "--config", str(path)]) == 0
    assert printed.count("[skip]") == 0 and capsys.readouterr().out.count("[skip]") == 6


def test_later_stages_start_from_the_seed_no_pseudo_network(
    tmp_path: Path, toy_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uda_sam.cli.pipeline as pipeline

    calls: dict[str, list[str]] = {}

    def fake_stage(name: str, stage_dir: Path, stage: object, extra_args: list[str], seed: int, **_: object):
        calls[name] = list(extra_args)
        return StageResult(name=name, metrics={}, checkpoint=str(stage_dir / "last.ckpt"))

    monkeypatch.setattr(pipeline, "run_stage", fake_stage)
    config = load_pipeline_config(pipeline_file(tmp_path, toy_root))
    assert config.init_from_no_pseudo  # the shipped toy pipeline's setting
    pipeline.run_seed(config, 3, tmp_path / "out")
    weights = f"--model.init_args.network.init_args.weights={tmp_path / 'out' / 'seed_3' / 'no_pseudo' / 'last.ckpt'}"
    assert weights not in calls.pop("No Pseudo")
    assert weights not in calls.pop("SAM pretraining")  # the shipped toy SAM stage trains from scratch
    assert calls and all(weights in args for args in calls.values())  # every setting


def test_a_stage_can_opt_out_of_the_no_pseudo_start(
    tmp_path: Path, toy_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sam_pretraining: {init_from_no_pseudo: false}``: the SAM stage starts from its config's weights (here from
    scratch), every other stage still from the No Pseudo network."""
    import uda_sam.cli.pipeline as pipeline

    calls: dict[str, list[str]] = {}

    def fake_stage(name: str, stage_dir: Path, stage: object, extra_args: list[str], seed: int, **_: object):
        calls[name] = list(extra_args)
        return StageResult(name=name, metrics={}, checkpoint=str(stage_dir / "last.ckpt"))

    monkeypatch.setattr(pipeline, "run_stage", fake_stage)
    sam_stage = {
        "config": str(TOY / "sam_pretrain.yaml"),
        "args": ["--model.init_args.network.init_args.weights=null"],
        "init_from_no_pseudo": False,
    }
    config = load_pipeline_config(pipeline_file(tmp_path, toy_root, sam_pretraining=sam_stage))
    assert config.init_from_no_pseudo and config.sam_pretraining.init_from_no_pseudo is False
    pipeline.run_seed(config, 0, tmp_path / "out")
    starts_from_no_pseudo = {
        name: any(arg.startswith("--model.init_args.network.init_args.weights=") for arg in args)
        for name, args in calls.items()
    }
    assert starts_from_no_pseudo.pop("SAM pretraining") is False
    assert starts_from_no_pseudo.pop("No Pseudo") is False
    assert starts_from_no_pseudo and all(starts_from_no_pseudo.values())


@pytest.mark.parametrize("where", ["top", "stage"])
def test_init_from_no_pseudo_must_be_a_boolean(tmp_path: Path, toy_root: Path, where: str) -> None:
    if where == "top":
        path, key = pipeline_file(tmp_path, toy_root, init_from_no_pseudo="yes"), "init_from_no_pseudo"
    else:
        stage = {"config": str(TOY / "sam_pretrain.yaml"), "init_from_no_pseudo": "no"}
        path, key = (
            pipeline_file(tmp_path, toy_root, sam_pretraining=stage),
            "sam_pretraining.init_from_no_pseudo",
        )
    with pytest.raises(PipelineConfigError, match=f"`{key}` must be true or false"):
        load_pipeline_config(path)


def test_stage_checkpoints_write_last_at_the_last_step(tmp_path: Path) -> None:
    """A config with only a monitored checkpoint gets a LastStepCheckpoint; none writes a lagging last.ckpt."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from uda_sam.callbacks import LastStepCheckpoint
    from uda_sam.cli.pipeline import _route_checkpoints

    best = ModelCheckpoint(monitor="val/mIoU", mode="max", save_last=True)
    trainer = Trainer(callbacks=[best], val_check_interval=5, logger=False, enable_progress_bar=False)
    _route_checkpoints(trainer, tmp_path / "checkpoints")
    last = [c for c in trainer.callbacks if isinstance(c, LastStepCheckpoint)]
    assert len(last) == 1 and trainer.callbacks[-1] is last[0]
    assert last[0]._every_n_train_steps == 5 and best.save_last is False
    assert best.dirpath == last[0].dirpath == str(tmp_path / "checkpoints")


def test_refuses_a_folder_of_another_config(
    tmp_path: Path, toy_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "pipeline.json").write_text(
        json.dumps({"source_file": "other.yaml", "record": {"something": "else"}})
    )
    path = pipeline_file(tmp_path, toy_root)
    assert main(["pipeline", "--config", str(path)]) == 2
    assert "another pipeline configuration" in capsys.readouterr().err
    (out / "pipeline.json").unlink()
    (out / "stray.txt").write_text("x")
    assert main(["pipeline", "--config", str(path)]) == 2
    assert "was not made by" in capsys.readouterr().err


def test_bad_stage_argument_gives_one_message(
    tmp_path: Path, toy_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = pipeline_file(tmp_path, toy_root)
    args = ["--args", "--model.init_args.self_attention.weight=-1"]
    assert main(["pipeline", "--config", str(path), *args]) == 2
    err = capsys.readouterr().err
    message = "uda-sam pipeline: error: SelfAttentionLoss: weight must be >= 0, got -1.0"
    assert err.count("weight must be") == 1 and err.strip().splitlines()[-1] == message
    assert "Traceback" not in err and "Namespace(" not in err


def test_refusal_names_what_changed(
    tmp_path: Path, toy_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A stage config over a base: an edit of the base changes the stage's content.
    base = tmp_path / "pseudo_only_base.yaml"
    base.write_text(yaml.safe_dump(load_config(TOY / "pseudo_only.yaml")))
    stage = tmp_path / "pseudo_only.yaml"
    stage.write_text("_base_: pseudo_only_base.yaml\n")
    path = pipeline_file(tmp_path, toy_root)
    config = yaml.safe_load(path.read_text())
    config["settings"][0]["config"] = str(stage)
    path.write_text(yaml.safe_dump(config))
    _claim_output_dir(load_pipeline_config(path))  # what an earlier run recorded

    base.write_text(base.read_text() + "# edited\n")
    before, config["generations"] = config["generations"], 3
    path.write_text(yaml.safe_dump(config))
    assert main(["pipeline", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"config file {base} content changed" in err and f"generations: {before} -> 3" in err


def test_refuses_inconsistent_stages(tmp_path: Path, toy_root: Path) -> None:
    path = pipeline_file(tmp_path, toy_root)
    config = yaml.safe_load(path.read_text())
    del config["sam_pretraining"]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(PipelineConfigError, match="no `sam_pretraining` stage"):
        load_pipeline_config(path)

    config = yaml.safe_load(pipeline_file(tmp_path, toy_root).read_text())
    config["settings"][0]["args"] = ["--model.init_args.network.init_args.num_classes=7"]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(PipelineConfigError, match="disagree on the number of classes"):
        load_pipeline_config(path)

    config["settings"][0]["args"] = []
    config["settings"][0]["config"] = str(tmp_path / "missing.yaml")
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(PipelineConfigError, match="does not exist"):
        load_pipeline_config(path)

    config = yaml.safe_load(pipeline_file(tmp_path, toy_root).read_text())
    config["sttings"] = config.pop("settings")
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(PipelineConfigError, match="unknown keys"):
        load_pipeline_config(path)


def test_shipped_pipelines_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # stage configs are named relative to the repository root
    for path in sorted((REPO / "configs").glob("*/pipeline.yaml")):
        config = load_pipeline_config(path)
        assert config.settings and config.generations >= 1


def test_results_tables_from_two_seeds() -> None:
    """The report alone: mean ± spread over seeds per setting and generation, the split named, gaps left blank."""
    from uda_sam.cli.pipeline_report import format_results

    def stage(name: str, miou: float, **more: float) -> StageResult:
        return StageResult(name=name, metrics={"val/mIoU": miou, **more}, checkpoint=f"{name}.ckpt")

    per_seed = {
        seed: {
            "No Pseudo": {0: stage("No Pseudo", 0.30 + 0.02 * seed)},
            "Pseudo-Only": {
                1: stage("gen 1", 0.40 + 0.02 * seed),
                2: stage("gen 2", 0.50, **{"train/peak_loss_growth": 1.5 + seed}),
            },
        }
        for seed in (0, 1)
    }
    table = format_results(per_seed)
    assert table.startswith(
        "Target mIoU (%) on the validation split, 2 seed(s) [0, 1] (mean ± standard deviation)"
    )
    first_table = table.split("\n\n")[1]  # after the title line
    rows = {
        cells[0]: cells[1:]
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in first_table.splitlines())
    }
    assert rows["setting"][:3] == ["mIoU (single stage)", "gen 1", "gen 2"]
    assert rows["No Pseudo"][:3] == ["31.0 ± 1.4", "", ""]
    assert rows["Pseudo-Only"][:3] == ["", "41.0 ± 1.4", "50.0 ± 0.0"]
    assert "| Pseudo-Only gen 2 | 2.50 | n/a |" in table  # the highest seed's peak loss growth
    assert "attention" not in table  # no SAM pretraining stage, no attention table


SHIPPED_PIPELINES = sorted(
    [TOY / "pipeline.yaml", *(p for p in (REPO / "benchmarks").glob("*.yaml") if "no_pseudo" in p.read_text())]
)


@pytest.mark.parametrize("path", SHIPPED_PIPELINES, ids=lambda p: p.name)
def test_shipped_pipeline_files_load(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pipeline file the README and the benchmark records name reads, with every stage config in place."""
    monkeypatch.chdir(REPO)  # their stage configs are named from the repository root, as the commands run them
    config = load_pipeline_config(path)
    assert config.settings and config.no_pseudo.config
    for stage in [config.no_pseudo, config.sam_pretraining, config.oracle, *config.settings]:
        if stage is not None:
            assert all(Path(c).is_file() for c in stage.config)
