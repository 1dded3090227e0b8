"""Benchmark: one whole pseudo-label generation with a network, against plain inference on the same images.

``generate_pseudo_labels`` (inference, histogram, cached maps, thresholds, PNGs, statistics) is timed over a target
set in the Cityscapes layout (up to 16 distinct images drawn with the toy generator, copied under further names up to
the wanted count), next to a plain loop that only runs the network, upsamples and takes the argmax. One batch runs
first, untimed, so that neither loop pays for start-up. Reports images/s of both, their ratio (target on a GPU:
>= 0.9), and the peak host memory of a generation for each set size, each in a fresh process (``ru_maxrss``
growth), to show it does not grow with the number of images.

``--time-box SECONDS`` bounds the whole run: a set size starts only when the previous one, scaled to its image
count, says it fits in what is left; a worker still running when the box ends is stopped. The results files are
rewritten after every set size, so a run cut short still leaves them.

Usage (from the repository root)::

    python benchmarks/generation.py                          # CPU: DeepLabV2-ResNet18 at 256x128
    python benchmarks/generation.py --backbone resnet101 --size 1024 512 --batch-size 8 --precision bf16   # GPU

Writes ``benchmarks/results/generation_<device>.md`` and ``.json`` (``--out-dir``, ``--stem``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import host_info  # benchmarks/machine.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
#: Distinct toy images drawn per set; further images are copies (drawing one at 1024x512 takes about 0.2 s).
DISTINCT_IMAGES = 16


def _status_mib(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (``None`` where ``/proc`` does not tell)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def start_peak() -> float | None:
    """Reset this process's resident high-water mark (``/proc/self/clear_refs``); the resident size now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_mib("VmRSS")


def peak_growth(before: float | None) -> float | None:
    """Growth of the resident high-water mark since :func:`start_peak` returned ``before`` (MiB)."""
    peak = _status_mib("VmHWM")
    return None if before is None or peak is None else peak - before


def make_target_set(root: Path, count: int, size: tuple[int, int]) -> Path:
    """A Cityscapes-layout target set of ``count`` training images at ``size``; returns its ``cityscapes`` folder."""
    from uda_sam.data.toy import make_toy_data

    distinct = min(count, DISTINCT_IMAGES)
    make_toy_data(root, num_source=1, num_target_train=distinct, num_val=1, num_test=1, size=size,
                  source_size=(64, 32), seed=0)  # fmt: skip
    cityscapes = root / "cityscapes"
    images = sorted((cityscapes / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))
    for index in range(distinct, count):
        image = images[index % distinct]
        city = image.parent.name
        stem = f"{city}_{100000 + index:06d}_000019"
        label = (
            cityscapes / "gtFine" / "train" / city / image.name.replace("_leftImg8bit", "_gtFine_labelIds")
        )
        shutil.copyfile(image, image.parent / f"{stem}_leftImg8bit.png")
        shutil.copyfile(label, label.parent / f"{stem}_gtFine_labelIds.png")
    return cityscapes


