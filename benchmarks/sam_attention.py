"""Diagnostic: how spread out a trained SAM's attention is, on the target validation images of a pipeline run.

For the SAM of a pipeline's ``sam_pretraining`` stage and the network of its ``no_pseudo`` stage, over the first
validation images: the mean entropy of the attention rows (``log N`` for uniform attention), the share of a row's
weight on its most-attended 10 % of pixels, and how often ``argmax(P)`` and ``argmax(P + SAM(P))`` agree.

Usage::

    python benchmarks/sam_attention.py runs/toy/pipeline/seed_0 --data-root data/toy/cityscapes --size 128 64
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from uda_sam.data import Cityscapes, SegmentationTransform
from uda_sam.nn import DeepLabV2
from uda_sam.nn.sam_io import load_network_weights, load_sam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run", type=Path, help="a pipeline seed folder (holds sam_pretraining/ and no_pseudo/)"
    )
    parser.add_argument("--data-root", type=Path, required=True, help="Cityscapes-format root of the target")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 64), metavar=("W", "H"))
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()

    sam = load_sam(
        args.run / "sam_pretraining" / "sam.pt", expected_channels=19, layer="prediction", option="sam"
    ).eval()
    network = DeepLabV2(19, backbone=args.backbone, freeze_bn=False)
    load_network_weights(network, args.run / "no_pseudo" / "checkpoints" / "last.ckpt")
    network.eval()
    dataset = Cityscapes(
        args.data_root, split="val", labels="gt", transform=SegmentationTransform(size=tuple(args.size))
    )

    entropies, top_share, agreement = [], [], []
    with torch.no_grad():
        for index in range(min(args.images, len(dataset))):
            logits = network(dataset[index]["image"][None])
            attention = sam.attention(logits)[0]
            num = attention.shape[-1]
            entropies.append(float(-(attention * attention.clamp_min(1e-12).log()).sum(-1).mean()))
            k = max(1, num // 10)
            top_share.append(float(attention.topk(k, dim=-1).values.sum(-1).mean()))
            agreement.append(float((logits.argmax(1) == (logits + sam(logits)).argmax(1)).float().mean()))
    n = len(entropies)
    print(f"images: {n}, pixels per attention row N = {num} (logits {tuple(logits.shape[-2:])})")
    print(f"mean row entropy: {sum(entropies) / n:.3f} (uniform: log N = {math.log(num):.3f})")
    print(f"mean weight on the top 10 % of pixels: {sum(top_share) / n:.3f} (uniform: {k / num:.3f})")
    print(f"argmax(P) == argmax(P + SAM(P)) on {100 * sum(agreement) / n:.1f} % of pixels")


if __name__ == "__main__":
    main()
