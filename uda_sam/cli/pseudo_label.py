"""``uda-sam pseudo-label``: one generation of pseudo labels offline, from a checkpoint and a training config.

For users who run each generation as a separate ``fit``::

    uda-sam pseudo-label --config configs/gta5/pseudo_only.yaml \\
        --checkpoint runs/gta5/no_pseudo/checkpoints/last.ckpt --output pseudo_labels/generation_1
    uda-sam fit --config configs/gta5/pseudo_only.yaml --data.pseudo_label_root pseudo_labels/generation_1 ...

Only the config's ``data`` section and ``model.init_args.network`` are read: the network is built as configured and
filled with the checkpoint's weights (a DeepLabV2 or an FCN8s also reads published models, e.g. BDL's source-only GTA5
model with ``--config configs/init/deeplab_caffe.yaml``, its VGG16 one with ``configs/init/fcn8s_caffe.yaml``); later
config files update the earlier ones as in ``uda-sam fit``; the target training images come from the datamodule, without
augmentation.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from uda_sam.cli.config_files import load_config

__all__ = ["main"]


def _same_class(a: object, b: object) -> bool:
    # "DeepLabV2" and "uda_sam.nn.DeepLabV2" name the same class, as jsonargparse resolves them.
    return a is None or b is None or str(a).rsplit(".", 1)[-1] == str(b).rsplit(".", 1)[-1]


def merge_network_sections(earlier: dict | None, later: dict) -> dict:
    """A later config's ``model.init_args.network`` (or ``data.source``/``data.target``) over an earlier one's, as
    ``uda-sam fit`` merges them.

    Without a ``class_path``, or with the same class, the later ``init_args`` update the earlier ones (so a fragment
    such as ``configs/init/fcn8s_caffe.yaml`` changes the style and keeps the stage's class count); another class
    replaces the section.
    """
    if earlier is None or not _same_class(later.get("class_path"), earlier.get("class_path")):
        return later
    init_args = {**(earlier.get("init_args") or {}), **(later.get("init_args") or {})}
    return {**earlier, **{k: v for k, v in later.items() if k != "init_args"}, "init_args": init_args}


def _build(config_files: Sequence[str]) -> tuple[torch.nn.Module, object]:
    from jsonargparse import ArgumentParser

    from uda_sam.datamodules import UDADataModule

    merged: dict = {}
    for file in config_files:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"--config: {path} does not exist")
        raw = load_config(path)
        if "data" in raw:
            data = dict(merged.get("data", {}))
            for key, value in raw["data"].items():
                # A later file's dataset entry updates the earlier one's arguments, as `uda-sam fit` merges them.
                reader = key in ("source", "target") and isinstance(value, dict)
                data[key] = merge_network_sections(data.get(key), value) if reader else value
            merged["data"] = data
        network = ((raw.get("model") or {}).get("init_args") or {}).get("network")
        if network is not None:
            merged["network"] = merge_network_sections(merged.get("network"), network)
    for key, where in (("data", "data"), ("network", "model.init_args.network")):
        if key not in merged:
            raise ValueError(f"--config: none of {list(config_files)} has a `{where}` section")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(UDADataModule, "data")
    parser.add_subclass_arguments(torch.nn.Module, "network")
    config = parser.parse_object(merged)
    objects = parser.instantiate_classes(config)
    return objects.network, objects.data


def main(argv: Sequence[str] | None = None) -> int:
    """Make one generation of class-wise thresholded pseudo labels from a checkpoint (offline)."""
    parser = argparse.ArgumentParser(prog="uda-sam pseudo-label", description=main.__doc__)
    parser.add_argument(
        "--config", action="append", required=True, help="training config(s) giving `data` and the network"
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="Lightning checkpoint whose network makes the labels, or another weights file the network reads "
        "(a published DeepLabV2 or FCN-8s model, exported weights)",
    )
    parser.add_argument("--output", required=True, help="the generation's folder (created atomically)")
    parser.add_argument(
        "--cap", type=float, default=0.9, help="upper bound of the class-wise thresholds (default 0.9)"
    )
    parser.add_argument("--num-bins", type=int, default=1000, help="confidence-histogram bins (default 1000)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["32", "bf16", "16"], default="32", help="inference precision")
    parser.add_argument(
        "--reuse",
        choices=["matching", "require", "never"],
        default="matching",
        help="labels already in --output: reuse them when made by the same weights from the same images, size, "
        "normalisation, cap and bins, else make them again (matching, the default); reuse them or stop, naming "
        "what differs (require); always make them again (never)",
    )
    options = parser.parse_args(argv)

    from uda_sam.nn.sam_io import load_network_weights
    from uda_sam.pseudo_labels.generation import ProcessGroup, autocast_dtype_for, generate_pseudo_labels

    try:
        network, datamodule = _build(options.config)
        load_network_weights(network, options.checkpoint, "--checkpoint")
        dataset = datamodule.target_inference_dataset()
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = torch.device(options.device)
    try:
        result = generate_pseudo_labels(
            network.to(device),
            dataset,
            options.output,
            description={"teacher": str(Path(options.checkpoint).resolve())},
            num_classes=getattr(network, "num_classes", 19),
            cap=options.cap,
            num_bins=options.num_bins,
            batch_size=options.batch_size,
            num_workers=options.num_workers,
            device=device,
            autocast_dtype=autocast_dtype_for(options.precision),
            group=ProcessGroup.from_torch_distributed(device),
            reuse=options.reuse,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    share = result.statistics.get("labelled_share", float("nan"))
    if result.replaced:
        print(f"Replaced the labels made otherwise in {result.label_dir}: {'; '.join(result.replaced)}")
    print(
        f"{'Reused' if result.reused else 'Wrote'} {len(dataset)} pseudo-label maps in {result.label_dir} ({share:.1%} of pixels labelled)"
    )
    for record in result.statistics.get("classes", []):
        precision = record.get("precision")
        print(
            f"  {record['class']:<14} tau={record['threshold']:.3f}  share={record['share'] or 0:.3f}"
            + (f"  agreement={precision:.3f}" if precision is not None else "")
        )
    return 0
