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

This module runs the stages; the pipeline file and its checks are :mod:`uda_sam.cli.pipeline_config`, the results
and their tables :mod:`uda_sam.cli.pipeline_report`.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from uda_sam.cli.config_files import config_sources
from uda_sam.cli.pipeline_config import (
    PipelineConfig,
    PipelineConfigError,
    StageConfig,
    config_value,
    load_pipeline_config,
)
from uda_sam.cli.pipeline_report import StageResult, format_results
from uda_sam.cli.run_lock import run_lock
from uda_sam.files import write_atomically

__all__ = ["main", "run_pipeline", "run_seed", "run_stage"]

RESULT_FILE = "result.json"
OWNER_FILE = "pipeline.json"


# --------------------------------------------------------------------------------------------------- the output folder
def _owner_record(config: PipelineConfig) -> dict[str, Any]:
    """What makes an output folder this pipeline's: the stage configs' contents (with their ``_base_`` files) and
    arguments."""
    record = asdict(config)
    record.pop("source_file")
    contents = {}
    for stage in [config.no_pseudo, config.sam_pretraining, config.oracle, *config.settings]:
        for file in stage.config if stage else []:
            for source in config_sources(file):
                contents[str(source)] = hashlib.sha256(source.read_bytes()).hexdigest()
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
    if str(config_value(stage, "trainer.logger.class_path", "", extra_args)).endswith("WandbLogger"):
        args += [
            f"--trainer.logger.init_args.save_dir={stage_dir}",
            f"--trainer.logger.init_args.name={name} (seed {seed})",
        ]
    if str(config_value(stage, "model.class_path", "")).endswith("SAMPretraining"):
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

    def wiring_of(stage: StageConfig) -> list[str]:
        """The pipeline's arguments for a stage after No Pseudo: the common ones and its initial weights."""
        init = config.init_from_no_pseudo if stage.init_from_no_pseudo is None else stage.init_from_no_pseudo
        weights = [f"--model.init_args.network.init_args.weights={no_pseudo.checkpoint}"] if init else []
        return [*config.common_args, *weights]

    sam_file = None
    if config.sam_pretraining is not None:
        banner("SAM pretraining (source only)")
        sam_stage = run_stage(
            "SAM pretraining",
            seed_dir / "sam_pretraining",
            config.sam_pretraining,
            wiring_of(config.sam_pretraining),
            seed,
        )
        sam_file = sam_stage.sam or sam_stage.checkpoint
        results["SAM pretraining"] = {0: sam_stage}

    for setting in config.settings:
        teacher = no_pseudo.checkpoint
        results[setting.name] = {}
        for generation in range(1, (setting.generations or config.generations) + 1):
            banner(f"{setting.name}, generation {generation}")
            wiring = wiring_of(setting)
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
        oracle = run_stage("Oracle", seed_dir / "oracle", config.oracle, wiring_of(config.oracle), seed)
        results["Oracle"] = {0: oracle}
    return results


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
