"""Does self-training work on the toy pair? Teacher, pseudo labels and student, measured per class.

Plain PyTorch on the CPU, independent of the package's tasks: one small dilated CNN (``benchmarks/toy_gap.py``'s)
is trained on the source (the teacher, "No Pseudo"), on the target train labels ("Oracle"), and then as a student
on the source labels plus the teacher's class-wise median-thresholded pseudo labels of the target train images
("Pseudo-Only", the rule of docs/METHOD.md: ``tau[c] = min(cap, median confidence of the pixels predicted c)``).
Every network is scored on the target val (or test) images, per class. For the pseudo labels it reports, per
class, the precision and recall of the kept pixels, the teacher's confident errors (kept pixels of another class)
and the student's per-class gain over its teacher.

Usage::

    python benchmarks/toy_self_training.py --seeds 0 1 2 --out benchmarks/results/toy_self_training.md
    python benchmarks/toy_self_training.py --palette shipped --student-init teacher
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_model  # benchmarks/machine.py (the script's folder is on sys.path)

from uda_sam.data import CLASS_NAMES, LABEL_ID_TO_TRAIN_ID, NUM_CLASSES, toy

NORM = "batch"  # set from --norm


def tiny_net() -> torch.nn.Module:
    """benchmarks/toy_gap.py's network, with BatchNorm or GroupNorm (no running statistics to mix domains)."""

    def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> torch.nn.Module:
        norm = torch.nn.BatchNorm2d(cout) if NORM == "batch" else torch.nn.GroupNorm(8, cout)
        return torch.nn.Sequential(
            torch.nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
            norm,
            torch.nn.ReLU(inplace=True),
        )

    return torch.nn.Sequential(
        block(3, 32, 2),
        block(32, 64, 2),
        block(64, 64),
        block(64, 96, dilation=2),
        block(96, 96, dilation=4),
        block(96, 96, dilation=8),
        torch.nn.Conv2d(96, NUM_CLASSES, 1),
    )


def _toy(realism: float) -> toy.Style:
    """The toy's real palette: every class keeps its place."""
    return toy._blend(toy.GAME_STYLE, toy._REAL_PALETTE, realism)


def _swapped(realism: float) -> toy.Style:
    """The first toys' real palette: road and pavement trading places, signs always in unseen colours."""
    real = toy.Style(
        **{
            **toy._REAL_PALETTE.__dict__,
            "road": ((160, 152, 146), (148, 142, 138)),
            "sidewalk": ((118, 96, 96), (104, 88, 90)),
        }
    )
    style = toy._blend(toy.GAME_STYLE, real, realism)
    return toy.Style(**{**style.__dict__, "sign": real.sign})


PALETTES = {"toy": _toy, "swapped": _swapped}

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, H, W) normalised
    masks: torch.Tensor  # (N, H, W) trainIds, 255 ignored


def render_split(
    domain: str, stream: int, count: int, size: tuple[int, int], train_size: tuple[int, int], seed: int
) -> Split:
    images, masks = [], []
    for i in range(count):
        image, label = toy.render_scene((seed, stream, i), size, domain)
        image = cv2.resize(image, train_size, interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, train_size, interpolation=cv2.INTER_NEAREST)
        images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255.0)
        masks.append(torch.from_numpy(LABEL_ID_TO_TRAIN_ID[label].astype(np.int64)))
    x = (torch.stack(images) - MEAN) / STD
    return Split(x, torch.stack(masks))


def batches(split: Split, batch: int, gen: torch.Generator):
    idx = torch.randint(len(split.images), (batch,), generator=gen)
    x, y = split.images[idx].clone(), split.masks[idx].clone()
    flip = torch.rand(batch, generator=gen) < 0.5
    x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
    return x, y


