"""Diagnostic: how spread out a trained SAM's attention is, and what eq. (9) then pulls the logits towards.

For the SAM of a pipeline's ``sam_pretraining`` stage and the network of its ``no_pseudo`` stage (the student's
starting point), over the first target validation images:

- the mean entropy of the attention rows (``log N`` for uniform attention) and the share of a row's weight on its
  most-attended 10 % of pixels;
- how often ``argmax(P)`` and ``argmax(P + SAM(P))`` agree;
- how far eq. (9)'s target ``SAM(P)`` sits from the image's mean logits ``mean(P)``, as
  ``|SAM(P)_i - mean(P)| / |P_i - mean(P)|`` averaged over pixels: 0 is uniform attention (every pixel pulled to the
  image's mean). The same ratio for the ideal same-class attention (each pixel's target the mean of ``P`` over
  its ground-truth class) says how far a SAM that attends only to same-class pixels would move it, and for the
  attention of the raw logits (``Â`` from ``cos(P_i, P_j)``, the "No Conv" SAM) what the learned transform adds;
- per class, the share of its pixels' attention that stays on the class, against the class's share of the pixels
  (what uniform attention would give): where eq. (9) pulls a class's pixels towards other classes.

The network is rebuilt from the class and arguments its checkpoint records.

Usage::

    python benchmarks/sam_attention.py runs/toy/pipeline/seed_0 --data-root data/toy/cityscapes --size 128 64
"""

from __future__ import annotations

import argparse
import importlib
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from uda_sam.cli.checkpoint_config import INITIAL_WEIGHT_OPTIONS, read_run_config
from uda_sam.data import Cityscapes, SegmentationTransform
from uda_sam.data.labels import CLASS_NAMES, IGNORE_INDEX
from uda_sam.evaluation.analysis import _resize_labels
from uda_sam.nn.sam import relu_cosine_attention
from uda_sam.nn.sam_io import load_network_weights, load_sam


def network_from_checkpoint(path: Path) -> nn.Module:
    """The network a ``uda-sam fit`` checkpoint holds, built from its recorded class and arguments, in eval mode."""
    network_config = read_run_config(str(path))["model"]["init_args"]["network"]
    module, _, name = network_config["class_path"].rpartition(".")
    init_args = dict(network_config.get("init_args", {}))
    for option in INITIAL_WEIGHT_OPTIONS:  # the trained weights are loaded below
        if option in init_args:
            init_args[option] = None
    network = getattr(importlib.import_module(module), name)(**init_args)
    load_network_weights(network, path)
    return network.eval()


def distance_to_image_mean(target: Tensor, logits: Tensor) -> float:
    """Mean over pixels of ``|target_i - mean(P)| / |P_i - mean(P)|`` for ``(C, N)`` tensors."""
    mean = logits.mean(dim=1, keepdim=True)
    return float(((target - mean).norm(dim=0) / (logits - mean).norm(dim=0).clamp_min(1e-8)).mean())


