"""Samples/s of each dataset's full pipeline (decode, resize, augment, normalise) in one process.

Full-size images and labels in the real on-disk formats are generated in a temporary folder with the toy scene
renderer (GTA5 1914x1052 palette labels, SYNTHIA 1280x760 16-bit labels, Cityscapes 2048x1024 labelIds and
1024x512 pseudo labels). Each pipeline is then read ``--samples`` times with ``num_workers=0`` semantics (in this
process, one torch/OpenCV thread, as in a data-loader worker), so the figure is the throughput of **one worker**;
a loader with ``k`` workers delivers at most about ``k`` times it. Results go to
``benchmarks/results/data_<machine>.md``.

Usage::

    python benchmarks/data.py --samples 20
    python benchmarks/data.py --samples 100 --machine my-workstation
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import albumentations
import cv2
import numpy as np
import PIL
import torch
from machine import cpu_model  # benchmarks/machine.py (the script's folder is on sys.path)
from PIL import Image

from uda_sam.data import GTA5, Cityscapes, SegmentationTransform, Synthia
from uda_sam.data.labels import LABEL_ID_TO_TRAIN_ID, SYNTHIA_ID_TO_TRAIN_ID_PAIRS, label_id_palette
from uda_sam.data.toy import render_scene

DISTINCT_FILES = 4  # distinct images per dataset; the timed loop cycles over them


def machine_slug(model: str, cores: int) -> str:
    words = re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*", " ", model)
    return "-".join(re.findall(r"[a-z0-9]+", words.lower())[:4] + [f"{cores}c"])


def write_gta5(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(DISTINCT_FILES):
        image, label = render_scene((7, 0, i), (1914, 1052), "source")
        cv2.imwrite(str(root / "images" / f"{i + 1:05d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        pal = Image.fromarray(label, mode="P")
        pal.putpalette(label_id_palette())
        pal.save(root / "labels" / f"{i + 1:05d}.png")


def write_synthia(root: Path) -> None:
    (root / "RGB").mkdir(parents=True)
    (root / "GT" / "LABELS").mkdir(parents=True)
    to_synthia = np.zeros(256, np.uint16)  # trainId -> SYNTHIA id (0 = void for classes SYNTHIA lacks)
    for synthia_id, train_id in SYNTHIA_ID_TO_TRAIN_ID_PAIRS:
        to_synthia[train_id] = synthia_id
    for i in range(DISTINCT_FILES):
        image, label = render_scene((7, 1, i), (1280, 760), "source")
        classes = to_synthia[LABEL_ID_TO_TRAIN_ID[label]]
        instances = (np.arange(classes.size, dtype=np.uint32).reshape(classes.shape) % 5000).astype(np.uint16)
        bgr16 = np.stack([np.zeros_like(classes), instances, classes], -1)  # B, G, R=class
        cv2.imwrite(str(root / "RGB" / f"{i:07d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / "GT" / "LABELS" / f"{i:07d}.png"), bgr16)


def write_cityscapes(root: Path, pseudo_root: Path) -> None:
    for split in ("train", "val"):
        for i in range(DISTINCT_FILES):
            stem = f"bench_{i:06d}_000019"
            image_dir, label_dir = root / "leftImg8bit" / split / "bench", root / "gtFine" / split / "bench"
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            image, label = render_scene((7, 2, i), (2048, 1024), "target")
            cv2.imwrite(str(image_dir / f"{stem}_leftImg8bit.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            Image.fromarray(label, mode="L").save(label_dir / f"{stem}_gtFine_labelIds.png")
            if split == "train":
                pseudo = cv2.resize(LABEL_ID_TO_TRAIN_ID[label], (1024, 512), interpolation=cv2.INTER_NEAREST)
                (pseudo_root / "bench").mkdir(parents=True, exist_ok=True)
                Image.fromarray(pseudo, mode="L").save(pseudo_root / "bench" / f"{stem}.png")


def time_dataset(dataset, samples: int) -> float:
    for i in range(2):  # warm-up: page cache, lazy imports
        dataset[i % len(dataset)]
    start = time.perf_counter()
    for i in range(samples):
        dataset[i % len(dataset)]
    return samples / (time.perf_counter() - start)


def mean_size_mb(folder: Path, pattern: str) -> float:
    sizes = [p.stat().st_size for p in folder.rglob(pattern)]
    return float(np.mean(sizes)) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20, help="timed samples per pipeline")
    parser.add_argument(
        "--machine", default=None, help="name used in the results file (default: from the CPU)"
    )
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what a data-loader worker gets
    cv2.setNumThreads(0)

    model, cores = cpu_model(), os.cpu_count() or 1
    machine = args.machine or machine_slug(model, cores)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        start = time.perf_counter()
        write_gta5(tmp_path / "gta5")
        write_synthia(tmp_path / "synthia")
        write_cityscapes(tmp_path / "cityscapes", tmp_path / "pseudo")
        print(f"generated full-size files in {time.perf_counter() - start:.0f} s")
        cs = tmp_path / "cityscapes"
        pipelines = [
            (
                "GTA5 train",
                "1914x1052 -> 1280x720, hflip",
                GTA5(tmp_path / "gta5", transform=SegmentationTransform(size=(1280, 720), hflip=True)),
                mean_size_mb(tmp_path / "gta5" / "images", "*.png"),
            ),
            (
                "SYNTHIA train",
                "1280x760 (native), hflip",
                Synthia(tmp_path / "synthia", transform=SegmentationTransform(size=(1280, 760), hflip=True)),
                mean_size_mb(tmp_path / "synthia" / "RGB", "*.png"),
            ),
            (
                "Cityscapes train + pseudo labels",
                "2048x1024 -> 1024x512, hflip",
                Cityscapes(
                    cs,
                    "train",
                    pseudo_label_root=tmp_path / "pseudo",
                    transform=SegmentationTransform(size=(1024, 512), hflip=True),
                ),
                mean_size_mb(cs / "leftImg8bit" / "train", "*.png"),
            ),
            (
                "Cityscapes val (labels full size)",
                "image 2048x1024 -> 1024x512, label 2048x1024",
                Cityscapes(cs, "val", transform=SegmentationTransform(size=(1024, 512), resize_mask=False)),
                mean_size_mb(cs / "leftImg8bit" / "val", "*.png"),
            ),
            (
                "GTA5 train, random scale + crop",
                "-> 1280x720, scale 0.5-1.5, crop 1024x512, hflip",
                GTA5(
                    tmp_path / "gta5",
                    transform=SegmentationTransform(
                        size=(1280, 720), random_scale=(0.5, 1.5), crop_size=(1024, 512), hflip=True
                    ),
                ),
                mean_size_mb(tmp_path / "gta5" / "images", "*.png"),
            ),
        ]
        for name, what, dataset, mb in pipelines:
            rate = time_dataset(dataset, args.samples)
            rows.append((name, what, rate, mb))
            print(f"{name:40s} {rate:6.2f} samples/s per worker")

    lines = [
        f"# Data pipeline throughput: {machine}",
        "",
        f"- CPU: {model}, {cores} logical cores (shared with other jobs when measured)",
        f"- Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"OpenCV {cv2.__version__}, albumentations {albumentations.__version__}, Pillow {PIL.__version__}",
        f"- `python benchmarks/data.py --samples {args.samples}`: one process, 1 thread (= one data-loader worker), "
        f"{args.samples} timed samples after 2 warm-up reads, cycling over {DISTINCT_FILES} generated files per "
        "dataset (page cache warm: decode, not disk, is measured).",
        "- Images are toy scenes rendered at full size; their PNGs compress differently from real photos "
        "(real Cityscapes/GTA5 PNGs are about 2-3 MB), which changes the decode time.",
        "",
        "| pipeline | sizes | samples/s per worker | ms/sample | mean image PNG (MB) |",
        "|---|---|---|---|---|",
    ]
    for name, what, rate, mb in rows:
        lines.append(f"| {name} | {what} | {rate:.2f} | {1000 / rate:.0f} | {mb:.2f} |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"data_{machine}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
