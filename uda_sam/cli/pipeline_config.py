"""The pipeline file of ``uda-sam pipeline`` (YAML): its schema, its checks, and what its stages' configs say.

Pipeline file::

    output_dir: runs/toy            # everything goes here; owned by this pipeline file's content
    seeds: [0]                      # each seed is a full run; the table shows mean and spread
    toy_data: {root: data/toy}      # optional: generate the embedded toy pair first (make_toy_data arguments)
    common_args: []                 # CLI arguments added to every stage (e.g. --trainer.max_steps=100)
    generations: 2
    no_pseudo: {config: configs/toy/no_pseudo.yaml}
    sam_pretraining: {config: configs/toy/sam_pretrain.yaml, init_from_no_pseudo: false}
    settings:
      - {name: Pseudo-Only, config: configs/toy/pseudo_only.yaml}
      - {name: "Ours (8)&(10)", config: configs/toy/ours.yaml, uses_sam: true}
    oracle: {config: configs/toy/oracle.yaml}   # optional
    init_from_no_pseudo: false      # true: every later stage's network starts from this seed's No Pseudo network

A stage's ``config`` is one LightningCLI config file or a list of them, relative to the working directory or else to
the pipeline file; its ``args`` are CLI arguments added after them. ``init_from_no_pseudo`` gives every stage after
No Pseudo (the SAM's, each generation's student, the Oracle) the weights of the same seed's No Pseudo network
(``--model.init_args.network.init_args.weights``): the toy pair's stand-in for the ImageNet weights the paper
starts every stage from. A stage's own ``init_from_no_pseudo`` overrides the pipeline's for that stage (``false``:
its network starts from what its config and ``args`` say, e.g. from scratch with ``weights: null``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uda_sam.cli.config_files import load_config

__all__ = ["PipelineConfig", "PipelineConfigError", "StageConfig", "config_value", "load_pipeline_config"]


class PipelineConfigError(ValueError):
    """A pipeline file that cannot run as written."""


@dataclass
class StageConfig:
    """One training stage: LightningCLI config files and extra arguments."""

    config: list[str]
    args: list[str] = field(default_factory=list)
    name: str = ""
    uses_sam: bool = False
    generations: int | None = None
    init_from_no_pseudo: bool | None = None  # None: the pipeline's init_from_no_pseudo


@dataclass
class PipelineConfig:
    """A parsed pipeline file (see the module docstring)."""

    output_dir: str
    no_pseudo: StageConfig
    settings: list[StageConfig]
    sam_pretraining: StageConfig | None = None
    oracle: StageConfig | None = None
    generations: int = 1
    seeds: list[int] = field(default_factory=lambda: [0])
    toy_data: dict[str, Any] | None = None
    common_args: list[str] = field(default_factory=list)
    init_from_no_pseudo: bool = False
    source_file: str = ""


_TOP_KEYS = {
    "output_dir",
    "no_pseudo",
    "sam_pretraining",
    "settings",
    "oracle",
    "generations",
    "seeds",
    "toy_data",
    "common_args",
    "init_from_no_pseudo",
}
_STAGE_KEYS = {"config", "args", "name", "uses_sam", "generations", "init_from_no_pseudo"}


def _stage(raw: Any, where: str, path: Path) -> StageConfig:
    if not isinstance(raw, dict) or "config" not in raw:
        raise PipelineConfigError(
            f"{path}: `{where}` must be a mapping with a `config` entry (a YAML path or a list of them)"
        )
    unknown = set(raw) - _STAGE_KEYS
    if unknown:
        raise PipelineConfigError(
            f"{path}: `{where}` has unknown keys {sorted(unknown)}; allowed: {sorted(_STAGE_KEYS)}"
        )
    configs = raw["config"] if isinstance(raw["config"], list) else [raw["config"]]
    base = path.parent
    resolved = []
    for config in configs:
        candidate = Path(config)
        # Paths are relative to the working directory, or else to the pipeline file.
        if not candidate.is_absolute() and not candidate.exists() and (base / candidate).exists():
            candidate = base / candidate
        if not candidate.is_file():
            raise PipelineConfigError(f"{path}: `{where}.config` names {config}, which does not exist")
        resolved.append(str(candidate))
    args = raw.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise PipelineConfigError(
            f"{path}: `{where}.args` must be a list of CLI argument strings like '--trainer.max_steps=10'"
        )
    init = raw.get("init_from_no_pseudo")
    return StageConfig(
        config=resolved,
        args=list(args),
        name=str(raw.get("name", where)),
        uses_sam=bool(raw.get("uses_sam", False)),
        generations=raw.get("generations"),
        init_from_no_pseudo=None if init is None else _flag(init, f"{where}.init_from_no_pseudo", path),
    )


def load_pipeline_config(path: str | os.PathLike[str]) -> PipelineConfig:
    """Read and check a pipeline file.

    Raises:
        FileNotFoundError: If the file does not exist.
        PipelineConfigError: If keys are unknown or missing, stages disagree (class counts), or a setting that uses the
            SAM has no ``sam_pretraining`` stage.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline config {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise PipelineConfigError(f"{path}: expected a mapping at the top level")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise PipelineConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    for key in ("output_dir", "no_pseudo", "settings"):
        if key not in raw:
            raise PipelineConfigError(f"{path}: missing `{key}`")
    if not isinstance(raw["settings"], list) or not raw["settings"]:
        raise PipelineConfigError(f"{path}: `settings` must be a non-empty list of stages with a `name`")
    settings = [_stage(s, f"settings[{i}]", path) for i, s in enumerate(raw["settings"])]
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise PipelineConfigError(f"{path}: setting names must be unique, got {names}")
    config = PipelineConfig(
        output_dir=str(raw["output_dir"]),
        no_pseudo=_stage(raw["no_pseudo"], "no_pseudo", path),
        settings=settings,
        sam_pretraining=_stage(raw["sam_pretraining"], "sam_pretraining", path)
        if raw.get("sam_pretraining")
        else None,
        oracle=_stage(raw["oracle"], "oracle", path) if raw.get("oracle") else None,
        generations=int(raw.get("generations", 1)),
        seeds=[int(s) for s in raw.get("seeds", [0])],
        toy_data=raw.get("toy_data"),
        common_args=list(raw.get("common_args", [])),
        init_from_no_pseudo=_flag(raw.get("init_from_no_pseudo", False), "init_from_no_pseudo", path),
        source_file=str(path),
    )
    _check_consistency(config, path)
    return config


def _flag(value: Any, key: str, path: Path) -> bool:
    if not isinstance(value, bool):
        raise PipelineConfigError(f"{path}: `{key}` must be true or false, got {value!r}")
    return value


def config_value(stage: StageConfig, dotted: str, default: Any, extra_args: Sequence[str] = ()) -> Any:
    """The value a stage's config files and arguments give a dotted key (last one wins), without instantiating.

    Args:
        stage: The stage whose ``config`` files, then ``args``, are read.
        dotted: The key, e.g. ``"model.init_args.self_attention"``.
        default: The value when no file or argument gives one.
        extra_args: Arguments read after the stage's own (``--key=value``; a value may be YAML).
    """
    value = default
    for config in stage.config:
        node: Any = load_config(config)
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            value = node
    for arg in [*stage.args, *extra_args]:
        key, _, raw = arg.lstrip("-").partition("=")
        if not raw or not (dotted == key or dotted.startswith(key + ".")):
            continue
        node = yaml.safe_load(raw)  # e.g. --trainer.logger=false replaces the whole logger
        for part in dotted[len(key) :].strip(".").split(".") if dotted != key else []:
            node = node.get(part) if isinstance(node, dict) else None
        value = default if node is None else node
    return value


def _check_consistency(config: PipelineConfig, path: Path) -> None:
    if config.generations < 1:
        raise PipelineConfigError(f"{path}: `generations` must be >= 1, got {config.generations}")
    stages = [("no_pseudo", config.no_pseudo), *((s.name, s) for s in config.settings)]
    if config.sam_pretraining is not None:
        stages.append(("sam_pretraining", config.sam_pretraining))
    if config.oracle is not None:
        stages.append(("oracle", config.oracle))
    counts = {
        name: config_value(s, "model.init_args.network.init_args.num_classes", 19) for name, s in stages
    }
    if len(set(counts.values())) > 1:
        raise PipelineConfigError(f"{path}: the stages disagree on the number of classes: {counts}")
    for setting in config.settings:
        self_attention = config_value(setting, "model.init_args.self_attention", None)
        # "No Conv" uses a parameter-free SAM (a SelfAttentionModule given in the config): it needs no trained file.
        sam = config_value(setting, "model.init_args.self_attention.init_args.sam", None)
        setting.uses_sam = setting.uses_sam or (self_attention is not None and not isinstance(sam, dict))
        if setting.uses_sam and config.sam_pretraining is None:
            raise PipelineConfigError(
                f"{path}: setting {setting.name!r} uses the self-attention loss (model.init_args.self_attention) but "
                "the pipeline has no `sam_pretraining` stage to train the SAM"
            )