def same_class_target(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Each labelled pixel's ideal attended logits (the mean of ``P`` over its class) and the mask of those pixels."""
    valid = labels != IGNORE_INDEX
    target = torch.zeros_like(logits)
    for cls in labels[valid].unique():
        members = labels == cls
        target[:, members] = logits[:, members].mean(dim=1, keepdim=True)
    return target, valid


def class_attention_shares(attention: Tensor, labels: Tensor) -> dict[int, tuple[float, float, int]]:
    """Per class ``c`` present: the mean share of a class-``c`` row's attention on class-``c`` pixels, the share of
    labelled pixels that are ``c`` (uniform attention's value), and the number of rows; ``attention`` is ``(N, N)``,
    ``labels`` ``(N,)``."""
    valid = labels != IGNORE_INDEX
    shares = {}
    for cls in labels[valid].unique().tolist():
        members = labels == cls
        own = attention[members][:, members].sum(-1) / attention[members][:, valid].sum(-1).clamp_min(1e-12)
        shares[cls] = (float(own.mean()), float(members.sum() / valid.sum()), int(members.sum()))
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run", type=Path, help="a pipeline seed folder (holds sam_pretraining/ and no_pseudo/)"
    )
    parser.add_argument("--data-root", type=Path, required=True, help="Cityscapes-format root of the target")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 64), metavar=("W", "H"))
    parser.add_argument("--images", type=int, default=20)
    args = parser.parse_args()

    network = network_from_checkpoint(args.run / "no_pseudo" / "checkpoints" / "last.ckpt")
    sam = load_sam(
        args.run / "sam_pretraining" / "sam.pt", expected_channels=19, layer="prediction", option="sam"
    ).eval()
    dataset = Cityscapes(
        args.data_root, split="val", labels="gt", transform=SegmentationTransform(size=tuple(args.size))
    )

    figures: dict[str, list[float]] = {
        "entropy": [],
        "top": [],
        "agree": [],
        "sam": [],
        "no_conv": [],
        "ideal": [],
    }
    per_class: dict[int, list[tuple[float, float, int]]] = {}
    with torch.no_grad():
        for index in range(min(args.images, len(dataset))):
            sample = dataset[index]
            logits = network(sample["image"][None])
            attention = sam.attention(logits)[0]
            attended = sam(logits)
            num = attention.shape[-1]
            figures["entropy"].append(float(-(attention * attention.clamp_min(1e-12).log()).sum(-1).mean()))
            k = max(1, num // 10)
            figures["top"].append(float(attention.topk(k, dim=-1).values.sum(-1).mean()))
            figures["agree"].append(float((logits.argmax(1) == (logits + attended).argmax(1)).float().mean()))
            flat = logits[0].flatten(1)
            labels = _resize_labels(sample["mask"], tuple(logits.shape[-2:])).flatten()
            ideal, valid = same_class_target(flat, labels)
            no_conv = relu_cosine_attention(flat.T[None], flat.T[None], impl="full")[0].T
            figures["sam"].append(distance_to_image_mean(attended[0].flatten(1)[:, valid], flat[:, valid]))
            figures["no_conv"].append(distance_to_image_mean(no_conv[:, valid], flat[:, valid]))
            figures["ideal"].append(distance_to_image_mean(ideal[:, valid], flat[:, valid]))
            for cls, figure in class_attention_shares(attention, labels).items():
                per_class.setdefault(cls, []).append(figure)
    mean = {key: sum(values) / len(values) for key, values in figures.items()}
    print(
        f"images: {len(figures['sam'])}, pixels per attention row N = {num} (logits {tuple(logits.shape[-2:])})"
    )
    print(f"mean row entropy: {mean['entropy']:.3f} (uniform: log N = {math.log(num):.3f})")
    print(f"mean weight on the top 10 % of pixels: {mean['top']:.3f} (uniform: {k / num:.3f})")
    print(f"argmax(P) == argmax(P + SAM(P)) on {100 * mean['agree']:.1f} % of pixels")
    print(
        f"|SAM(P) - mean(P)| / |P - mean(P)|: {mean['sam']:.3f} (0 = uniform attention; raw logits' attention, "
        f"No Conv: {mean['no_conv']:.3f}; ideal same-class attention: {mean['ideal']:.3f})"
    )
    print(
        "per class, row-weighted over the images: attention kept on the class / the class's share of the pixels"
    )
    for cls, values in sorted(per_class.items()):
        rows = sum(n for _, _, n in values)
        kept = sum(share * n for share, _, n in values) / rows
        chance = sum(frac * n for _, frac, n in values) / rows
        print(f"  {CLASS_NAMES[cls]:14s} {kept:.3f} / {chance:.3f} (lift {kept / chance:.2f}, {rows} rows)")


if __name__ == "__main__":
    main()
