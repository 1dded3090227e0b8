"""Benchmark: class-wise thresholds and pseudo-label maps over a synthetic target set, and their host memory.

Measures, for softmax probabilities of shape (B, 19, 512, 1024) (Cityscapes at the UDA training size):

1. pass 1, threshold estimation (``ClasswiseThresholdEstimator.update`` per batch, then ``compute``), images/s;
2. pass 2, label maps (``make_pseudo_labels`` per batch, then one uint8 PNG per image), images/s;
3. peak host memory of a whole generation (both passes) for several numbers of images, each in a fresh process
   (``ru_maxrss`` after the run minus ``ru_maxrss`` once the synthetic batches exist), to show it does not grow
   with the number of images.

The probabilities come from a small pool of pre-computed batches cycled over (the network is not part of this
measurement); :func:`run_generation` takes any batch factory, so full network inference can be plugged in.

Usage (from the repository root)::

    python benchmarks/pseudo_labels.py                      # CPU here, CUDA when available
    python benchmarks/pseudo_labels.py --image-counts 20 80 160 --batch-size 2

Writes ``benchmarks/results/pseudo_labels_<machine>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from machine import cpu_model  # benchmarks/machine.py (the script's folder is on sys.path)
from timing import synchronize  # benchmarks/timing.py

try:
    from uda_sam.pseudo_labels.thresholds import (
        ClasswiseThresholdEstimator,
        make_pseudo_labels,
        save_label_png,
    )
except ModuleNotFoundError:  # running from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from uda_sam.pseudo_labels.thresholds import (
        ClasswiseThresholdEstimator,
        make_pseudo_labels,
        save_label_png,
    )

NUM_CLASSES = 19
BatchFactory = Callable[[], Iterable[tuple[torch.Tensor, list[str]]]]


def max_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_pool(
    num_batches: int, batch_size: int, height: int, width: int, device: torch.device, seed: int = 0
) -> list[torch.Tensor]:
    """A few distinct batches of softmax probabilities (B, 19, H, W), peaked like a trained network's."""
    generator = torch.Generator(device=device).manual_seed(seed)
    pool = []
    for _ in range(num_batches):
        probs = torch.randn(batch_size, NUM_CLASSES, height, width, generator=generator, device=device).mul_(
            4.0
        )
        # softmax in place: no temporary copy raises the process's peak memory before the measurement starts
        probs.sub_(probs.amax(dim=1, keepdim=True)).exp_()
        pool.append(probs.div_(probs.sum(dim=1, keepdim=True)))
    return pool


def cycled_batches(pool: Sequence[torch.Tensor], num_images: int) -> BatchFactory:
    """A factory yielding ``num_images`` images in batches taken round-robin from ``pool``, with names."""

    def factory() -> Iterator[tuple[torch.Tensor, list[str]]]:
        done = 0
        index = 0
        while done < num_images:
            probs = pool[index % len(pool)]
            take = min(probs.shape[0], num_images - done)
            yield probs[:take], [f"city/city_{done + i:06d}_000019" for i in range(take)]
            done += take
            index += 1

    return factory


def threshold_pass(batches: BatchFactory, device: torch.device) -> tuple[torch.Tensor, int, float]:
    """Pass 1: feed every batch to a fresh estimator. Returns (thresholds, images, seconds)."""
    estimator = ClasswiseThresholdEstimator(num_classes=NUM_CLASSES)
    images = 0
    synchronize(device)
    start = time.perf_counter()
    for probs, names in batches():
        estimator.update(probs)
        images += len(names)
    thresholds = estimator.compute()  # moves the histogram to the host: also a synchronisation point
    return thresholds, images, time.perf_counter() - start


def label_pass(
    batches: BatchFactory, thresholds: torch.Tensor, device: torch.device, out_dir: Path | None
) -> tuple[int, float]:
    """Pass 2: label maps for every batch, written as PNGs when ``out_dir`` is given. Returns (images, seconds)."""
    images = 0
    synchronize(device)
    start = time.perf_counter()
    for probs, names in batches():
        labels = make_pseudo_labels(probs, thresholds).cpu()
        if out_dir is not None:
            for label, name in zip(labels, names, strict=True):
                save_label_png(label.numpy(), out_dir / f"{name}.png")
        images += len(names)
    synchronize(device)
    return images, time.perf_counter() - start


def run_generation(batches: BatchFactory, device: torch.device, out_dir: Path | None) -> dict[str, float]:
    """Both passes of one generation over ``batches``; returns timings and rates."""
    thresholds, n1, t1 = threshold_pass(batches, device)
    n2, t2 = label_pass(batches, thresholds, device, out_dir)
    return {
        "images": n1,
        "threshold_images_per_s": n1 / t1,
        "label_images_per_s": n2 / t2,
        "generation_images_per_s": n1 / (t1 + t2),
        "seconds": t1 + t2,
    }


