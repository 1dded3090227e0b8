"""Why the residual self-attention loss (8) can grow without bound: per-step curves and the ablations that separate
the candidate causes, every run from one starting point (the same pseudo labels, SAM and initialisation).

With the target detached, the gradient of (8) on the logits is ``-2 SAM(P) / numel``: it pushes ``P`` towards
``P + SAM(P)``, a target that moves with ``P``. ``SAM(P) = Â P`` with ``Â`` non-negative and row-stochastic, so the
part of ``P`` that every pixel shares is pushed to grow; along the class-uniform direction (the same shift added to
every class) the cross-entropy has no gradient at all (softmax ignores it), so nothing opposes that growth except
weight decay. Eq. (9) has the fixed point ``P = SAM(P)`` instead. This script measures, for each setting, per logged
step:

- ``logit_norm``: mean L2 norm of a target pixel's logit row ``|P_i|`` (what ``train/logit_norm`` logs);
- ``shift``: mean over target pixels of ``mean_c P_ic``, the class-uniform component that softmax ignores;
- every loss term (``loss_seg_source``, ``loss_seg_target``, ``loss_sa_source``, ``loss_sa_target``);
- ``grad_seg``, ``grad_sa``: norms of the gradients of ``L_seg(t)`` and of ``lambda * L_sa(t)`` on the target logits,
  and ``grad_sa_shift``: the share of the latter along the class-uniform direction;

and, at the end, the target validation mIoU. Before training, a probe measures how strongly the loss feeds the
class-uniform component back into itself: one plain gradient step of ``lambda * L_sa`` alone, of size ``eps``, moves
the mean logit ``u`` by ``a * eps * u`` (``gain`` a; the first-order rate of the mode, backbone included). Under SGD
with momentum ``mu`` and learning rate ``lr`` that mode alone grows by the factor ``rho`` per step, the larger root of
``rho^2 - (1 + mu + lr * a) rho + mu = 0``; the table sets it next to the factor measured over the first 10 steps
and over the last 50. ``python benchmarks/sam_divergence.py --probe`` prints the gain for a network and weights of
your own. Settings change one thing at a time from the toy's former Ours stage
(Adam 1e-3, lambda 0.1, trainable BatchNorm, trained SAM, eq. (8)&(10)); see ``SETTINGS``.

Usage (the inputs come from a toy pipeline run, or from ``--prepare``, which trains them)::

    python benchmarks/sam_divergence.py --prepare runs/divergence --data-root data/toy
    python benchmarks/sam_divergence.py --start runs/divergence --data-root data/toy --steps 200 \\
        --output benchmarks/results/sam_divergence_toy_cpu
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

from uda_sam.data import GTA5, Cityscapes, SegmentationTransform  # noqa: E402
from uda_sam.data.labels import IGNORE_INDEX  # noqa: E402
from uda_sam.datamodules import UDADataModule  # noqa: E402
from uda_sam.nn import (  # noqa: E402
    DeepLabV2,
    SelfAttentionLoss,
    SelfAttentionModule,
    logit_norm,
    self_attention_loss,
)
from uda_sam.nn.sam_io import load_network_weights  # noqa: E402
from uda_sam.tasks import SelfTraining  # noqa: E402

#: The toy's former Ours stage (configs/toy/ours.yaml before this study); every setting changes it.
BASE: dict[str, Any] = {
    "optimizer": "adam",
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "classifier_lr_mult": 1.0,
    "lambda_sa": 0.1,
    "sa_target": "residual",
    "sa_domains": "both",
    "attention": "trained",  # trained SAM | noconv (parameter-free SAM) | labels (rows uniform over same-class pixels)
    "freeze_bn": False,
    "init": "random",  # random (the toy's stage-2 start) | no_pseudo (the No Pseudo network: trained features)
}
SGD = {"optimizer": "sgd", "lr": 1e-2, "weight_decay": 5e-4}

SETTINGS: dict[str, dict[str, Any]] = {
    "(8), adam, lambda 0.1": {},
    "pseudo-only, adam": {"lambda_sa": 0.0},
    "(8), sgd, lambda 0.1": {**SGD},
    "pseudo-only, sgd": {**SGD, "lambda_sa": 0.0},
    "(9), adam, lambda 0.1": {"sa_target": "attended"},
    "(9), sgd, lambda 0.1": {**SGD, "sa_target": "attended"},
    "(8), adam, lambda 0.01": {"lambda_sa": 0.01},
    "(8), adam, lambda 0.001": {"lambda_sa": 0.001},
    "(8), sgd, lambda 0.025": {**SGD, "lambda_sa": 0.025},
    "(8), sgd, lambda 0.0025": {**SGD, "lambda_sa": 0.0025},
    "(8), adam, lambda 0.0001": {"lambda_sa": 1e-4},
    "(8), sgd, lambda 0.0001": {**SGD, "lambda_sa": 1e-4},
    "(8), sgd lr/4, lambda 0.01": {**SGD, "lr": 2.5e-3, "lambda_sa": 0.01},
    "(8), sgd, label attention": {**SGD, "attention": "labels"},
    "(8), sgd, no conv": {**SGD, "attention": "noconv"},
    "(8), sgd, frozen BN": {**SGD, "freeze_bn": True},
    "(8), sgd, trained start, frozen BN": {**SGD, "init": "no_pseudo", "freeze_bn": True},
    "(8), sgd, trained start, frozen BN, lambda 0.0025": {
        **SGD,
        "init": "no_pseudo",
        "freeze_bn": True,
        "lambda_sa": 0.0025,
    },
}


CURVE_FIELDS = [
    "setting",
    "step",
    "loss",
    "loss_seg_source",
    "loss_seg_target",
    "loss_sa_source",
    "loss_sa_target",
    "logit_norm",
    "shift",
    "grad_seg",
    "grad_sa",
    "grad_sa_shift",
    "lr",
]


class LabelAttention(nn.Module):
    """An attention made from labels: row ``i`` is uniform over the pixels of ``i``'s class (an ignored pixel
    attends to itself), so ``SAM(P)_i`` is the mean logit row of ``i``'s class in the image. Set ``labels``
    (``(B, H, W)`` trainIds) before each call."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.labels: Tensor | None = None

    def forward(self, logits: Tensor) -> Tensor:
        assert self.labels is not None, "LabelAttention.labels must be set before the call"
        batch, channels, height, width = logits.shape
        labels = F.interpolate(self.labels[:, None].float(), size=(height, width), mode="nearest")[
            :, 0
        ].long()
        flat = labels.flatten(1)
        num = flat.shape[1]
        # Ignored pixels get a class of their own each (their index past the real classes): they attend to themselves.
        own = torch.arange(num, device=flat.device).expand_as(flat) + self.num_classes
        groups = torch.where(flat == IGNORE_INDEX, own, flat)
        onehot = F.one_hot(groups, self.num_classes + num).float()  # (B, N, K)
        rows = logits.flatten(2).transpose(1, 2)  # (B, N, C)
        class_sum = onehot.transpose(1, 2) @ rows  # (B, K, C)
        class_count = onehot.sum(1).clamp_min(1)[..., None]
        mixed = onehot @ (class_sum / class_count)
        return mixed.transpose(1, 2).reshape(batch, channels, height, width)