def measure(args: argparse.Namespace, num_images: int) -> dict[str, Any]:
    """Time plain inference and a generation over ``num_images`` images (in this process)."""
    import torch
    from machine import machine_info
    from timing import synchronize  # benchmarks/timing.py
    from torch.utils.data import DataLoader

    from uda_sam.data import Cityscapes, SegmentationTransform
    from uda_sam.nn import DeepLabV2
    from uda_sam.pseudo_labels.generation import _collate_uint8_masks, generate_pseudo_labels

    device = torch.device(args.device)
    dtype = {"32": None, "bf16": torch.bfloat16}[args.precision]
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        cityscapes = make_target_set(Path(tmp) / "toy", num_images, tuple(args.size))
        dataset = Cityscapes(
            cityscapes,
            split="train",
            labels="optional",
            transform=SegmentationTransform(size=tuple(args.size)),
        )
        network = DeepLabV2(19, backbone=args.backbone, pretrained=None).to(device).eval()
        # Loaded as the generation loads (pinned batches on CUDA, uint8 masks), so that both loops pay the same.
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                            pin_memory=device.type == "cuda", collate_fn=_collate_uint8_masks)  # fmt: skip

        def infer(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
            with (
                torch.no_grad(),
                torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
            ):
                logits = network(images.to(device, non_blocking=True))
                return network.upsample_logits(logits, size).float().softmax(1).argmax(1).cpu()

        first = next(iter(DataLoader(dataset, batch_size=args.batch_size)))
        infer(first["image"], tuple(first["mask"].shape[-2:]))  # untimed: kernels, allocator, cuDNN
        synchronize(device)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        plain_before = start_peak()
        start = time.perf_counter()
        for batch in loader:
            infer(batch["image"], tuple(batch["mask"].shape[-2:]))
        synchronize(device)
        plain = num_images / (time.perf_counter() - start)
        plain_growth = peak_growth(plain_before)

        generation_before = start_peak()
        start = time.perf_counter()
        generate_pseudo_labels(
            network,
            dataset,
            Path(tmp) / "labels",
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=device,
            autocast_dtype=dtype,
            progress=False,
        )
        synchronize(device)
        generation = num_images / (time.perf_counter() - start)
        generation_growth = peak_growth(generation_before)
        rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return {
        "images": num_images,
        "plain": plain,
        "generation": generation,
        "rss_growth_mib": rss_growth,
        "plain_peak_growth_mib": plain_growth,
        "generation_peak_growth_mib": generation_growth,
        "scaling_seconds": time.monotonic()
        - began,  # the part of the worker's time that grows with the images
        "machine": machine_info(device),
        "config": run_config(args),
    }


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """What the report says about the run (``None`` for a default a worker resolves)."""
    return {
        name: getattr(args, name) for name in ("backbone", "size", "batch_size", "num_workers", "precision")
    }


def run_worker(args: argparse.Namespace, count: int, seconds: float | None) -> dict[str, Any]:
    """One set size in a fresh process; a row with ``error`` when it fails or outlives ``seconds``."""
    command = [sys.executable, __file__, *args.argv, "--worker", str(count)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    began = time.monotonic()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=seconds, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"images": count, "error": "stopped: time box used up", "seconds": time.monotonic() - began}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"images": count, "error": last, "seconds": time.monotonic() - began}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["seconds"] = time.monotonic() - began
    return row


def headline(rows: list[dict[str, Any]], planned: int, precision: str) -> str:
    """One line: set sizes measured, the ratio at the largest one and the largest host-memory growth."""
    done = [r for r in rows if "error" not in r]
    text = f"{len(done)}/{planned} set sizes measured"
    if done:
        top = max(done, key=lambda r: r["images"])
        text += (
            f"; {top['images']} images, precision {precision}: generation {top['generation']:.1f} img/s vs plain "
            f"{top['plain']:.1f} img/s (x{top['generation'] / top['plain']:.2f}); host memory growth up to "
            f"{max(r['rss_growth_mib'] for r in done):.0f} MiB"
        )
    return text


