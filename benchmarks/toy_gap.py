"""Measure the domain gap of the embedded toy pair: source-only vs target-supervised mIoU of one small CNN.

The same tiny fully convolutional network (output stride 4, dilated context, ~0.3 M parameters) is trained with
the same recipe twice, on the toy source (game) labels and on the toy target train labels, and both are evaluated
on the toy target val set (19-class mIoU, NaN-skipping, confusion matrix over trainIds with 255 ignored).
Plain PyTorch on CPU; reads the data with ``uda_sam.data`` (GTA5 and Cityscapes readers).

Usage::

    python benchmarks/toy_gap.py                 # generates the default toy set in a temp folder
    python benchmarks/toy_gap.py --root data/toy --steps 600 --out toy_gap.md
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_model  # benchmarks/machine.py (the script's folder is on sys.path)
from torch import nn

from uda_sam.data import CLASS_NAMES, GTA5, NUM_CLASSES, Cityscapes, SegmentationTransform, make_toy_data


def load_all(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([s["image"] for s in items]), torch.stack([s["mask"] for s in items])


def tiny_net() -> nn.Module:
    def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    return nn.Sequential(
        block(3, 32, 2),
        block(32, 64, 2),
        block(64, 64),
        block(64, 96, dilation=2),
        block(96, 96, dilation=4),
        block(96, 96, dilation=8),
        nn.Conv2d(96, NUM_CLASSES, 1),
    )


def train(images: torch.Tensor, masks: torch.Tensor, steps: int, batch: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = tiny_net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - s / steps) ** 0.9)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        x, y = images[idx], masks[idx]
        flip = torch.rand(batch, generator=gen) < 0.5
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        logits = F.interpolate(net(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def evaluate(net: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for i in range(0, len(images), 16):
        x, y = images[i : i + 16], masks[i : i + 16]
        pred = F.interpolate(net(x), size=y.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        keep = y != 255
        conf += torch.bincount(y[keep] * NUM_CLASSES + pred[keep], minlength=NUM_CLASSES**2).view(
            NUM_CLASSES, -1
        )
    tp = conf.diag().double()
    denom = conf.sum(0).double() + conf.sum(1).double() - tp
    return torch.where(denom > 0, tp / denom, torch.full_like(tp, float("nan"))).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, default=None, help="toy set root (default: generate in a temp dir)"
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write a markdown summary here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp) / "toy"
        start = time.perf_counter()
        make_toy_data(root)
        generation_s = time.perf_counter() - start
        source = load_all(GTA5(root / "gta5", transform=SegmentationTransform(size=(128, 72))))
        target = load_all(
            Cityscapes(root / "cityscapes", "train", transform=SegmentationTransform(size=(128, 64)))
        )
        val = load_all(
            Cityscapes(root / "cityscapes", "val", transform=SegmentationTransform(size=(128, 64)))
        )

    results = {}
    for name, data in (("source-only", source), ("target-supervised", target)):
        start = time.perf_counter()
        net = train(*data, steps=args.steps, batch=args.batch, seed=args.seed)
        iou = evaluate(net, *val)
        results[name] = iou
        print(f"{name}: mIoU {np.nanmean(iou) * 100:.1f} ({time.perf_counter() - start:.0f} s)")

    gap = (np.nanmean(results["target-supervised"]) - np.nanmean(results["source-only"])) * 100
    print(f"gap: {gap:.1f} mIoU points (toy generation {generation_s:.1f} s)")
    lines = [
        "# Toy domain gap (benchmarks/toy_gap.py)",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. Default toy set, {args.steps} steps, batch {args.batch}, 128x64, seed {args.seed}.",
        "",
        "| class | source-only IoU | target-supervised IoU |",
        "|---|---|---|",
    ]
    for c, cname in enumerate(CLASS_NAMES):
        s, t = results["source-only"][c], results["target-supervised"][c]
        if not (np.isnan(s) and np.isnan(t)):
            lines.append(f"| {cname} | {s * 100:.1f} | {t * 100:.1f} |")
    lines += [
        f"| **mIoU** | **{np.nanmean(results['source-only']) * 100:.1f}** | "
        f"**{np.nanmean(results['target-supervised']) * 100:.1f}** |",
        "",
        f"Gap: {gap:.1f} points.",
    ]
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
