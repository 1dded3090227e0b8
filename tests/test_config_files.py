"""Config files that extend others through `_base_`: the merge rules, the errors, and every command that reads them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from uda_sam.cli.config_files import (
    ConfigFileError,
    config_sources,
    expand_config_args,
    load_config,
    merge_configs,
    null_arguments_as_configs,
)
from uda_sam.cli.entry_point import main
from uda_sam.cli.pipeline_config import StageConfig, config_value

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_mappings_merge_and_lists_and_scalars_replace() -> None:
    base = {
        "trainer": {
            "max_steps": 10,
            "callbacks": [{"a": 1}, {"b": 2}],
            "logger": {"name": "x", "offline": True},
        }
    }
    row = {"trainer": {"callbacks": [{"c": 3}], "logger": {"name": "y"}}, "model": None}
    merged = merge_configs(base, row)
    assert merged == {
        "trainer": {"max_steps": 10, "callbacks": [{"c": 3}], "logger": {"name": "y", "offline": True}},
        "model": None,
    }
    assert base["trainer"]["logger"]["name"] == "x"  # the inputs are left as they were


def test_a_value_replaces_a_mapping_and_a_mapping_replaces_a_value() -> None:
    assert merge_configs({"a": {"b": 1}}, {"a": None}) == {"a": None}
    assert merge_configs({"a": None}, {"a": {"b": 1}}) == {"a": {"b": 1}}


def test_bases_nest_and_resolve_relative_to_the_file(tmp_path: Path) -> None:
    write(tmp_path / "shared" / "trainer.yaml", "trainer: {max_steps: 10, devices: 1}\nseed_everything: 0\n")
    write(
        tmp_path / "domain" / "stage.yaml",
        "_base_: ../shared/trainer.yaml\ntrainer: {devices: 2}\nmodel: {lr: 1.0e-3}\n",
    )
    write(tmp_path / "domain" / "extra.yaml", "model: {momentum: 0.9}\nseed_everything: 3\n")
    row = write(tmp_path / "domain" / "row.yaml", "_base_: [stage.yaml, extra.yaml]\nmodel: {lr: 1e-4}\n")
    assert load_config(row) == {
        "trainer": {"max_steps": 10, "devices": 2},
        "seed_everything": 3,  # the later base wins
        "model": {"lr": 1e-4, "momentum": 0.9},  # 1e-4 is a number, as the CLI's parser reads it
    }
    assert config_sources(row) == [
        row,
        tmp_path / "domain" / "stage.yaml",
        tmp_path / "domain" / "extra.yaml",
        tmp_path / "domain" / "../shared/trainer.yaml",
    ]


def test_a_missing_base_names_the_file_that_names_it(tmp_path: Path) -> None:
    row = write(tmp_path / "row.yaml", "_base_: nowhere.yaml\n")
    with pytest.raises(ConfigFileError, match=r"nowhere\.yaml \(the _base_ of .*row\.yaml\) does not exist"):
        load_config(row)


def test_a_cycle_is_an_error_naming_the_files(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(
        ConfigFileError, match=r"a\.yaml extends itself through _base_: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"
    ):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("_base_: {a: 1}\n", "`_base_` must be a file name or a list"),
        ("- 1\n", "expected a mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_a_malformed_file_is_an_error_naming_it(tmp_path: Path, text: str, message: str) -> None:
    row = write(tmp_path / "row.yaml", text)
    with pytest.raises(ConfigFileError, match=message) as error:
        load_config(row)
    assert str(row) in str(error.value)


def test_only_config_files_with_bases_are_expanded(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.yaml", "trainer: {max_steps: 3}\n")
    row = write(tmp_path / "row.yaml", "_base_: plain.yaml\ntrainer: {devices: 2}\n")
    args = ["fit", "--config", str(plain), "-c", str(row), f"--config={row}", "--trainer.max_steps", str(row)]
    expanded = expand_config_args(args)
    assert expanded[:3] == ["fit", "--config", str(plain)]
    assert yaml.safe_load(expanded[4]) == {"trainer": {"max_steps": 3, "devices": 2}}
    assert yaml.safe_load(expanded[5].partition("=")[2]) == {"trainer": {"max_steps": 3, "devices": 2}}
    assert expanded[6:] == ["--trainer.max_steps", str(row)]  # not a --config value


def test_print_config_of_a_row_with_a_base(tmp_path: Path) -> None:
    """`uda-sam fit --config ROW --print_config` from the command line prints the row over its bases."""
    result = subprocess.run(
        [sys.executable, "-m", "uda_sam", "fit", "--config", "configs/gta5/ours_kl.yaml", "--print_config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    loss = printed["model"]["init_args"]["self_attention"]["init_args"]
    assert (loss["distance"], loss["target"], loss["domains"]) == ("kl", "residual", "both")  # row, then base
    assert printed["trainer"]["default_root_dir"] == "runs/gta5/ours_kl"
    assert printed["trainer"]["max_steps"] == 120000  # from no_pseudo.yaml, two bases down
    assert "LightningCLI's args parameter" not in result.stderr


def test_nested_options_set_to_null_become_one_key_configs() -> None:
    args = [
        "fit",
        "--model.init_args.network.init_args.weights=null",
        "--model.init_args.network.init_args.weights",
        "null",
        "--trainer.max_epochs=null",  # not nested in a class's arguments: the parser reads it as None already
        "--model.init_args.network.init_args.weights=nullable.ckpt",
    ]
    converted = null_arguments_as_configs(args)
    expected = {"model": {"init_args": {"network": {"init_args": {"weights": None}}}}}
    assert converted[0] == "fit"
    assert yaml.safe_load(converted[1].removeprefix("--config=")) == expected
    assert yaml.safe_load(converted[2].removeprefix("--config=")) == expected
    assert converted[3:] == args[4:]


@pytest.mark.parametrize(
    ("override", "expected"), [([], None), (["--model.init_args.network.init_args.weights=a.ckpt"], "a.ckpt")]
)
def test_a_nested_option_set_to_null_on_the_command_line_is_none(
    capsys: pytest.CaptureFixture[str], override: list[str], expected: str | None
) -> None:
    """Without the rewrite, jsonargparse reads it as the string "None" (then a missing weights file "None")."""
    config = REPO / "configs" / "toy" / "pseudo_only.yaml"  # its weights: the No Pseudo run's checkpoint
    args = ["fit", "--config", str(config)]
    args += ["--model.init_args.network.init_args.weights=null", *override, "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    assert exit_info.value.code in (0, None), captured.err[-2000:]
    printed = yaml.safe_load(captured.out)
    assert printed["model"]["init_args"]["network"]["init_args"]["weights"] == expected


def test_the_pipeline_reads_a_rows_bases() -> None:
    stage = StageConfig(config=[str(REPO / "configs" / "toy" / "ours.yaml")])
    # ours.yaml over pseudo_only.yaml over no_pseudo.yaml
    assert config_value(stage, "model.init_args.self_attention.init_args.target", None) == "attended"
    assert (
        config_value(stage, "model.init_args.network.init_args.weights", None)
        == "runs/toy/no_pseudo/checkpoints/last.ckpt"
    )
    assert config_value(stage, "trainer.logger.class_path", None) == "lightning.pytorch.loggers.WandbLogger"


def test_a_bad_base_ends_fit_with_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from uda_sam.cli.entry_point import main

    row = write(tmp_path / "row.yaml", "_base_: gone.yaml\n")
    assert main(["fit", "--config", str(row)]) == 2
    err = capsys.readouterr().err
    assert "gone.yaml (the _base_ of" in err and "Traceback" not in err