class LabelAttentionLoss(SelfAttentionLoss):
    """The self-attention loss with a :class:`LabelAttention` for SAM, its labels set before each domain's term."""

    def __init__(self, labels_of: Callable[[Tensor], Tensor], **kwargs: Any) -> None:
        super().__init__(SelfAttentionModule(19, use_conv=False), **kwargs)
        self.sam = LabelAttention(19)  # type: ignore[assignment]
        self.labels_of = labels_of

    def term(self, logits: Tensor, features: Tensor | None = None) -> Tensor:
        self.sam.labels = self.labels_of(logits)  # type: ignore[union-attr]
        return super().term(logits, features)


class DiagnosedSelfTraining(SelfTraining):
    """``SelfTraining`` that also measures the logits and the per-term gradients on them every ``every`` steps."""

    def __init__(
        self, *args: Any, every: int = 10, target_gt: dict[str, Tensor] | None = None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.every = every
        self.target_gt = target_gt or {}
        self.records: list[dict[str, float]] = []
        self._outputs: list[Tensor] = []
        self._terms: dict[str, Tensor] = {}
        self.network.register_forward_hook(lambda _m, _i, out: self._outputs.append(out))

    def log_losses(self, total: Tensor, terms: dict[str, Tensor], *args: Any, **kwargs: Any) -> None:
        self._terms = dict(terms)
        super().log_losses(total, terms, *args, **kwargs)

    def _labels_of(self, logits: Tensor) -> Tensor:
        batch = self._batch
        if logits is self._outputs[-1]:  # the target pass runs last
            return torch.stack([self.target_gt[name] for name in batch["target"]["name"]]).to(logits.device)
        return batch["source"]["mask"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self._outputs.clear()
        self._batch = batch
        total = super().training_step(batch, batch_idx)
        if self.global_step % self.every == 0:
            self.records.append(self._measure(total))
        return total

    def _measure(self, total: Tensor) -> dict[str, float]:
        logits_t = self._outputs[-1]
        record: dict[str, float] = {"step": float(self.global_step), "loss": float(total.detach())}
        record.update({name: float(value.detach()) for name, value in self._terms.items()})
        record["logit_norm"] = float(logit_norm(logits_t))
        record["shift"] = float(logits_t.detach().mean(dim=1).mean())
        record["lr"] = float(self.trainer.optimizers[0].param_groups[0]["lr"])
        if "loss_seg_target" in self._terms:
            (grad,) = torch.autograd.grad(self._terms["loss_seg_target"], logits_t, retain_graph=True)
            record["grad_seg"] = float(grad.norm())
        if "loss_sa_target" in self._terms:
            assert self.self_attention is not None
            (grad,) = torch.autograd.grad(
                self.self_attention.weight * self._terms["loss_sa_target"], logits_t, retain_graph=True
            )
            norm = grad.norm()
            record["grad_sa"] = float(norm)
            shift = grad.mean(dim=1, keepdim=True).expand_as(grad)
            record["grad_sa_shift"] = float(shift.norm() / norm.clamp_min(1e-30))
        return record


class StopWhenNonFinite(Callback):
    """End a diagnostic run at the first non-finite loss (the curve up to it is what is wanted)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            pl_module.nonfinite_step = trainer.global_step
            trainer.should_stop = True


def _datamodule(data_root: Path, pseudo_labels: Path | None) -> UDADataModule:
    return UDADataModule(
        source=GTA5(data_root / "gta5"),
        target=Cityscapes(data_root / "cityscapes"),
        source_size=(144, 80),
        target_size=(128, 64),
        pseudo_label_root=str(pseudo_labels) if pseudo_labels else None,
        batch_size=2,
        val_batch_size=4,
        num_workers=0,
        persistent_workers=False,
    )


def _target_ground_truth(data_root: Path) -> dict[str, Tensor]:
    dataset = Cityscapes(
        data_root / "cityscapes", split="train", labels="gt", transform=SegmentationTransform(size=(128, 64))
    )
    return {sample["name"]: sample["mask"] for sample in (dataset[i] for i in range(len(dataset)))}


def uniform_mode_gain(
    network: nn.Module, sam: nn.Module, images: Tensor, lambda_sa: float, target: str, eps: float = 1e-4
) -> float:
    """The gain ``a`` of the class-uniform mode: a step ``-eps * grad(lambda * L_sa)`` moves ``u = mean(P)`` by
    ``a * eps * u`` (measured on a copy of ``network`` in train mode, first order in ``eps``)."""
    probe = copy.deepcopy(network).train()
    params = [q for q in probe.parameters() if q.requires_grad]
    logits = probe(images)
    before = float(logits.detach().mean())
    grads = torch.autograd.grad(lambda_sa * self_attention_loss(logits, sam, target=target), params)
    with torch.no_grad():
        for param, grad in zip(params, grads, strict=True):
            param -= eps * grad
        after = float(probe(images).mean())
    return (after - before) / (eps * before)


def momentum_growth(gain: float, lr: float, momentum: float) -> float:
    """The per-step growth factor of a mode with gradient gain ``gain`` under SGD with momentum (larger root)."""
    b = 1.0 + momentum + lr * gain
    return (b + math.sqrt(b * b - 4.0 * momentum)) / 2.0


def _measured_growth(records: list[dict[str, float]], first: int, last: int) -> float:
    """``exp(mean d ln|shift| / d step)`` between the records at steps ``first`` and ``last`` (nan if missing)."""
    by_step = {int(r["step"]): abs(r["shift"]) for r in records}
    a, b = by_step.get(first), by_step.get(last)
    if not a or not b or not math.isfinite(a) or not math.isfinite(b):
        return float("nan")
    return math.exp((math.log(b) - math.log(a)) / (last - first))


def probe_config(cli_args: list[str]) -> str:
    """The gain of the class-uniform mode for a training config's network, SAM and lambda, and what it predicts
    over the config's schedule (SGD: the product of the per-step factors along the poly learning rates)."""
    from uda_sam.cli.lightning import UDASamCLI

    cli = UDASamCLI(args=[*cli_args, "--trainer.logger=false"], run=False)
    model, datamodule = cli.model, cli.datamodule
    loss = getattr(model, "self_attention", None)
    if loss is None or loss.sam is None or not loss.weight:
        return "the config trains no self-attention loss on the prediction layer (no self_attention, weight 0 or no sam)"
    datamodule.setup("fit")
    images = torch.stack([datamodule.target_train[i]["image"] for i in range(2)])
    gain = uniform_mode_gain(model.network, loss.sam, images, loss.weight, loss.target)
    lines = [f"gain a of the class-uniform mode at weight={loss.weight}, {loss.target}: {gain:.4g}"]
    steps = cli.trainer.max_steps
    if model.optimizer_name == "sgd" and steps and steps > 0:
        total = sum(
            math.log(momentum_growth(gain, model.lr * (1 - t / steps) ** model.poly_power, model.momentum))
            for t in range(steps)
        )
        lines.append(
            f"SGD (lr {model.lr}, momentum {model.momentum}, poly {model.poly_power}) over {steps} steps: the mode "
            f"grows by e^{total:.3g} at the gain of the start (it rises as training scales the features up); "
            "keep it below e^1, e.g. with the weight scaled down by that exponent"
        )
    else:
        lines.append(
            "Adam normalises each step: the mode drifts by about lr per parameter and step, whatever lambda"
        )
    return "\n".join(lines)


def run_setting(
    name: str, overrides: dict[str, Any], start: Path, data_root: Path, steps: int, every: int, seed: int
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Train one setting from the shared start; returns its per-step records and a summary."""
    options = {**BASE, **overrides}
    seed_everything(seed, verbose=False)
    network = DeepLabV2(19, backbone="resnet18", pretrained=None, freeze_bn=options["freeze_bn"])
    if options["init"] == "no_pseudo":
        load_network_weights(network, start / "no_pseudo.ckpt", "start")
    lambda_sa = options["lambda_sa"]
    attention = options["attention"]
    loss_options = {"weight": lambda_sa, "target": options["sa_target"], "domains": options["sa_domains"]}
    self_attention = None
    if lambda_sa > 0 and attention == "trained":
        self_attention = SelfAttentionLoss(str(start / "sam.pt"), **loss_options)
    elif lambda_sa > 0 and attention == "noconv":
        self_attention = SelfAttentionLoss(SelfAttentionModule(19, use_conv=False), **loss_options)
    task = DiagnosedSelfTraining(
        network,
        self_attention=self_attention,
        optimizer=options["optimizer"],
        lr=options["lr"],
        momentum=options["momentum"],
        weight_decay=options["weight_decay"],
        classifier_lr_mult=options["classifier_lr_mult"],
        num_val_images_logged=0,
        every=every,
        target_gt=_target_ground_truth(data_root) if attention == "labels" else None,
    )
    if attention == "labels":  # a label-made attention: set after construction (it reads the task's batch)
        task.self_attention = LabelAttentionLoss(task._labels_of, **loss_options)
    task.nonfinite_step = None
    datamodule = _datamodule(data_root, start / "pseudo_labels")
    datamodule.setup("fit")
    images = torch.stack([datamodule.target_train[i]["image"] for i in range(2)])
    gain = float("nan")
    if task.self_attention is not None:
        sam = task.self_attention.sam
        if isinstance(sam, LabelAttention):
            sam.labels = torch.stack([task.target_gt[datamodule.target_train[i]["name"]] for i in range(2)])
        gain = uniform_mode_gain(task.network, sam, images, lambda_sa, options["sa_target"])
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[StopWhenNonFinite()],
    )
    began = time.monotonic()
    trainer.fit(task, datamodule=datamodule)
    seconds = time.monotonic() - began
    miou = float("nan")
    if task.nonfinite_step is None:
        trainer = Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        miou = float(trainer.validate(task, datamodule=datamodule, verbose=False)[0]["val/mIoU"])
    records = task.records
    first, last = records[0], records[-1]
    summary = {
        "setting": name,
        "options": {k: v for k, v in options.items() if BASE.get(k) != v},
        "first_logit_norm": first["logit_norm"],
        "last_logit_norm": last["logit_norm"],
        "max_logit_norm": max(r["logit_norm"] for r in records),
        "first_loss": first["loss"],
        "last_loss": last["loss"],
        "last_shift": last["shift"],
        "sa_over_seg": _median_ratio(records),
        "gain": gain,
        "predicted_growth": momentum_growth(gain, options["lr"], options["momentum"])
        if options["optimizer"] == "sgd" and math.isfinite(gain)
        else float("nan"),
        "growth_first_10": _measured_growth(records, 0, 10),
        "growth_last_50": _measured_growth(records, steps - 10 - 50, steps - 10),
        "nonfinite_step": task.nonfinite_step,
        "val_miou": miou,
        "seconds": seconds,
    }
    return records, summary


def _median_ratio(records: list[dict[str, float]]) -> float:
    ratios = sorted(r["grad_sa"] / r["grad_seg"] for r in records if r.get("grad_seg") and "grad_sa" in r)
    return ratios[len(ratios) // 2] if ratios else float("nan")


def prepare(out: Path, data_root: Path, steps: int, seed: int) -> None:
    """Train the No Pseudo network and the SAM with the toy's stage-0/1 settings and make generation 1's labels."""
    from uda_sam.pseudo_labels.generation import generate_pseudo_labels
    from uda_sam.tasks import SAMPretraining

    out.mkdir(parents=True, exist_ok=True)
    datamodule = _datamodule(data_root, None)
    common = {
        "optimizer": "adam",
        "lr": 1e-3,
        "weight_decay": 0.0,
        "classifier_lr_mult": 1.0,
        "num_val_images_logged": 0,
    }
    for name, build in (
        ("no_pseudo", lambda net: SelfTraining(net, use_target=False, **common)),
        ("sam_pretrain", lambda net: SAMPretraining(net, **common)),
    ):
        seed_everything(seed, verbose=False)
        task = build(DeepLabV2(19, backbone="resnet18", pretrained=None, freeze_bn=False))
        trainer = Trainer(
            accelerator="cpu",
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        trainer.fit(task, datamodule=datamodule)
        trainer.save_checkpoint(out / f"{name}.ckpt")
        if name == "sam_pretrain":
            task.export_sam(out / "sam.pt")
    network = DeepLabV2(19, backbone="resnet18", pretrained=None, freeze_bn=False)
    load_network_weights(network, out / "no_pseudo.ckpt", "no_pseudo")
    datamodule.setup("fit")
    generate_pseudo_labels(
        network, datamodule.target_inference_dataset(), out / "pseudo_labels", num_workers=0
    )


def _table(summaries: list[dict[str, Any]]) -> str:
    lines = [
        "| setting | logit norm: first → max → last | loss: first → last | class-uniform shift (last) | "
        "median grad λ·L_sa / L_seg(t) on P | gain a | shift growth per step: predicted (SGD) / first 10 / "
        "last 50 | first non-finite step | val mIoU (%) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        nonfinite = "" if s["nonfinite_step"] is None else str(s["nonfinite_step"])
        miou = "n/a" if math.isnan(s["val_miou"]) else f"{100 * s['val_miou']:.1f}"
        lines.append(
            f"| {s['setting']} | {s['first_logit_norm']:.3g} → {s['max_logit_norm']:.3g} → {s['last_logit_norm']:.3g} "
            f"| {s['first_loss']:.3g} → {s['last_loss']:.3g} | {s['last_shift']:.3g} | {s['sa_over_seg']:.3g} "
            f"| {s['gain']:.3g} | {s['predicted_growth']:.3g} / {s['growth_first_10']:.3g} / {s['growth_last_50']:.3g} "
            f"| {nonfinite} | {miou} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prepare", type=Path, help="train the shared start (No Pseudo, SAM, labels) into this folder"
    )
    parser.add_argument("--start", type=Path, help="a folder made by --prepare")
    parser.add_argument(
        "--probe",
        nargs=argparse.REMAINDER,
        help="uda-sam fit arguments of a stage-2 config (e.g. --config configs/toy/ours.yaml): print its gain and "
        "the growth it predicts over the schedule; must come last",
    )
    parser.add_argument("--data-root", type=Path, default=Path("data/toy"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prepare-steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=10, help="measure every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", nargs="+", help=f"a subset of: {list(SETTINGS)}")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("benchmarks/results/sam_divergence_toy_cpu"),
        help="prefix of the .md summary and the .csv curves",
    )
    args = parser.parse_args()
    if args.probe:
        print(probe_config(args.probe))
        return
    if args.prepare:
        prepare(args.prepare, args.data_root, args.prepare_steps, args.seed)
        return
    if args.start is None:
        parser.error("give --prepare DIR or --start DIR")
    names = args.settings or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; known: {list(SETTINGS)}")

    # Results accumulate setting by setting (a killed run resumes where it stopped).
    args.output.parent.mkdir(parents=True, exist_ok=True)
    summary_file, curve_file = args.output.with_suffix(".jsonl"), args.output.with_suffix(".csv")
    done = (
        [json.loads(line) for line in summary_file.read_text().splitlines()] if summary_file.is_file() else []
    )
    for name in names:
        if any(s["setting"] == name for s in done):
            continue
        records, summary = run_setting(
            name, SETTINGS[name], args.start, args.data_root, args.steps, args.every, args.seed
        )
        new_file = not curve_file.is_file()
        with open(curve_file, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CURVE_FIELDS, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerows({"setting": name, **r} for r in records)
        with open(summary_file, "a") as handle:
            handle.write(json.dumps(summary) + "\n")
        done.append(summary)
        print(_table([summary]).splitlines()[-1], flush=True)
    summaries = [s for name in names for s in done if s["setting"] == name]

    text = [
        "# The self-attention loss on the toy pair: curves and ablations from one start",
        "",
        f"`python benchmarks/sam_divergence.py --start {args.start} --steps {args.steps}`, seed {args.seed}; "
        f"machine: {json.dumps(machine_info('cpu'))}",
        "",
        _table(summaries),
        "",
        f"Per-step curves: `{curve_file.name}`; summaries: `{summary_file.name}`.",
    ]
    args.output.with_suffix(".md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
