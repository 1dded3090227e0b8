"""``uda-sam make-toy-data``: write the embedded toy domain pair (:func:`uda_sam.data.toy.make_toy_data`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from uda_sam.data.toy import make_toy_data

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Write the toy domain pair (a game-like source in GTA5 format, a real-looking target in Cityscapes format)."""
    parser = argparse.ArgumentParser(prog="uda-sam make-toy-data", description=main.__doc__)
    parser.add_argument(
        "root", help="output folder (must not exist, be empty, or hold a toy set with the same options)"
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    parser.add_argument("--num-source", type=int, default=200, help="source images (default: 200)")
    parser.add_argument("--num-target", type=int, default=200, help="target training images (default: 200)")
    parser.add_argument("--num-val", type=int, default=50, help="target validation images (default: 50)")
    parser.add_argument(
        "--num-test", type=int, default=100, help="labelled target test images (default: 100)"
    )
    parser.add_argument(
        "--size", type=int, nargs=2, metavar=("W", "H"), default=(256, 128), help="target image size"
    )
    parser.add_argument(
        "--source-size",
        type=int,
        nargs=2,
        metavar=("W", "H"),
        default=None,
        help="source image size (default: 288 160)",
    )
    args = parser.parse_args(argv)
    kwargs = {"source_size": tuple(args.source_size)} if args.source_size is not None else {}
    root = make_toy_data(
        args.root,
        num_source=args.num_source,
        num_target_train=args.num_target,
        num_val=args.num_val,
        num_test=args.num_test,
        size=tuple(args.size),
        seed=args.seed,
        **kwargs,
    )
    print(f"Toy domain pair written to {root}")
    return 0
