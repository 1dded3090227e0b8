"""The self-attention loss added to another method: the mean-teacher example on the toy pair, with and without it.

For each seed, the stage-0 (No Pseudo) network and the stage-1 SAM come from ``--stages`` (the folder of a
``uda-sam pipeline`` run, e.g. ``runs/toy/table1`` of ``benchmarks/toy_table1.yaml``); a missing one is trained
with the toy configs, exactly as the pipeline would. Then ``examples/mean_teacher`` is fitted from the No Pseudo
network, once per setting, and its final student is scored on the toy's held-out target test split. Eq. (8) uses
the largest weight that stayed bounded on the first toy pair (1e-4), eq. (9) the paper's 0.1; each
run's DivergenceMonitor reports how far its loss and logit norm grew (peak / early median).

Usage::

    python benchmarks/mean_teacher_sam.py                          # seeds 0 1 2, about 20 min on 2 CPU cores
    python benchmarks/mean_teacher_sam.py --seeds 0 --stages runs/toy/pipeline

Finished runs are reused (``result.json`` per run), so an interrupted comparison resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import lightning
import torch
from machine import cpu_model, slug  # benchmarks/machine.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "mean_teacher"))

import train as mean_teacher_cli  # noqa: E402  (examples/mean_teacher/train.py)

from uda_sam.callbacks import DivergenceMonitor  # noqa: E402
from uda_sam.cli.pipeline import run_stage  # noqa: E402
from uda_sam.cli.pipeline_config import StageConfig  # noqa: E402
from uda_sam.data import make_toy_data  # noqa: E402
from uda_sam.files import write_atomically  # noqa: E402

EXAMPLE = ROOT / "examples" / "mean_teacher"

#: Setting name -> extra arguments of the example's command line (the SAM file is filled in per seed).
SETTINGS: dict[str, list[str]] = {
    "Mean teacher": [],
    "+ SAM loss, eq. (8) residual, weight 1e-4": [
        "--config",
        str(EXAMPLE / "sam_loss.yaml"),
        "--trainer.callbacks.init_args.weight=1e-4",
    ],
    "+ SAM loss, eq. (9) attended, weight 0.1": [
        "--config",
        str(EXAMPLE / "sam_loss.yaml"),
        "--trainer.callbacks.init_args.target=attended",
    ],
}


def stage_artefacts(stages: Path, seed: int) -> tuple[str, str, float]:
    """``(No Pseudo checkpoint, SAM file, No Pseudo mIoU)`` of one seed, training what is missing."""
    seed_dir = stages / f"seed_{seed}"
    no_pseudo = run_stage(
        "No Pseudo",
        seed_dir / "no_pseudo",
        StageConfig(config=[str(ROOT / "configs/toy/no_pseudo.yaml")]),
        [],
        seed,
    )
    sam_stage = run_stage(
        "SAM pretraining",
        seed_dir / "sam_pretraining",
        StageConfig(config=[str(ROOT / "configs/toy/sam_pretrain.yaml")]),
        [],
        seed,
    )
    return no_pseudo.checkpoint, str(sam_stage.sam), no_pseudo.metrics["test/mIoU"]


def run_setting(name: str, run_dir: Path, seed: int, init: str, sam: str) -> dict:
    """Fit the example once (or reuse a finished run) and return its result record."""
    result_file = run_dir / "result.json"
    if result_file.is_file():
        print(f"  [skip] {name} (seed {seed}): {result_file}", flush=True)
        return json.loads(result_file.read_text())
    args = ["--config", str(EXAMPLE / "toy.yaml"), *SETTINGS[name]]
    if SETTINGS[name]:
        args.append(f"--trainer.callbacks.init_args.sam={sam}")
    args += [
        f"--seed_everything={seed}",
        f"--model.init_checkpoint={init}",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        f"--trainer.logger.init_args.name=toy/mean_teacher {name} (seed {seed})",
    ]
    start = time.monotonic()
    cli = mean_teacher_cli.main(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, DivergenceMonitor))
    import wandb

    wandb.finish()
    record = {
        "name": name,
        "seed": seed,
        "mIoU": float(metrics["test/mIoU"]),
        "peak_growth": monitor.peak_growth,
        "seconds": time.monotonic() - start,
    }
    data = json.dumps(record, indent=2).encode()
    write_atomically(result_file, lambda handle: handle.write(data))
    return record


def mean_std(values: list[float]) -> str:
    values = [100 * v for v in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stages", type=Path, default=Path("runs/toy/table1"), help="pipeline output folder")
    parser.add_argument("--data", type=Path, default=Path("data/toy"), help="the toy pair (made if missing)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/toy/mean_teacher_sam"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/mean_teacher_sam_toy_cpu.md")
    args = parser.parse_args()

    if not (args.data / "toy_manifest.json").is_file():
        make_toy_data(args.data)
    start = time.monotonic()
    rows: dict[str, list[float]] = {"No Pseudo (the starting network)": []}
    per_seed: dict[str, dict[int, float]] = {}
    peaks: dict[str, list[dict[str, float]]] = {}
    for seed in args.seeds:
        init, sam, no_pseudo = stage_artefacts(args.stages, seed)
        rows["No Pseudo (the starting network)"].append(no_pseudo)
        for name in SETTINGS:
            record = run_setting(name, args.out_dir / f"seed_{seed}" / slug(name), seed, init, sam)
            rows.setdefault(name, []).append(record["mIoU"])
            per_seed.setdefault(name, {})[seed] = record["mIoU"]
            peaks.setdefault(name, []).append(record.get("peak_growth", {}))

    lines = [
        "# The self-attention loss added to a mean teacher (examples/mean_teacher), toy pair",
        "",
        f"- Machine: {cpu_model()}, {torch.get_num_threads()} threads, no GPU; torch {torch.__version__}, "
        f"lightning {lightning.__version__}",
        f"- Command: `python benchmarks/mean_teacher_sam.py --seeds {' '.join(map(str, args.seeds))} "
        f"--stages {args.stages}`; wall time of this invocation {((time.monotonic() - start) / 60):.1f} min "
        "(finished runs are reused)",
        "- Each run: 300 steps from the seed's No Pseudo network (examples/mean_teacher/toy.yaml), final student "
        "scored on the toy target test split (19-class mIoU, %); the SAM loss on the target logits; peak growth = "
        "largest value / median of the first 5 steps, worst seed (the DivergenceMonitor stops a run past 100x)",
        "",
        f"| setting | mIoU, mean ± std over seeds {args.seeds} | per seed | peak loss growth | peak logit-norm growth |",
        "|---|---|---|---|---|",
    ]
    for name, values in rows.items():
        seeds = per_seed.get(name)
        detail = ", ".join(f"{100 * v:.1f}" for v in (seeds.values() if seeds else values))
        loss = [p["loss"] for p in peaks.get(name, []) if "loss" in p]
        norm = [p["logit_norm"] for p in peaks.get(name, []) if "logit_norm" in p]
        growth = " | ".join(f"{max(v):.2f}x" if v else "" for v in (loss, norm))
        lines.append(f"| {name} | {mean_std(values)} | {detail} | {growth} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