def measure_worker(
    num_images: int,
    batch_size: int,
    height: int,
    width: int,
    device: torch.device,
    pool_batches: int,
    write_png: bool,
) -> dict[str, float]:
    """One generation in this process: its rates and its peak host memory above the synthetic batches' level."""
    pool = synthetic_pool(pool_batches, batch_size, height, width, device)
    baseline = max_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_generation(cycled_batches(pool, num_images), device, Path(tmp) if write_png else None)
    result["rss_baseline_mib"] = baseline
    result["rss_delta_mib"] = max_rss_mib() - baseline
    result["rss_peak_mib"] = max_rss_mib()
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def measure_memory_scaling(
    image_counts: Sequence[int],
    batch_size: int,
    height: int,
    width: int,
    device: str,
    pool_batches: int,
    write_png: bool,
) -> list[dict[str, float]]:
    """Run :func:`measure_worker` in a fresh interpreter per image count, so every peak is its own."""
    results = []
    for count in image_counts:
        command = [
            sys.executable, __file__, "--worker", str(count), "--batch-size", str(batch_size), "--height", str(height),
            "--width", str(width), "--device", device, "--pool-batches", str(pool_batches),
        ]  # fmt: skip
        if not write_png:
            command.append("--no-png")
        completed = subprocess.run(command, check=True, capture_output=True, text=True)
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    return results


def bdl_style_memory_gib(num_images: int, height: int, width: int) -> float:
    """Host memory of keeping every pixel's label and confidence as float64 arrays (16 bytes a pixel)."""
    return num_images * height * width * 16 / 2**30


def machine_description(device: torch.device) -> tuple[str, str]:
    """(slug for the file name, human-readable description)."""
    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        mem = f", {mem_gib:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        mem = ""
    load = f", 1-min load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    text = f"{cpu}, {cores} cores usable{mem}{load}; torch {torch.__version__}"
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-"), f"{gpu}; host {text}"
    return f"cpu-{cores}cores", text


def write_report(
    path: Path, machine: str, device: torch.device, args: argparse.Namespace, rows: list[dict]
) -> None:
    lines = [
        "# Pseudo-label generation benchmark (thresholds + label maps, no network)",
        "",
        f"- Machine: {machine}",
        f"- Device: {device.type}; probabilities (B, {NUM_CLASSES}, {args.height}, {args.width}) float32, batch {args.batch_size}, "
        f"synthetic (a pool of {args.pool_batches} batches cycled); PNG writing {'on' if args.png else 'off'}",
        f"- Command: `python benchmarks/pseudo_labels.py {' '.join(args.argv)}`".rstrip(),
        "- Pass 1: `ClasswiseThresholdEstimator.update` per batch + `compute`; pass 2: `make_pseudo_labels` + one PNG per image.",
        "- One generation per row, each in a fresh process. Host memory: `ru_maxrss` after the generation minus "
        "`ru_maxrss` once torch is imported and the synthetic batches exist (per-batch temporaries, lazily loaded "
        "libraries and allocator caching included); process peak = `ru_maxrss` at the end.",
        "",
        "| images | pass 1 (thresholds) img/s | pass 2 (labels + PNG) img/s | generation img/s | peak host memory delta (MiB) "
        "| process peak (MiB) | keeping every confidence, float64 (GiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['images']} | {row['threshold_images_per_s']:.1f} | {row['label_images_per_s']:.1f} "
            f"| {row['generation_images_per_s']:.1f} | {row['rss_delta_mib']:.1f} | {row['rss_peak_mib']:.0f} "
            f"| {bdl_style_memory_gib(row['images'], args.height, args.width):.2f} |"
        )
    if any("cuda_peak_mib" in row for row in rows):
        lines += ["", "GPU peak allocated (MiB): " + ", ".join(f"{row['cuda_peak_mib']:.0f}" for row in rows)]
    lines += [
        "",
        f"For the 2975 Cityscapes training images, keeping every confidence would take "
        f"{bdl_style_memory_gib(2975, args.height, args.width):.1f} GiB; the histogram is "
        f"{NUM_CLASSES} x 1000 int64 = {NUM_CLASSES * 1000 * 8 / 1024:.0f} KiB whatever the number of images.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 2 on CPU, 8 on CUDA")
    parser.add_argument("--image-counts", type=int, nargs="+", default=[20, 80, 160])
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--pool-batches", type=int, default=2, help="distinct synthetic batches cycled over")
    parser.add_argument("--no-png", dest="png", action="store_false", help="skip PNG writing in pass 2")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--machine", default=None, help="name used in the output file (default: derived)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.batch_size is None:
        args.batch_size = 8 if device.type == "cuda" else 2

    if args.worker is not None:
        result = measure_worker(
            args.worker, args.batch_size, args.height, args.width, device, args.pool_batches, args.png
        )
        print(json.dumps(result))
        return 0

    slug, machine = machine_description(device)
    rows = measure_memory_scaling(
        args.image_counts, args.batch_size, args.height, args.width, args.device, args.pool_batches, args.png
    )
    for row in rows:
        print(json.dumps(row))
    output = args.output_dir / f"pseudo_labels_{args.machine or slug}.md"
    write_report(output, machine, device, args, rows)
    print(output.read_text())
    print(f"Wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
