"""``uda-sam pipeline``: the paper's whole protocol from one YAML file.

Stages, in order, each an ordinary ``fit`` of a shipped config (docs/METHOD.md):

1. ``no_pseudo`` (stage 0): source only; its network makes generation 1's pseudo labels.
2. ``sam_pretraining`` (stage 1): a network and the SAM trained jointly on the source; the SAM file is kept.
3. for every named setting (e.g. Pseudo-Only, Ours), ``generations`` generations of self-training (stage 2):
   generation ``k`` trains a new network on pseudo labels made by generation ``k - 1`` (generation 1: No Pseudo).
4. optionally an ``oracle``: the same network trained with the target's own labels (an upper bound).

Every stage lives in ``{output_dir}/seed_{seed}/{stage}/`` with ``checkpoints/``, its pseudo labels and a
``result.json`` written last: a stage whose ``result.json`` exists is skipped, one with a ``last.ckpt`` resumes,
so a killed pipeline picks up where it stopped. The pipeline ends by printing and writing ``results.md`` (target
mIoU per setting and generation, shaped like the paper's Tables 1 and 2) and ``results.json``.

Pipeline file (YAML)::

    output_dir: runs/toy            # everything goes here; owned by this pipeline file's content
    seeds: [0]                      # each seed is a full run; the table shows mean and spread
    toy_data: {root: data/toy}      # optional: generate the embedded toy pair first (make_toy_data arguments)
    common_args: []                 # CLI arguments added to every stage (e.g. --trainer.max_steps=100)
    generations: 2
    no_pseudo: {config: configs/toy/no_pseudo.yaml}
    sam_pretraining: {config: configs/toy/sam_pretrain.yaml}
    settings:
      - {name: Pseudo-Only, config: configs/toy/pseudo_only.yaml}
      - {name: "Ours (8)&(10)", config: configs/toy/ours.yaml, uses_sam: true}
    oracle: {config: configs/toy/oracle.yaml}   # optional
    init_from_no_pseudo: false      # true: every later stage's network starts from this seed's No Pseudo network

``init_from_no_pseudo`` gives every stage after No Pseudo (the SAM's, each generation's student, the Oracle) the
weights of the same seed's No Pseudo network (``--model.init_args.network.init_args.weights``): the toy pair's
stand-in for the ImageNet weights the paper starts every stage from.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback

from uda_sam.cli.run_lock import run_lock
from uda_sam.files import write_atomically

__all__ = ["PipelineConfig", "StageConfig", "load_pipeline_config", "run_pipeline", "main"]

RESULT_FILE = "result.json"
OWNER_FILE = "pipeline.json"


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
_STAGE_KEYS = {"config", "args", "name", "uses_sam", "generations"}


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
    return StageConfig(
        config=resolved,
        args=list(args),
        name=str(raw.get("name", where)),
        uses_sam=bool(raw.get("uses_sam", False)),
        generations=raw.get("generations"),
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


def _config_value(stage: StageConfig, dotted: str, default: Any, extra_args: Sequence[str] = ()) -> Any:
    """The value a stage's config files and arguments give a dotted key (last one wins), without instantiating."""
    value = default
    for config in stage.config:
        node: Any = yaml.safe_load(Path(config).read_text()) or {}
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
        name: _config_value(s, "model.init_args.network.init_args.num_classes", 19) for name, s in stages
    }
    if len(set(counts.values())) > 1:
        raise PipelineConfigError(f"{path}: the stages disagree on the number of classes: {counts}")
    for setting in config.settings:
        self_attention = _config_value(setting, "model.init_args.self_attention", None)
        # "No Conv" uses a parameter-free SAM (a SelfAttentionModule given in the config): it needs no trained file.
        sam = _config_value(setting, "model.init_args.self_attention.init_args.sam", None)
        setting.uses_sam = setting.uses_sam or (self_attention is not None and not isinstance(sam, dict))
        if setting.uses_sam and config.sam_pretraining is None:
            raise PipelineConfigError(
                f"{path}: setting {setting.name!r} uses the self-attention loss (model.init_args.self_attention) but "
                "the pipeline has no `sam_pretraining` stage to train the SAM"
            )