def write_report(
    args: argparse.Namespace, rows: list[dict[str, Any]], box: dict[str, Any], complete: bool
) -> Path:
    """Write ``<stem>.md`` and ``.json`` with the set sizes measured so far."""
    machine = next((r["machine"] for r in rows if "machine" in r), host_info())
    config = next((r["config"] for r in rows if "config" in r), run_config(args))
    device = machine.get("gpu") or f"{machine['cpu']}, {machine.get('threads', '?')} threads"
    size = "x".join(map(str, config["size"])) if config["size"] else "default size"
    command = f"python benchmarks/generation.py {' '.join(args.argv)}".rstrip()
    lines = [
        "# Pseudo-label generation with a network vs plain inference",
        "",
        f"- Device: {device}; torch {machine.get('torch', '?')}; {machine['date']}",
        f"- DeepLabV2-{config['backbone']} (random weights), images {size}, labels at the same size, batch "
        f"{config['batch_size']}, {config['num_workers']} loader workers, precision {config['precision']}",
        f"- Command: `{command}`; load average at the start {machine['loadavg']} (a shared machine inflates both "
        "rates alike)",
        "- plain = network + upsampling + argmax only; generation = `generate_pseudo_labels` (histogram, cached maps, "
        "thresholds, PNGs, statistics, atomic folder); both load alike (pinned batches on CUDA, uint8 masks). Host "
        "memory: growth of `ru_maxrss` over both loops, fresh process; each loop's own: its resident high-water mark "
        "(reset before it through `/proc/self/clear_refs`) minus the resident size at its start.",
        f"- time box: {box['seconds'] or 'none'} s{' (reached)' if box['reached'] else ''}"
        f"{'' if complete else '; run still in progress or cut short'}",
        "",
        "| images | plain img/s | generation img/s | generation / plain | host memory growth (MiB) "
        "| plain's own (MiB) | generation's own (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['images']} | {row['error']} | | | | | |")
            continue
        lines.append(
            f"| {row['images']} | {row['plain']:.1f} | {row['generation']:.1f} | {row['generation'] / row['plain']:.2f} "
            f"| {row['rss_growth_mib']:.0f} | {mib(row.get('plain_peak_growth_mib'))} "
            f"| {mib(row.get('generation_peak_growth_mib'))} |"
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{args.stem or 'generation_' + ('cuda' if machine.get('gpu') else 'cpu')}.md"
    path.write_text("\n".join(lines) + "\n")
    record = {
        "machine": machine,
        "command": command,
        **config,
        "rows": [{k: v for k, v in r.items() if k not in ("machine", "config")} for r in rows],
        "time_box": box,
        "complete": complete,
        "headline": headline(rows, len(args.image_counts), args.precision),
    }
    path.with_suffix(".json").write_text(json.dumps(record, indent=2))
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: CUDA when available)")
    parser.add_argument("--backbone", default=None, help="default: resnet101 on CUDA, resnet18 on CPU")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("W", "H"))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--image-counts", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--stem", help="results file name without suffix (default: generation_<cuda|cpu>)")
    parser.add_argument("--time-box", type=float, help="seconds for the whole run (default: no limit)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_box is not None and not args.time_box > 0:
        parser.error(f"--time-box must be a positive number of seconds, got {args.time_box!r}")
    if any(count < 1 for count in args.image_counts):
        parser.error(f"--image-counts must be positive integers, got {args.image_counts}")
    args.argv = argv
    return args


def resolve_device(args: argparse.Namespace) -> None:
    """Fill in the device and its defaults (imports torch: worker only)."""
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    args.backbone = args.backbone or ("resnet101" if cuda else "resnet18")
    args.size = args.size or ([1024, 512] if cuda else [256, 128])
    args.batch_size = args.batch_size or (8 if cuda else 4)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.worker is not None:  # one measurement in a fresh process, printed as JSON for the parent
        resolve_device(args)
        print(json.dumps(measure(args, args.worker)))
        return 0
    started = time.monotonic()
    box = {"seconds": args.time_box, "reached": False}
    rows: list[dict[str, Any]] = []
    fixed, per_image = 0.0, 0.0  # a worker's start-up seconds and seconds per image, from the last set size
    for count in args.image_counts:
        left = None if args.time_box is None else args.time_box - (time.monotonic() - started)
        if left is not None and (left <= 0 or fixed + per_image * count > left):
            box["reached"] = True
            rows.append({"images": count, "error": "skipped: time box used up"})
        else:
            rows.append(run_worker(args, count, left))
            scaling = rows[-1].get("scaling_seconds", rows[-1]["seconds"])
            fixed, per_image = rows[-1]["seconds"] - scaling, scaling / count
            box["reached"] = box["reached"] or rows[-1].get("error") == "stopped: time box used up"
        print({k: v for k, v in rows[-1].items() if k not in ("machine", "config")}, flush=True)
        write_report(args, rows, box, complete=False)
    path = write_report(args, rows, box, complete=True)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
