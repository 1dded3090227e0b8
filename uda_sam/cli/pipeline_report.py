"""The results of ``uda-sam pipeline``: what each stage leaves behind and the tables of ``results.md``.

Each finished stage writes its :class:`StageResult` to its ``result.json``; :func:`format_results` turns the
results of every seed into Markdown tables: target mIoU per setting and generation (shaped like the paper's Tables 1
and 2), per-class IoU, the SAM's attention quality and each stage's peak loss and logit-norm growth.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from uda_sam.data.labels import CLASS_NAMES

__all__ = ["StageResult", "format_results"]


@dataclass
class StageResult:
    """What a finished stage leaves behind."""

    name: str
    metrics: dict[str, float]
    checkpoint: str
    sam: str | None = None
    pseudo_labels: str | None = None
    seconds: float = 0.0


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