def _owner_record(config: PipelineConfig) -> dict[str, Any]:
    """What makes an output folder this pipeline's: the stage configs' contents and arguments."""
    record = asdict(config)
    record.pop("source_file")
    contents = {}
    for stage in [config.no_pseudo, config.sam_pretraining, config.oracle, *config.settings]:
        for file in stage.config if stage else []:
            contents[file] = hashlib.sha256(Path(file).read_bytes()).hexdigest()
    record["config_sha256"] = contents
    return record


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _record_differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Each entry that differs between two owner records, as ``where: old -> new`` (a config file: its content)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{where}.{key}" if where else str(key)
            if where == "config_sha256":
                if old.get(key) != new.get(key):
                    state = "is new" if key not in old else "is gone" if key not in new else "content changed"
                    out.append(f"config file {key} {state}")
                continue
            out += _record_differences(old.get(key), new.get(key), path)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            d
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for d in _record_differences(a, b, f"{where}[{i}]")
        ]
    return [] if old == new else [f"{where}: {_short(old)} -> {_short(new)}"]


def _claim_output_dir(config: PipelineConfig) -> Path:
    out = Path(config.output_dir)
    owner_file = out / OWNER_FILE
    record = _owner_record(config)
    if owner_file.is_file():
        previous = json.loads(owner_file.read_text())
        if previous.get("record") != record:
            changes = _record_differences(previous.get("record", {}), record)
            listed = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
            raise PipelineConfigError(
                f"{out} holds the results of another pipeline configuration (made from {previous.get('source_file')}; "
                f"what changed: {listed}); use another output_dir for {config.source_file}, or delete {out} to "
                "start over"
            )
    elif out.exists() and any(out.iterdir()):
        raise PipelineConfigError(
            f"{out} exists, is not empty and was not made by `uda-sam pipeline`; choose another output_dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(owner_file, {"source_file": config.source_file, "record": record})
    return out


# --------------------------------------------------------------------------------------------------- stage runs
@dataclass
class StageResult:
    """What a finished stage leaves behind."""

    name: str
    metrics: dict[str, float]
    checkpoint: str
    sam: str | None = None
    pseudo_labels: str | None = None
    seconds: float = 0.0


def _atomic_write_json(path: Path, payload: Any) -> None:
    data = json.dumps(payload, indent=2).encode()
    write_atomically(path, lambda handle: handle.write(data))


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        value = float(value)
        out[key] = value if math.isfinite(value) else float("nan")
    return out


def run_stage(
    name: str,
    stage_dir: Path,
    stage: StageConfig,
    extra_args: Sequence[str],
    seed: int,
    teacher: str | None = None,
    generation: int = 1,
    label_dir: Path | None = None,
) -> StageResult:
    """Fit one stage in this process (or reuse its finished result) and score its final network.

    The network scored is the last step's, the one written to ``last.ckpt`` and handed on as the next generation's
    teacher. Its validation scores are those of the fit's last validation when that ran at the last step (else it
    is validated once more); with a datamodule whose ``test_split`` is not ``val`` it is also scored there
    (``test/*`` metrics). A SAM pretraining stage adds the SAM's attention quality (``sam/<domain>/<figure>``), and
    a :class:`~uda_sam.callbacks.DivergenceMonitor` its peak growths (``train/peak_<value>_growth``).

    Args:
        name: Stage name for messages and the W&B run name.
        stage_dir: The stage's folder.
        stage: Its config files and arguments.
        extra_args: Arguments added after the stage's own (the pipeline's wiring: SAM file, seed, ...).
        seed: Global seed.
        teacher: Checkpoint whose network makes this stage's pseudo labels (self-training stages).
        generation: The generation this stage trains (self-training stages).
        label_dir: Folder for this stage's pseudo labels (default: ``{stage_dir}/pseudo_labels``); stages with the
            same teacher can share one, the labels are then made once and reused.
    """
    result_file = stage_dir / RESULT_FILE
    if result_file.is_file():
        print(f"  [skip] {name}: finished earlier ({result_file})", flush=True)
        return StageResult(**json.loads(result_file.read_text()))

    from uda_sam.callbacks import DivergenceMonitor
    from uda_sam.callbacks.pseudo_labels import PseudoLabelRegeneration
    from uda_sam.cli.lightning import UDASamCLI

    start = time.monotonic()
    stage_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = stage_dir / "checkpoints"
    args = [a for c in stage.config for a in ("--config", c)]
    args += [*stage.args, *extra_args, f"--seed_everything={seed}", f"--trainer.default_root_dir={stage_dir}"]
    # Everything a stage writes goes to its own folder, whatever paths its config names.
    if str(_config_value(stage, "trainer.logger.class_path", "", extra_args)).endswith("WandbLogger"):
        args += [
            f"--trainer.logger.init_args.save_dir={stage_dir}",
            f"--trainer.logger.init_args.name={name} (seed {seed})",
        ]
    if str(_config_value(stage, "model.class_path", "")).endswith("SAMPretraining"):
        args.append(f"--model.init_args.sam_export_path={stage_dir / 'sam.pt'}")
    argv, sys.argv = sys.argv, sys.argv[:1]  # the stage's arguments are `args`, not this command's
    try:
        cli = UDASamCLI(args=args, run=False)
    finally:
        sys.argv = argv
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule

    _route_checkpoints(trainer, checkpoint_dir)
    for callback in trainer.callbacks:
        if isinstance(callback, PseudoLabelRegeneration):
            if teacher is None:
                raise PipelineConfigError(
                    f"stage {name!r} makes pseudo labels but the pipeline has no teacher for it"
                )
            callback.teacher_checkpoint = teacher
            callback.output_dir = label_dir or stage_dir / "pseudo_labels"
            callback.first_generation = generation
            callback.num_generations = 1

    last = checkpoint_dir / "last.ckpt"
    last_validation = _LastValidation()
    trainer.callbacks.append(last_validation)
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
    if not last.is_file():
        raise RuntimeError(f"stage {name!r} finished without writing {last}")
    # The network in memory is the last step's, the one last.ckpt holds (the next generation's teacher).
    if last_validation.step == trainer.global_step:
        metrics = dict(last_validation.metrics)
    else:
        metrics = trainer.validate(model, datamodule=datamodule, ckpt_path=str(last), verbose=False)[0]
    if getattr(datamodule, "test_split", "val") != "val":
        metrics.update(trainer.test(model, datamodule=datamodule, ckpt_path=str(last), verbose=False)[0])
    for domain, figures in getattr(model, "attention_quality", {}).items():
        metrics.update({f"sam/{domain}/{key}": value for key, value in figures.items()})
    for callback in trainer.callbacks:
        if isinstance(callback, DivergenceMonitor):
            metrics.update({f"train/peak_{k}_growth": v for k, v in callback.peak_growth.items()})

    sam_file = model.resolve_export_path() if hasattr(model, "resolve_export_path") else None
    label_dir = next(
        (c.label_dir for c in trainer.callbacks if isinstance(c, PseudoLabelRegeneration) and c.label_dir),
        None,
    )
    result = StageResult(
        name=name,
        metrics=_finite(metrics),
        checkpoint=str(last),
        sam=str(sam_file) if sam_file else None,
        pseudo_labels=str(label_dir) if label_dir else None,
        seconds=time.monotonic() - start,
    )
    _finish_loggers(trainer)
    _atomic_write_json(result_file, asdict(result))
    del cli, trainer, model, datamodule
    gc.collect()
    return result


class _LastValidation(Callback):
    """Keeps the scores and the step of a fit's last validation."""

    def __init__(self) -> None:
        self.step = -1
        self.metrics: dict[str, float] = {}

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step
            self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def _route_checkpoints(trainer: Any, checkpoint_dir: Path) -> None:
    """Write every checkpoint of a stage into ``checkpoint_dir``, with ``last.ckpt`` at the stage's last step.

    ``last.ckpt`` is written by a :class:`~uda_sam.callbacks.LastStepCheckpoint` (added when the config has none);
    other checkpoints keep their own names and no longer write a ``last.ckpt`` of their own, which would lag
    behind (Lightning's ``save_last`` with ``monitor`` writes it only when the monitored score improves).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from uda_sam.callbacks import LastStepCheckpoint

    checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    if not any(isinstance(c, LastStepCheckpoint) for c in checkpoints):
        interval = trainer.val_check_interval
        every = interval if isinstance(interval, int) else None
        added = LastStepCheckpoint(every_n_train_steps=every)
        trainer.callbacks.append(added)  # after every other callback, as Lightning orders checkpoints
        checkpoints.append(added)
    for callback in checkpoints:
        callback.dirpath = str(checkpoint_dir)
        if not isinstance(callback, LastStepCheckpoint):
            callback.save_last = False


def _finish_loggers(trainer: Any) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish()


# --------------------------------------------------------------------------------------------------- the run
def _stage_plan(config: PipelineConfig) -> list[tuple[str, int | None]]:
    plan: list[tuple[str, int | None]] = [("No Pseudo", None)]
    if config.sam_pretraining is not None:
        plan.append(("SAM pretraining", None))
    for setting in config.settings:
        plan += [(setting.name, g) for g in range(1, (setting.generations or config.generations) + 1)]
    if config.oracle is not None:
        plan.append(("Oracle", None))
    return plan


def _slug(name: str) -> str:
    keep = "".join(ch.lower() if ch.isalnum() else "_" for ch in name)
    return "_".join(part for part in keep.split("_") if part)


def run_seed(config: PipelineConfig, seed: int, out: Path) -> dict[str, Any]:
    """Run every stage for one seed; returns ``{row: {generation: StageResult}}``."""
    seed_dir = out / f"seed_{seed}"
    plan = _stage_plan(config)
    step = iter(range(1, len(plan) + 1))
    results: dict[str, dict[int, StageResult]] = {}

    def banner(title: str) -> None:
        print(f"\n=== [seed {seed}] stage {next(step)}/{len(plan)}: {title} ===", flush=True)

    banner("No Pseudo (source only)")
    no_pseudo = run_stage("No Pseudo", seed_dir / "no_pseudo", config.no_pseudo, config.common_args, seed)
    results["No Pseudo"] = {0: no_pseudo}
    common = list(config.common_args)
    if config.init_from_no_pseudo:
        common.append(f"--model.init_args.network.init_args.weights={no_pseudo.checkpoint}")

    sam_file = None
    if config.sam_pretraining is not None:
        banner("SAM pretraining (source only)")
        sam_stage = run_stage(
            "SAM pretraining", seed_dir / "sam_pretraining", config.sam_pretraining, common, seed
        )
        sam_file = sam_stage.sam or sam_stage.checkpoint
        results["SAM pretraining"] = {0: sam_stage}

    for setting in config.settings:
        teacher = no_pseudo.checkpoint
        results[setting.name] = {}
        for generation in range(1, (setting.generations or config.generations) + 1):
            banner(f"{setting.name}, generation {generation}")
            wiring = list(common)
            if setting.uses_sam:
                wiring.append(f"--model.init_args.self_attention.init_args.sam={sam_file}")
            stage_dir = seed_dir / _slug(setting.name) / f"generation_{generation}"
            result = run_stage(
                f"{setting.name} gen {generation}",
                stage_dir,
                setting,
                wiring,
                seed,
                teacher=teacher,
                generation=generation,
                # Every setting's generation 1 learns from the No Pseudo network's labels: made once, kept with it.
                label_dir=seed_dir / "no_pseudo" / "pseudo_labels" if generation == 1 else None,
            )
            results[setting.name][generation] = result
            teacher = result.checkpoint

    if config.oracle is not None:
        banner("Oracle (target labels)")
        results["Oracle"] = {0: run_stage("Oracle", seed_dir / "oracle", config.oracle, common, seed)}
    return results


def _mean_spread(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    mean = statistics.fmean(values) * 100
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * 100:.1f}"


def _split_of(per_seed: dict[int, dict[str, dict[int, StageResult]]]) -> str:
    """``"test"`` when the stages were scored on a test split, else ``"val"``."""
    results = (r for rows in per_seed.values() for gens in rows.values() for r in gens.values())
    return "test" if any("test/mIoU" in r.metrics for r in results) else "val"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def format_results(per_seed: dict[int, dict[str, dict[int, StageResult]]], split: str | None = None) -> str:
    """Markdown tables: mIoU per setting and generation (Tables 1-2 shape) on ``split`` (default: the test split
    when the stages were scored on one), per-class IoU of the last generation, the SAM's attention quality, and how
    far each stage's loss and logit norm grew over their first values."""
    from uda_sam.data.labels import CLASS_NAMES

    split = split or _split_of(per_seed)
    metric = f"{split}/mIoU"
    seeds = sorted(per_seed)
    rows = list(next(iter(per_seed.values())).keys())
    max_gen = max((g for row in per_seed[seeds[0]].values() for g in row), default=0)
    generations = [0, *range(1, max_gen + 1)]

    def values(row: str, generation: int, key: str) -> list[float]:
        return [
            per_seed[s][row][generation].metrics.get(key, float("nan"))
            for s in seeds
            if generation in per_seed[s].get(row, {})
        ]

    where = "the test split (scenes no setting was chosen on)" if split == "test" else "the validation split"
    lines = [
        f"Target mIoU (%) on {where}, {len(seeds)} seed(s) {seeds}"
        + (" (mean ± standard deviation)" if len(seeds) > 1 else ""),
        "",
    ]
    header = ["setting"] + (
        ["mIoU"] if max_gen == 0 else ["mIoU (single stage)"] + [f"gen {g}" for g in generations[1:]]
    )
    body = []
    for row in rows:
        label = "SAM pretraining (network + SAM)" if row == "SAM pretraining" else row
        cells = [label]
        for generation in generations:
            found = values(row, generation, metric)
            cells.append(_mean_spread(found) if found else "")
        body.append(cells)
    lines += _table(header, body)

    lines += ["", "Per-class IoU (%) of each setting's last generation, seed mean", ""]
    body = []
    for row in rows:
        last = max(per_seed[seeds[0]][row])
        cells = [row]
        for name in [*CLASS_NAMES, None]:
            finite = [
                v
                for v in values(row, last, metric if name is None else f"{split}/iou/{name}")
                if not math.isnan(v)
            ]
            cells.append(f"{statistics.fmean(finite) * 100:.1f}" if finite else "n/a")
        body.append(cells)
    lines += _table(["setting", *CLASS_NAMES, "mIoU"], body)

    if "SAM pretraining" in rows:
        lines += [
            "",
            "The SAM's attention at the end of its pretraining, on labelled images nothing trained on (seed mean): "
            "the share of a row's attention on its own class against chance, and the row entropy against uniform",
            "",
        ]
        body = []
        for domain, what in (("source", "held-out source"), ("target", "target val")):
            figures = {
                key: values("SAM pretraining", 0, f"sam/{domain}/{key}")
                for key in (
                    "images",
                    "same_class_share",
                    "chance_share",
                    "lift",
                    "entropy",
                    "uniform_entropy",
                )
            }
            if not [v for v in figures["lift"] if not math.isnan(v)]:
                continue
            mean = {key: statistics.fmean(v) for key, v in figures.items()}
            body.append(
                [
                    what,
                    f"{mean['images']:.0f}",
                    f"{mean['same_class_share']:.3f}",
                    f"{mean['chance_share']:.3f}",
                    f"{mean['lift']:.2f}",
                    f"{mean['entropy']:.3f}",
                    f"{mean['uniform_entropy']:.3f}",
                ]
            )
        lines += _table(
            ["images", "count", "same-class share", "chance", "lift", "row entropy", "uniform entropy"], body
        )

    peaks = [(row, g) for row in rows for g in generations if values(row, g, "train/peak_loss_growth")]
    if peaks:
        lines += [
            "",
            "Largest loss and logit norm over training, as multiples of their first steps' values (highest seed; "
            "DivergenceMonitor stops a run at 100x)",
            "",
        ]
        body = []
        for row, generation in peaks:
            loss = max(values(row, generation, "train/peak_loss_growth"))
            norm = [v for v in values(row, generation, "train/peak_logit_norm_growth") if not math.isnan(v)]
            label = row if generation == 0 else f"{row} gen {generation}"
            body.append([label, f"{loss:.2f}", f"{max(norm):.1f}" if norm else "n/a"])
        lines += _table(["stage", "loss", "logit norm"], body)
    return "\n".join(lines) + "\n"


def run_pipeline(config: PipelineConfig) -> Path:
    """Run (or resume) a whole pipeline; returns the path of ``results.md``."""
    out = _claim_output_dir(config)
    if config.toy_data is not None:
        from uda_sam.data.toy import make_toy_data

        print(f"Toy domain pair: {config.toy_data.get('root')}", flush=True)
        make_toy_data(**config.toy_data)

    start = time.monotonic()
    per_seed = {seed: run_seed(config, seed, out) for seed in config.seeds}
    table = format_results(per_seed)
    results_md = out / "results.md"
    write_atomically(results_md, lambda handle: handle.write(table.encode()))
    _atomic_write_json(
        out / "results.json",
        {
            str(s): {row: {str(g): asdict(r) for g, r in gens.items()} for row, gens in rows.items()}
            for s, rows in per_seed.items()
        },
    )

    print("\n" + table)
    print("Checkpoints:")
    for seed, rows in per_seed.items():
        for row, gens in rows.items():
            for generation, result in gens.items():
                label = row if generation == 0 else f"{row} gen {generation}"
                print(f"  seed {seed} | {label}: {result.checkpoint}")
    for seed in per_seed:
        sam_result = Path(out / f"seed_{seed}" / "sam_pretraining" / RESULT_FILE)
        if sam_result.is_file():
            print(f"  seed {seed} | SAM weights: {json.loads(sam_result.read_text())['sam']}")
    print(
        f"\nPseudo labels:      {out}/seed_*/no_pseudo/pseudo_labels/generation_1/ (generation 1, shared), "
        f"{out}/seed_*/<setting>/generation_<k>/pseudo_labels/generation_<k>/"
    )
    print(f"W&B offline runs:   {out}/seed_*/<stage>/wandb/  (upload with `wandb sync <run folder>`)")
    print(f"Results table:      {results_md}")
    print(f"Total time:         {(time.monotonic() - start) / 60:.1f} min")
    return results_md


def main(argv: Sequence[str] | None = None) -> int:
    """``uda-sam pipeline --config PIPELINE.yaml``."""
    parser = argparse.ArgumentParser(
        prog="uda-sam pipeline",
        description="Run No Pseudo, SAM pretraining and generations of self-training for each setting; print the results table.",
    )
    parser.add_argument("--config", required=True, help="pipeline YAML file (e.g. configs/toy/pipeline.yaml)")
    parser.add_argument("--output-dir", help="override the file's output_dir")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the file's seeds")
    parser.add_argument(
        "--args", nargs=argparse.REMAINDER, default=[], help="CLI arguments added to every stage"
    )
    options = parser.parse_args(argv)
    try:
        config = load_pipeline_config(options.config)
    except (PipelineConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if options.output_dir:
        config.output_dir = options.output_dir
    if options.seeds:
        config.seeds = options.seeds
    config.common_args += options.args
    try:
        with run_lock([config.output_dir], "uda-sam pipeline"):  # a second pipeline on the folder stops here
            run_pipeline(config)
    except PipelineConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
