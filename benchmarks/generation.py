"""Benchmark: one whole pseudo-label generation with a network, against plain inference on the same images.

``generate_pseudo_labels`` (inference, histogram, cached maps, thresholds, PNGs, statistics) is timed over a target
set in the Cityscapes layout (drawn with the toy generator), next to a plain loop that only runs the network,
upsamples and takes the argmax. Reports images/s of both, their ratio (issue target on an H100: >= 0.9), and the
peak host memory of a generation for two set sizes, each in a fresh process (``ru_maxrss`` growth), to show it does
not grow with the number of images.

Usage (from the repository root)::

    python benchmarks/generation.py                          # CPU: DeepLabV2-ResNet18 at 256x128
    python benchmarks/generation.py --backbone resnet101 --size 1024 512 --batch-size 8 --precision bf16   # GPU

Writes ``benchmarks/results/generation_<device>.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_model  # benchmarks/machine.py (the script's folder is on sys.path)
from timing import synchronize  # benchmarks/timing.py
from torch.utils.data import DataLoader

from uda_sam.data import Cityscapes
from uda_sam.data.toy import make_toy_data
from uda_sam.nn import DeepLabV2
from uda_sam.pseudo_labels.generation import generate_pseudo_labels


def measure(args: argparse.Namespace, num_images: int) -> dict[str, float]:
    """Time plain inference and a generation over ``num_images`` images (in this process)."""
    device = torch.device(args.device)
    dtype = {"32": None, "bf16": torch.bfloat16}[args.precision]
    with tempfile.TemporaryDirectory() as tmp:
        root = make_toy_data(
            Path(tmp) / "toy",
            num_source=1,
            num_target_train=num_images,
            num_val=1,
            size=tuple(args.size),
            source_size=(64, 32),
            seed=0,
        )
        dataset = Cityscapes(root / "cityscapes", split="train", size=tuple(args.size), labels="optional")
        network = DeepLabV2(19, backbone=args.backbone).to(device).eval()
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        start = time.perf_counter()
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            for batch in loader:
                logits = network(batch["image"].to(device, non_blocking=True))
                network.upsample_logits(logits, tuple(batch["mask"].shape[-2:])).float().softmax(1).argmax(
                    1
                ).cpu()
        synchronize(device)
        plain = num_images / (time.perf_counter() - start)

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
        rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return {"images": num_images, "plain": plain, "generation": generation, "rss_growth_mib": rss_growth}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default=None, help="default: resnet101 on CUDA, resnet18 on CPU")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("W", "H"))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--image-counts", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.backbone = args.backbone or ("resnet101" if cuda else "resnet18")
    args.size = args.size or ([1024, 512] if cuda else [256, 128])
    args.batch_size = args.batch_size or (8 if cuda else 4)
    if args.worker is not None:  # one measurement in a fresh process, printed as JSON for the parent
        print(json.dumps(measure(args, args.worker)))
        return 0
    rows = []
    for count in args.image_counts:
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", str(count)]
        out = (
            subprocess.run(command, check=True, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        rows.append(json.loads(out))
        print(rows[-1], flush=True)
    device_name = (
        torch.cuda.get_device_name() if cuda else f"{cpu_model()}, {torch.get_num_threads()} threads"
    )
    lines = [
        "# Pseudo-label generation with a network vs plain inference",
        "",
        f"- Device: {device_name}; torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- DeepLabV2-{args.backbone}, images {args.size[0]}x{args.size[1]}, labels at the same size, batch "
        f"{args.batch_size}, {args.num_workers} loader workers, precision {args.precision}",
        f"- Command: `python benchmarks/generation.py {' '.join(sys.argv[1:])}`; load average at the end "
        f"{' '.join(f'{x:.1f}' for x in __import__('os').getloadavg())} (a shared machine inflates both rates alike)",
        "- plain = network + upsampling + argmax only; generation = `generate_pseudo_labels` (histogram, cached maps, "
        "thresholds, PNGs, statistics, atomic folder). Host memory: growth of `ru_maxrss` during the run, fresh process.",
        "",
        "| images | plain img/s | generation img/s | generation / plain | host memory growth (MiB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['images']} | {row['plain']:.1f} | {row['generation']:.1f} | {row['generation'] / row['plain']:.2f} "
            f"| {row['rss_growth_mib']:.0f} |"
        )
    out = Path(__file__).resolve().parent / "results" / f"generation_{'cuda' if cuda else 'cpu'}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