def loss_on(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = F.interpolate(net(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, y, ignore_index=255)


def crop_to(x: torch.Tensor, y: torch.Tensor, size: tuple[int, int], gen: torch.Generator):
    """A random crop of a batch to ``size`` = (h, w) (the same window for every image)."""
    h, w = size
    top = int(torch.randint(x.shape[-2] - h + 1, (1,), generator=gen))
    left = int(torch.randint(x.shape[-1] - w + 1, (1,), generator=gen))
    return x[..., top : top + h, left : left + w], y[..., top : top + h, left : left + w]


def train(
    domains: list[Split],
    steps: int,
    batch: int,
    seed: int,
    init: torch.nn.Module | None = None,
    lr: float = 2e-3,
    joint: bool = False,
    freeze_bn: bool = False,
) -> torch.nn.Module:
    """Adam with a poly schedule; each step takes one batch of every domain and sums their losses (``joint``: one
    forward pass over the batches concatenated, the first domain cropped to the last one's size, so BatchNorm sees
    the mixture it will be evaluated with)."""
    torch.manual_seed(seed)
    net = tiny_net()
    if init is not None:
        net.load_state_dict(init.state_dict())
    opt = torch.optim.Adam([p for p in net.parameters()], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - s / steps) ** 0.9)
    gen = torch.Generator().manual_seed(seed + 1000)
    net.train()
    if (
        freeze_bn
    ):  # as DeepLabV2(freeze_bn=True): running statistics and affine parameters stay as initialised
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
                m.requires_grad_(False)
    for _ in range(steps):
        pairs = [batches(d, batch, gen) for d in domains]
        if joint and len(pairs) > 1:
            size = tuple(pairs[-1][0].shape[-2:])
            pairs = [crop_to(x, y, size, gen) for x, y in pairs[:-1]] + pairs[-1:]
            loss = loss_on(net, torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])) * len(
                pairs
            )
        else:
            loss = sum(loss_on(net, x, y) for x, y in pairs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def with_target_statistics(net: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """A copy of ``net`` whose BatchNorm running statistics are those of ``images`` (a diagnostic, not the method)."""
    net = copy.deepcopy(net)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    net.train()
    for i in range(0, len(images), 32):
        net(images[i : i + 32])
    return net.eval()


@torch.no_grad()
def predict(net: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, argmax) at the image size."""
    confs, preds = [], []
    for i in range(0, len(images), 32):
        x = images[i : i + 32]
        probs = F.interpolate(net(x), size=x.shape[-2:], mode="bilinear", align_corners=False).softmax(1)
        c, p = probs.max(1)
        confs.append(c)
        preds.append(p)
    return torch.cat(confs), torch.cat(preds)


def confusion(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    keep = gt != 255
    return torch.bincount(gt[keep] * NUM_CLASSES + pred[keep], minlength=NUM_CLASSES**2).view(NUM_CLASSES, -1)


def iou(conf: torch.Tensor) -> np.ndarray:
    tp = conf.diag().double()
    denom = conf.sum(0).double() + conf.sum(1).double() - tp
    return torch.where(denom > 0, tp / denom, torch.full_like(tp, float("nan"))).numpy()


def score(net: torch.nn.Module, split: Split) -> np.ndarray:
    return iou(confusion(predict(net, split.images)[1], split.masks))


def pseudo_labels(conf: torch.Tensor, pred: torch.Tensor, cap: float) -> tuple[torch.Tensor, np.ndarray]:
    """Class-wise median thresholds capped at ``cap`` (METHOD.md); a class never predicted gets ``cap``."""
    tau = np.full(NUM_CLASSES, cap)
    for c in range(NUM_CLASSES):
        values = conf[pred == c]
        if values.numel():
            tau[c] = min(cap, float(values.median()))
    keep = conf >= torch.as_tensor(tau, dtype=conf.dtype)[pred]
    return torch.where(keep, pred, torch.full_like(pred, 255)), tau


def label_quality(labels: torch.Tensor, gt: torch.Tensor) -> dict[str, np.ndarray]:
    """Per class c: precision of pixels labelled c, recall of the gt pixels of c, share of c labelled as other."""
    valid = gt != 255
    kept = (labels != 255) & valid
    precision, recall = np.full(NUM_CLASSES, np.nan), np.full(NUM_CLASSES, np.nan)
    for c in range(NUM_CLASSES):
        labelled = kept & (labels == c)
        if labelled.any():
            precision[c] = float((gt[labelled] == c).float().mean())
        present = valid & (gt == c)
        if present.any():
            recall[c] = float(((labels == c) & present).sum() / present.sum())
    return {
        "precision": precision,
        "recall": recall,
        "kept": np.array(float(kept.sum() / valid.sum())),
        "correct": np.array(float((labels[kept] == gt[kept]).float().mean())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=600, help="Adam steps of every network")
    parser.add_argument("--student-steps", type=int, default=None, help="default: --steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cap", type=float, default=0.9)
    parser.add_argument("--student-init", choices=["scratch", "teacher"], nargs="+", default=["scratch"])
    parser.add_argument("--palette", choices=sorted(PALETTES), default="toy")
    parser.add_argument("--realism", type=float, default=None, help="default: the toy's REALISM")
    parser.add_argument("--eval-split", choices=["val", "test"], default="val")
    parser.add_argument("--data-seed", type=int, default=0, help="the toy set's seed (make_toy_data's seed)")
    parser.add_argument("--no-oracle", action="store_true")
    parser.add_argument("--norm", choices=["batch", "group"], default="batch")
    parser.add_argument("--freeze-bn", action="store_true", help="student: BatchNorm frozen as initialised")
    parser.add_argument("--student-lr", type=float, default=2e-3)
    parser.add_argument("--joint", action="store_true", help="one forward pass over source + target batches")
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep / reuse trained teachers in")
    parser.add_argument("--source-count", type=int, default=200, help="source images (the toy's num_source)")
    parser.add_argument(
        "--target-count", type=int, default=200, help="target train images (num_target_train)"
    )
    parser.add_argument(
        "--target-statistics",
        action="store_true",
        help="pseudo labels from the teacher with its BatchNorm statistics re-estimated on the target train images",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="append a JSON line per seed here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    student_steps = args.student_steps or args.steps

    global NORM
    NORM = args.norm
    realism = toy.REALISM if args.realism is None else args.realism
    toy.REAL_STYLE = PALETTES[args.palette](realism)
    palette_name = f"{args.palette}@{realism}" + ("" if args.norm == "batch" else f"-{args.norm}")
    start = time.perf_counter()
    ds = args.data_seed
    source = render_split("source", 0, args.source_count, (288, 160), (144, 80), ds)
    target = render_split("target", 1, args.target_count, (256, 128), (128, 64), ds)
    evaluation = render_split(
        "target",
        2 if args.eval_split == "val" else 3,
        50 if args.eval_split == "val" else 100,
        (256, 128),
        (128, 64),
        ds,
    )
    print(f"data {time.perf_counter() - start:.0f} s", flush=True)

    for seed in args.seeds:
        t0 = time.perf_counter()
        teacher = None
        sources = "" if args.source_count == 200 else f"_n{args.source_count}"
        cached = (
            args.cache / f"teacher_{palette_name}_d{ds}{sources}_s{seed}_{args.steps}.pt"
            if args.cache
            else None
        )
        if cached is not None and cached.is_file():
            teacher = tiny_net()
            teacher.load_state_dict(torch.load(cached))
            teacher.eval()
        else:
            teacher = train([source], args.steps, args.batch, seed)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save(teacher.state_dict(), cached)
        teacher_adabn = np.nanmean(score(with_target_statistics(teacher, target.images), evaluation)) * 100
        print(f"seed {seed}: No Pseudo with target BatchNorm statistics {teacher_adabn:.1f}", flush=True)
        teacher_iou = score(teacher, evaluation)
        labeller = with_target_statistics(teacher, target.images) if args.target_statistics else teacher
        conf, pred = predict(labeller, target.images)
        labels, tau = pseudo_labels(conf, pred, args.cap)
        quality = label_quality(labels, target.masks)
        print(
            f"seed {seed}: No Pseudo {np.nanmean(teacher_iou) * 100:.1f}, labels {float(quality['correct']) * 100:.0f}% "
            f"correct / {float(quality['kept']) * 100:.0f}% kept ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        oracle_iou = (
            None if args.no_oracle else score(train([target], args.steps, args.batch, seed), evaluation)
        )
        if oracle_iou is not None:
            print(f"seed {seed}: Oracle {np.nanmean(oracle_iou) * 100:.1f}", flush=True)
        for student_init in args.student_init:
            init = teacher if student_init == "teacher" else None
            student = train(
                [source, Split(target.images, labels)],
                student_steps,
                args.batch,
                seed + 1,
                init=init,
                joint=args.joint,
                freeze_bn=args.freeze_bn,
                lr=args.student_lr,
            )
            student_adabn = (
                np.nanmean(score(with_target_statistics(student, target.images), evaluation)) * 100
            )
            print(
                f"seed {seed}: Pseudo-Only ({student_init}) with target BatchNorm statistics {student_adabn:.1f}",
                flush=True,
            )
            report(
                args,
                seed,
                student_init,
                palette_name,
                teacher_iou,
                score(student, evaluation),
                oracle_iou,
                quality,
                tau,
                t0,
                {"no_pseudo": float(teacher_adabn), "pseudo_only": float(student_adabn)},
            )


def report(
    args,
    seed,
    student_init,
    palette_name,
    teacher_iou,
    student_iou,
    oracle_iou,
    quality,
    tau,
    t0,
    target_stats,
) -> None:
    student_steps = args.student_steps or args.steps
    record = {
        "seed": seed,
        "student_init": student_init,
        "joint": args.joint,
        "freeze_bn": args.freeze_bn,
        "labels_target_statistics": args.target_statistics,
        "student_lr": args.student_lr,
        "palette": palette_name,
        "steps": args.steps,
        "source_count": args.source_count,
        "target_count": args.target_count,
        "student_steps": student_steps,
        "no_pseudo": float(np.nanmean(teacher_iou) * 100),
        "pseudo_only": float(np.nanmean(student_iou) * 100),
        "oracle": None if oracle_iou is None else float(np.nanmean(oracle_iou) * 100),
        "with_target_statistics": target_stats,  # both networks scored with BatchNorm statistics of the target
        "labels_kept": float(quality["kept"]),
        "labels_correct": float(quality["correct"]),
        "per_class": {
            name: {
                "no_pseudo": _pct(teacher_iou[c]),
                "pseudo_only": _pct(student_iou[c]),
                "oracle": None if oracle_iou is None else _pct(oracle_iou[c]),
                "precision": _pct(quality["precision"][c]),
                "recall": _pct(quality["recall"][c]),
                "tau": float(tau[c]),
            }
            for c, name in enumerate(CLASS_NAMES)
            if not np.isnan(teacher_iou[c]) or not np.isnan(student_iou[c])
        },
        "seconds": time.perf_counter() - t0,
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    print(
        f"seed {seed}: No Pseudo {record['no_pseudo']:.1f}  Pseudo-Only {record['pseudo_only']:.1f}  "
        f"Oracle {_fmt(record['oracle'])}  "
        f"labels {record['labels_correct'] * 100:.0f}% correct / {record['labels_kept'] * 100:.0f}% kept  "
        f"({record['seconds']:.0f} s)",
        flush=True,
    )
    for name, row in record["per_class"].items():
        print(
            f"  {name:14s} teacher {_fmt(row['no_pseudo'])} student {_fmt(row['pseudo_only'])} "
            f"oracle {_fmt(row['oracle'])} PL prec {_fmt(row['precision'])} rec {_fmt(row['recall'])} "
            f"tau {row['tau']:.2f}"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:5.1f}"


def _pct(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value) * 100, 1)


if __name__ == "__main__":
    main()
