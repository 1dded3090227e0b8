"""Draw toy test images next to their ground truth and the predictions of a pipeline run's stages (one PNG).

Usage::

    python benchmarks/toy_figure.py runs/toy/pipeline/seed_0 --out docs/toy_predictions.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from uda_sam.data import Cityscapes, SegmentationTransform, colorize
from uda_sam.data.transforms import denormalize
from uda_sam.nn import DilatedFCN

STAGES = {
    "No Pseudo": "no_pseudo",
    "Pseudo-Only": "pseudo_only/generation_1",
    "Ours (9)&(11)": "ours_9_11/generation_1",
    "Oracle": "oracle",
}


def predict(checkpoint: Path, image: torch.Tensor) -> np.ndarray:
    network = DilatedFCN(weights=str(checkpoint)).eval()
    with torch.no_grad():
        logits = network(image[None])
        return network.upsample_logits(logits, tuple(image.shape[-2:])).argmax(1)[0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run", type=Path, help="a seed folder of a toy pipeline run (runs/toy/pipeline/seed_0)"
    )
    parser.add_argument("--data-root", type=Path, default=Path("data/toy/cityscapes"))
    parser.add_argument("--images", type=int, nargs="+", default=[0, 3, 7])
    parser.add_argument("--out", type=Path, default=Path("docs/toy_predictions.png"))
    args = parser.parse_args()
    test = Cityscapes(args.data_root, "test", transform=SegmentationTransform(size=(128, 64)))
    stages = {name: args.run / folder / "checkpoints" / "last.ckpt" for name, folder in STAGES.items()}
    stages = {name: path for name, path in stages.items() if path.is_file()}
    rows = []
    for index in args.images:
        sample = test[index]
        image = denormalize(sample["image"])
        tiles = [image, colorize(sample["mask"].numpy())]
        tiles += [colorize(predict(path, sample["image"])) for path in stages.values()]
        rows.append(
            np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], 1)
        )
    grid = np.concatenate(rows, 0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(args.out)
    print(f"columns: image, ground truth, {', '.join(stages)}; wrote {args.out}")


if __name__ == "__main__":
    main()
