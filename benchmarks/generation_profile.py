"""Profile a pseudo-label generation on the CPU: where its time and host memory go besides the network.

On a GPU the network of a generation takes about 12 ms an image (ResNet101, 1024x512, bf16), so the host's own work
(histogram, cached maps, PNGs, statistics) decides whether a generation keeps up with plain inference. On a CPU the
real network would hide that work, so this script replaces it with a stand-in that costs almost nothing (an 8x8
average pool and a 1x1 convolution, 19 classes at 1/8 of the size, like DeepLabV2's output) and runs both loops of
``generation.py`` over the same target set: plain inference (upsampling, softmax, argmax, copy to the host) and
``generate_pseudo_labels``. The images are decoded once into memory first, so that loading costs neither loop.

Reports the wall time of both loops, the growth of peak host memory (``ru_maxrss``) during the generation, and with
``--cprofile N`` the top ``N`` entries of a cProfile of the generation (its main thread: the time its worker threads
take shows there as the main thread's waits).

Usage (from the repository root)::

    python benchmarks/generation_profile.py --images 64          # 1024x512 images and labels
    python benchmarks/generation_profile.py --images 64 --cprofile 25
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

try:
    import uda_sam  # noqa: F401
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generation import make_target_set  # benchmarks/generation.py (the script's folder is on sys.path)

from uda_sam.data import Cityscapes, SegmentationTransform
from uda_sam.pseudo_labels.generation import generate_pseudo_labels


class StandIn(nn.Module):
    """A near-free segmentation network: 19-class logits at 1/8 of the image size, DeepLabV2's interface."""

    def __init__(self, num_classes: int = 19) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.avg_pool2d(x, 8, ceil_mode=True))

    def upsample_logits(self, logits: Tensor, size: tuple[int, int]) -> Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


class InMemory(Dataset):
    """The samples of a dataset, decoded once (so that data loading costs neither loop)."""

    def __init__(self, dataset: Cityscapes) -> None:
        self.samples = [dataset[i] for i in range(len(dataset))]
        self.names = dataset.names
        self.size = dataset.size
        self.normalization = dataset.normalization

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.samples[index]


def plain_inference(network: StandIn, dataset: InMemory, batch_size: int) -> float:
    """Seconds of the plain loop: network, upsampling, softmax, argmax, copy to the host."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            logits = network(batch["image"])
            size = tuple(batch["mask"].shape[-2:])
            network.upsample_logits(logits, size).float().softmax(1).argmax(1).cpu()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 512], metavar=("W", "H"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cprofile", type=int, default=0, help="print this many top cProfile entries")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    network = StandIn().eval()
    with tempfile.TemporaryDirectory() as tmp:
        cityscapes = make_target_set(Path(tmp) / "toy", args.images, tuple(args.size))
        dataset = InMemory(
            Cityscapes(
                cityscapes,
                split="train",
                labels="optional",
                transform=SegmentationTransform(size=tuple(args.size)),
            )
        )
        plain_inference(network, dataset, args.batch_size)  # untimed: allocator, kernels
        plain = plain_inference(network, dataset, args.batch_size)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        profiler = cProfile.Profile() if args.cprofile else None
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        generate_pseudo_labels(network, dataset, Path(tmp) / "labels", batch_size=args.batch_size, num_workers=0,
                               progress=False)  # fmt: skip
        if profiler is not None:
            profiler.disable()
        generation = time.perf_counter() - start
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    figures = {
        "images": args.images,
        "size": args.size,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "plain_s": plain,
        "generation_s": generation,
        "plain_ms_per_image": 1000 * plain / args.images,
        "generation_ms_per_image": 1000 * generation / args.images,
        "rss_growth_mib": growth,
    }
    print(json.dumps(figures, indent=2))
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.cprofile)
        print(text.getvalue())
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.cprofile)
        print(text.getvalue())
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
