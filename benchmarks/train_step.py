"""Time the self-training step three ways: plain PyTorch, ``SelfTraining`` through ``Trainer``, and bf16.

One step is the stage-2 objective of docs/METHOD.md (10) with the residual target (8): one source image with
labels and one target image with pseudo labels, ``L = L_seg(s) + L_seg(t) + lambda * (L_sa(s) + L_sa(t))`` with a
frozen SAM (``lambda = 0.1``), SGD (momentum 0.9, weight decay 5e-4, lr 2.5e-4, classifier 10x, fused on CUDA)
built from the package's parameter groups, and the poly schedule stepped every iteration. Variants
(``--variants``):

- ``plain-<prec>``: the same network, optimiser and losses (``SelfTraining.compute_losses``) in a loop written
  here instead of ``Trainer`` (``torch.autocast`` for bf16);
- ``lightning-<prec>``: :class:`uda_sam.tasks.SelfTraining` through ``lightning.Trainer`` (``precision="32-true"``
  or ``"bf16-mixed"``; no logger, checkpointing, validation nor progress bar), timed by a callback;
- ``...-nosam``: the same with ``lambda = 0`` (the SAM is neither built nor run): the SAM's share of the step;
- ``lightning-<prec>-stage0`` / ``-stage1``: the source-only steps of stage 0 (``SegmentationTask``) and of SAM
  pretraining (``SAMPretraining``), the other two step kinds of the full pipeline;
- ``...-compile``: the network compiled in place with ``torch.compile`` (``--compile`` adds the bf16 pair);
- ``...-cl``: the network and the input images in ``torch.channels_last`` (NHWC) memory format, e.g.
  ``plain-bf16-cl``: cuDNN's tensor-core convolutions work in NHWC, so NCHW tensors are converted around them.

Every variant starts from the same weights (one seeded network with ``pretrained=None``, made trainable by
:func:`prepare_random_network`: residual-branch BatchNorm scales 0.1, statistics measured on random images) and
sees the same batch at every step: random normalised images and blocky random labels (35 % of the target pseudo
labels set to 255), pinned in host memory and copied to the device every iteration, as a loader's batch would be.

Timing: CUDA is synchronised at the start and at the end of every step. ``ms/step`` is the median of the step
itself (Lightning: ``on_train_batch_start`` -> ``on_train_batch_end``, which includes the optimiser and scheduler
steps; plain loop: forward -> optimiser and scheduler steps), ``ms/iteration`` the median time between two step
starts (adds fetching the batch, the host-to-device copy and the loop's own work). Peak GPU memory is
``torch.cuda.max_memory_allocated`` over one variant's timed steps (reset at the first: the warm-up's cuDNN
algorithm search allocates workspaces far beyond what a step needs). The total losses of the first steps are
compared between fp32 and bf16. On CUDA one warm-up step per variant also runs under
``torch.cuda.set_sync_debug_mode("warn")`` to list the operations that make the host wait for the GPU.

Defaults: CUDA: DeepLabV2-ResNet101, 1024x512 source and target, 10 warm-up + 30 timed steps, cudnn.benchmark on.
CPU: DeepLabV2-ResNet18 at 256x128, 5 warm-up + 10 timed steps (a smoke run of the same code; not a GPU figure).

``--time-box SECONDS`` bounds the whole run: each variant gets an even share of what is left and stops after the
step that ends its share (its figures then cover fewer timed steps, counted in the report), but always takes its
warm-up and ``MIN_TIMED_STEPS`` timed steps unless the whole box is used up; variants left when the box is used up
are recorded as skipped. The default variants come in the order the targets need them. The report is rewritten after every variant, so a run cut short still leaves it.

``--profile DIR``: after a variant's timed steps, 1 + 3 more steps run under ``torch.profiler`` (CPU activity, and
CUDA activity on CUDA; see ``benchmarks/profiling.py``) and ``DIR/<variant>_profile.txt`` gets a compact table of
the operators and kernels that take the time, with a line of totals per step: wall time, busy time (the device's
on CUDA), and the shares of convolution kernels and of layout-conversion / copy kernels. The totals also go into
the JSON report (``profile`` of each variant) and the Markdown report. These steps are not timed and are taken
whatever is left of the time box (a variant that timed nothing is not profiled).

Usage (from the repository root)::

    python benchmarks/train_step.py                            # all default variants
    python benchmarks/train_step.py --size 2048 1024 --variants lightning-bf16 lightning-bf16-nosam plain-bf16
    python benchmarks/train_step.py --compile                  # adds plain-bf16-compile, lightning-bf16-compile
    python benchmarks/train_step.py --source-size 1280 720     # the paper's GTA5 source size (projections)
    python benchmarks/train_step.py --variants plain-bf16 plain-bf16-cl --steps 8 --profile /tmp/profile

Writes ``benchmarks/results/train_step_<machine>[_<size>][_src<size>][_compile].md`` and ``.json`` (``--out-dir``,
``--stem``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset
from torchvision.models.resnet import BasicBlock, Bottleneck

try:
    import uda_sam  # noqa: F401
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning.pytorch import Callback, LightningModule, Trainer
from machine import machine_info  # benchmarks/machine.py (the script's folder is on sys.path)
from profiling import PROFILE_STEPS, PROFILE_WARMUP, StepProfiler  # benchmarks/profiling.py
from timing import Share, SyncCounter, TimeBox, synchronized_time  # benchmarks/timing.py

from uda_sam.cli.console import quiet_console
from uda_sam.nn import DeepLabV2, SelfAttentionLoss, SelfAttentionModule
from uda_sam.nn.sam_io import save_sam
from uda_sam.tasks import SAMPretraining, SegmentationTask, SelfTraining
from uda_sam.tasks.optim import build_optimizer, lr_factor, trainable_param_groups

MIB = 2**20
NUM_CLASSES = 19
IGNORE = 255
# The paper's DeepLabV2 recipe (docs/METHOD.md "Training details").
LR = 2.5e-4
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
CLASSIFIER_LR_MULT = 10.0
SCHEDULE_STEPS = 120_000
TASK_KWARGS: dict[str, Any] = {
    "optimizer": "sgd",
    "lr": LR,
    "momentum": MOMENTUM,
    "weight_decay": WEIGHT_DECAY,
    "classifier_lr_mult": CLASSIFIER_LR_MULT,
    "lr_schedule": "poly",
    "schedule_steps": SCHEDULE_STEPS,
    "num_val_images_logged": 0,
}
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
#: In the order the floors need them: a run cut short by its time box keeps the first ones.
DEFAULT_VARIANTS = (
    "plain-fp32",
    "lightning-fp32",
    "plain-bf16",
    "lightning-bf16",
    "lightning-bf16-nosam",
    "plain-bf16-nosam",
    "lightning-bf16-stage0",
    "lightning-bf16-stage1",
)
COMPILE_VARIANTS = ("plain-bf16-compile", "lightning-bf16-compile")
#: Timed steps a variant always takes after its warm-up, whatever its share of the time box (unless the box is used
#: up): a slow first step (cuDNN's algorithm search) must not leave a variant unmeasured, and a median needs
#: enough steps to mean something.
MIN_TIMED_STEPS = 10
_VARIANT_RE = re.compile(
    r"^(?P<runner>plain|lightning)-(?P<precision>fp32|bf16)(?P<task>-stage0|-stage1)?(?P<nosam>-nosam)?"
    r"(?P<compile>-compile)?(?P<cl>-cl)?$"
)


# ------------------------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class Variant:
    """One way of running the step."""

    runner: str  # "plain" | "lightning"
    precision: str  # "fp32" | "bf16"
    task: str = "selftrain"  # "selftrain" | "stage0" | "stage1"
    sam: bool = True
    compile: bool = False
    channels_last: bool = False  # network and input images in torch.channels_last

    @property
    def name(self) -> str:
        parts = [self.runner, self.precision]
        if self.task != "selftrain":
            parts.append(self.task)
        if self.task == "selftrain" and not self.sam:
            parts.append("nosam")
        if self.compile:
            parts.append("compile")
        if self.channels_last:
            parts.append("cl")
        return "-".join(parts)

    def describe(self, lambda_sa: float) -> str:
        if self.task == "stage0":
            return "stage 0: source CE only (SegmentationTask)"
        if self.task == "stage1":
            return "stage 1: source CE of P + SAM(P), SAM trained (SAMPretraining)"
        return f"source + target CE{f' + {lambda_sa:g} * SAM loss' if self.sam else ' (lambda 0)'}"


def parse_variant(text: str) -> Variant:
    """``plain|lightning`` - ``fp32|bf16`` [``-stage0|-stage1``] [``-nosam``] [``-compile``] [``-cl``]."""
    match = _VARIANT_RE.match(text)
    if match is None:
        raise ValueError(
            f"--variants: {text!r} is not <plain|lightning>-<fp32|bf16>[-stage0|-stage1][-nosam][-compile][-cl]"
        )
    task = (match["task"] or "-selftrain")[1:]
    if task != "selftrain" and match["runner"] != "lightning":
        raise ValueError(f"--variants: {text!r}: the stage0/stage1 steps exist only as lightning variants")
    if task != "selftrain" and match["nosam"]:
        raise ValueError(f"--variants: {text!r}: -nosam applies to the self-training step only")
    return Variant(
        match["runner"],
        match["precision"],
        task,
        not match["nosam"],
        bool(match["compile"]),
        bool(match["cl"]),
    )


@dataclass
class Result:
    """Measurements of one variant."""

    variant: Variant
    step_ms: list[float] = field(default_factory=list)
    iteration_ms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    syncs: Counter = field(default_factory=Counter)
    error: str | None = None
    profile: dict[str, Any] | None = None  # the totals of --profile (see profiling.StepProfiler.write)

    @property
    def step(self) -> float:
        return statistics.median(self.step_ms)

    @property
    def iteration(self) -> float:
        return statistics.median(self.iteration_ms)


# ---------------------------------------------------------------------------------------- setup helpers
def blocky_labels(height: int, width: int, generator: torch.Generator, cell: int = 32) -> Tensor:
    """``(1, H, W)`` int64 labels, constant over ``cell x cell`` blocks (segments rather than per-pixel noise)."""
    coarse = torch.randint(0, NUM_CLASSES, (1, 1, -(-height // cell), -(-width // cell)), generator=generator)
    return F.interpolate(coarse.float(), size=(height, width), mode="nearest").long()[:, 0]


def make_batch(
    source_size: tuple[int, int], target_size: tuple[int, int], seed: int, pin: bool
) -> dict[str, dict[str, Tensor]]:
    """A ``UDADataModule``-style batch of one source and one target image; sizes are (width, height)."""
    generator = torch.Generator().manual_seed(seed)
    (ws, hs), (wt, ht) = source_size, target_size
    target_mask = blocky_labels(ht, wt, generator)
    unlabelled = blocky_labels(ht, wt, generator, cell=16) < round(0.35 * NUM_CLASSES)
    target_mask[unlabelled] = IGNORE
    batch = {
        "source": {
            "image": torch.randn(1, 3, hs, ws, generator=generator),
            "mask": blocky_labels(hs, ws, generator),
        },
        "target": {"image": torch.randn(1, 3, ht, wt, generator=generator), "mask": target_mask},
    }
    if pin:
        batch = {d: {k: v.pin_memory() for k, v in s.items()} for d, s in batch.items()}
    return batch


def to_device(batch: dict[str, dict[str, Tensor]], device: torch.device) -> dict[str, dict[str, Tensor]]:
    # ``to`` keeps the memory format of a dense tensor: a channels_last host image stays channels_last.
    return {d: {k: v.to(device, non_blocking=True) for k, v in s.items()} for d, s in batch.items()}


def variant_batch(setup: Setup, variant: Variant) -> dict[str, dict[str, Tensor]]:
    """The shared batch, its images in ``torch.channels_last`` (and pinned again on CUDA) for a ``-cl`` variant."""
    if not variant.channels_last:
        return setup.batch

    def images_last(value: Tensor) -> Tensor:
        if value.dim() != 4:
            return value
        value = value.contiguous(memory_format=torch.channels_last)
        return value.pin_memory() if setup.device.type == "cuda" else value

    return {d: {k: images_last(v) for k, v in s.items()} for d, s in setup.batch.items()}


@torch.no_grad()
def prepare_random_network(
    network: DeepLabV2, size: tuple[int, int], device: torch.device, seed: int
) -> None:
    """Make a randomly initialised DeepLabV2 trainable with frozen BatchNorm, as a stand-in for ImageNet weights.

    With BatchNorm frozen at its initial statistics (mean 0, variance 1) activations grow block after block and
    the first SGD steps diverge (ResNet18 at 256x128: the loss reached inf at step 4), which would make the
    fp32/bf16 loss comparison meaningless. So the last BatchNorm of every residual branch gets the scale 0.1 (as in
    SkipInit/Fixup) and all statistics are measured on random images. This changes values only, never the work of
    a step.
    """
    for block in network.backbone.modules():
        if isinstance(block, Bottleneck):
            block.bn3.weight.fill_(0.1)
        elif isinstance(block, BasicBlock):
            block.bn2.weight.fill_(0.1)
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(2, 3, max(64, size[1] // 4), max(64, size[0] // 4), generator=generator).to(device)
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batch
        norm.train()
    network.backbone(images)
    for norm in norms:
        norm.momentum = 0.1
    network.train()  # DeepLabV2.train puts the frozen BatchNorm layers back in eval mode


@dataclass
class Setup:
    """Everything the variants share."""

    device: torch.device
    base_network: DeepLabV2
    sam_path: Path
    batch: dict[str, dict[str, Tensor]]
    warmup: int
    steps: int
    lambda_sa: float
    debug_step: int | None  # the warm-up step run under the sync debug mode (CUDA only)
    profile_dir: Path | None = None  # --profile: where the profile tables go
    share: Share = field(default_factory=lambda: TimeBox(None).allot(1))  # when the running variant stops

    @property
    def total_steps(self) -> int:
        # One step more than measured: the last timed iteration ends when the next step starts.
        return self.warmup + self.steps + 1

    @property
    def min_steps(self) -> int:
        """Steps a variant always takes (unless the whole box is used up): warm-up + ``MIN_TIMED_STEPS`` timed."""
        return min(self.warmup + MIN_TIMED_STEPS + 1, self.total_steps)


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak GPU memory afresh (at the first timed step: the warm-up's cuDNN algorithm search allocates
    workspaces far beyond what a step needs, up to the whole GPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def fresh_network(setup: Setup, variant: Variant) -> DeepLabV2:
    network = copy.deepcopy(setup.base_network)
    if variant.channels_last:
        network = network.to(memory_format=torch.channels_last)
    if variant.compile:
        network.compile()
    return network


def timed_range(setup: Setup, num_starts: int) -> range:
    """Indices of the timed steps among ``num_starts`` started ones (a step's iteration ends at the next start)."""
    return range(setup.warmup, min(setup.warmup + setup.steps, num_starts - 1))


def summarise(
    result: Result, starts: list[float], ends: list[float], losses: list[Tensor], setup: Setup
) -> None:
    timed = timed_range(setup, min(len(starts), len(ends) + 1))
    result.step_ms = [1000 * (ends[i] - starts[i]) for i in timed]
    result.iteration_ms = [1000 * (starts[i + 1] - starts[i]) for i in timed]
    result.losses = [float(loss) for loss in losses]
    if not timed:
        result.error = f"time box used up after {len(ends)} steps ({setup.warmup} warm-up): nothing timed"


# ------------------------------------------------------------------------------------------- plain loop
def run_plain(setup: Setup, variant: Variant, root: Path) -> Result:
    device, result = setup.device, Result(variant)
    # The task's own objective (SelfTraining.compute_losses), run by this loop instead of a Trainer.
    task = build_task(setup, variant, root).to(device).train()
    network = task.network
    groups = trainable_param_groups(network.param_groups(LR, CLASSIFIER_LR_MULT))
    optimizer = build_optimizer(groups, "sgd", lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, "poly", total_steps=SCHEDULE_STEPS))
    use_bf16 = variant.precision == "bf16"
    host_batch = variant_batch(setup, variant)

    def train_step(batch: dict[str, dict[str, Tensor]]) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = task.compute_losses(batch)[0]
        # Where Lightning's closure does it: after forward, before backward.
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss

    copy_starts, starts, ends, losses = [], [], [], []
    counter = SyncCounter()
    for index in range(setup.total_steps):
        # The iteration starts with the host-to-device copy; the step window excludes it, as Lightning's hooks do.
        copy_starts.append(synchronized_time(device))
        batch = to_device(host_batch, device)
        starts.append(synchronized_time(device))
        if index == setup.warmup:
            reset_peak_memory(device)
        if index == setup.debug_step:
            counter.start()
        loss = train_step(batch)
        if index == setup.debug_step:
            counter.stop()
        ends.append(synchronized_time(device))
        losses.append(loss.detach())
        if setup.share.done(index + 1):
            break
    summarise(result, starts, ends, losses, setup)
    timed = timed_range(setup, len(copy_starts))
    result.iteration_ms = [1000 * (copy_starts[i + 1] - copy_starts[i]) for i in timed]
    result.syncs = counter.found
    if setup.profile_dir is not None and result.error is None:
        profiler = StepProfiler(device)
        while not profiler.done:
            profiler.begin()
            train_step(to_device(host_batch, device))  # the copy is part of the iteration, as timed above
            profiler.end()
        result.profile = write_profile(profiler, setup, variant)
    return result


def write_profile(profiler: StepProfiler, setup: Setup, variant: Variant) -> dict[str, Any]:
    """Write ``<profile_dir>/<variant>_profile.txt``; its totals for the results file."""
    assert setup.profile_dir is not None
    title = f"{variant.name} ({variant.describe(setup.lambda_sa)}; {variant.precision})"
    return profiler.write(setup.profile_dir / f"{variant.name}_profile.txt", title)


# -------------------------------------------------------------------------------------------- Lightning
class FixedBatches(Dataset):
    """The same pre-built (already batched, pinned) batch, ``length`` times: no collation, no worker."""

    def __init__(self, batch: dict[str, dict[str, Tensor]], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, dict[str, Tensor]]:
        return self.batch


class StepTimer(Callback):
    """Synchronised wall-clock time of every training step, the returned losses and one sync-debug step.

    Stops the fit after the step at which ``share`` is done, or, with a ``profiler``, once it has run the profiled
    steps that follow the timed ones.
    """

    def __init__(self, device: torch.device, warmup: int, debug_step: int | None, share: Share, total_steps: int,
                 profiler: StepProfiler | None = None) -> None:  # fmt: skip
        self.device, self.warmup, self.debug_step, self.share = device, warmup, debug_step, share
        self.total_steps, self.profiler = total_steps, profiler
        self.profiling = False  # the timed steps are over and the profiled ones run
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.losses: list[Tensor] = []
        self.counter = SyncCounter()

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.profiling:
            assert self.profiler is not None
            self.profiler.begin()
            return
        self.starts.append(synchronized_time(self.device))
        if batch_idx == self.warmup:  # the first timed step
            reset_peak_memory(self.device)
        if batch_idx == self.debug_step:
            self.counter.start()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.profiling:
            assert self.profiler is not None
            self.profiler.end()
            trainer.should_stop = self.profiler.done
            return
        if batch_idx == self.debug_step:
            self.counter.stop()
        self.ends.append(synchronized_time(self.device))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach())
        if self.share.done(len(self.ends)) or len(self.ends) == self.total_steps:
            # A variant that timed nothing is not profiled (the same rule as the plain loop's).
            timed = len(self.ends) > self.warmup + 1
            self.profiling = self.profiler is not None and timed
            trainer.should_stop = not self.profiling


def build_task(setup: Setup, variant: Variant, root: Path) -> LightningModule:
    network = fresh_network(setup, variant)
    if variant.task == "stage0":
        return SegmentationTask(network, **TASK_KWARGS)
    if variant.task == "stage1":
        # It exports its SAM when training ends: keep that apart from the frozen SAM of the other variants.
        return SAMPretraining(network, sam_export_path=str(root / "stage1_sam.pt"), **TASK_KWARGS)
    if variant.sam:
        loss = SelfAttentionLoss(str(setup.sam_path), weight=setup.lambda_sa)
        return SelfTraining(network, self_attention=loss, **TASK_KWARGS)
    return SelfTraining(network, **TASK_KWARGS)


def run_lightning(setup: Setup, variant: Variant, root: Path) -> Result:
    device, result = setup.device, Result(variant)
    module = build_task(setup, variant, root)
    profiler = StepProfiler(device) if setup.profile_dir is not None else None
    steps = setup.total_steps + (PROFILE_WARMUP + PROFILE_STEPS if profiler else 0)
    timer = StepTimer(device, setup.warmup, setup.debug_step, setup.share, setup.total_steps, profiler)
    trainer = Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=PRECISIONS[variant.precision],
        max_steps=steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        benchmark=device.type == "cuda",
        callbacks=[timer],
        default_root_dir=str(root),
    )
    loader = DataLoader(FixedBatches(variant_batch(setup, variant), steps), batch_size=None, num_workers=0)
    trainer.fit(module, train_dataloaders=loader)
    summarise(result, timer.starts, timer.ends, timer.losses, setup)
    result.syncs = timer.counter.found
    if profiler is not None and profiler.done:
        result.profile = write_profile(profiler, setup, variant)
    del trainer, module
    return result


# ------------------------------------------------------------------------------------------------- driver
def measure_variants(
    variants: list[Variant],
    box: TimeBox,
    setup: Setup,
    run_one: Callable[[Variant, Share], Result],
    results: dict[str, Result],
    after_each: Callable[[], object] = lambda: None,
) -> None:
    """Run each variant with an even share of what is left of ``box``, into ``results`` (``after_each`` after each).

    A variant is skipped only when the box is used up; one cut short by its share (fewer timed steps than asked)
    marks the box as reached and leaves the rest of the box to the next variants.
    """
    for index, variant in enumerate(variants):
        if box.expired():
            results[variant.name] = Result(variant, error="skipped: time box used up")
        else:
            result = run_one(variant, box.allot(len(variants) - index, setup.min_steps))
            results[variant.name] = result
            if len(result.step_ms) < setup.steps and not (result.error or "").startswith("out of memory"):
                box.reached = True  # cut short by its share of the box
        after_each()


def run_variant(setup: Setup, variant: Variant, root: Path) -> Result:
    device = setup.device
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        if variant.runner == "plain":
            result = run_plain(setup, variant, root)
        else:
            result = run_lightning(setup, variant, root)
    except torch.cuda.OutOfMemoryError as error:
        result = Result(variant, error=f"out of memory: {str(error).splitlines()[0]}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result.peak_mib = torch.cuda.max_memory_allocated(device) / MIB
    gc.collect()
    return result


def max_rel_diff(a: list[float], b: list[float], count: int) -> float | None:
    pairs = list(zip(a[:count], b[:count], strict=False))
    if not pairs:
        return None
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in pairs)


def analyse(
    results: dict[str, Result], args: argparse.Namespace, device: torch.device
) -> tuple[list[str], list[str], list[str]]:
    """(summary lines, loss-table lines, target lines)."""
    ok = {name: r for name, r in results.items() if r.error is None}
    summary: list[str] = []

    def share(runner: str, suffix: str = "") -> None:
        with_sam, without = ok.get(f"{runner}-bf16{suffix}"), ok.get(f"{runner}-bf16-nosam{suffix}")
        if with_sam and without:
            added = with_sam.step - without.step
            summary.append(
                f"SAM share of the bf16 step ({runner}{suffix}): {with_sam.step:.1f} ms with the SAM loss vs "
                f"{without.step:.1f} ms without: {added:+.1f} ms, {100 * added / without.step:+.1f} % of the step "
                f"without it ({100 * added / with_sam.step:.1f} % of the step with it); per iteration "
                f"{100 * (with_sam.iteration - without.iteration) / without.iteration:+.1f} %"
            )

    share("lightning")
    share("plain")
    for runner in ("plain", "lightning"):
        for layout in ("", "-cl"):
            fp32, bf16 = ok.get(f"{runner}-fp32{layout}"), ok.get(f"{runner}-bf16{layout}")
            if fp32 and bf16:
                summary.append(
                    f"bf16/fp32 ratio of the {runner} {'loop' if runner == 'plain' else 'module'}"
                    f"{' in channels_last' if layout else ''}: {bf16.step / fp32.step:.3f} per step, "
                    f"{bf16.iteration / fp32.iteration:.3f} per iteration"
                )
    for name, r in ok.items():
        contiguous = ok.get(name.removesuffix("-cl")) if r.variant.channels_last else None
        if contiguous:
            summary.append(
                f"{name} vs {contiguous.variant.name}: {r.iteration:.1f} vs {contiguous.iteration:.1f} ms/iteration "
                f"(x{r.iteration / contiguous.iteration:.3f})"
            )
    for name in ("lightning-bf16-stage0", "lightning-bf16-stage1"):
        if name in ok and "lightning-bf16" in ok:
            summary.append(
                f"{name}: {ok[name].iteration:.1f} ms/iteration = "
                f"{ok[name].iteration / ok['lightning-bf16'].iteration:.2f} x the lightning-bf16 self-training iteration"
            )

    for name, r in ok.items():
        bad = next((i for i, x in enumerate(r.losses) if not math.isfinite(x)), None)
        if bad is not None:
            summary.append(
                f"{name}: the loss is not finite from step {bad} on (warm-up included; the timing goes on)"
            )
    # Losses of the first steps (same weights, same batch).
    count = min(args.loss_steps, args.warmup + args.steps)
    columns = [n for n in ("plain-fp32", "plain-bf16", "lightning-fp32", "lightning-bf16") if n in ok]
    loss_lines: list[str] = []
    if columns:
        loss_lines += ["| step | " + " | ".join(columns) + " |", "|---:|" + "---:|" * len(columns)]
        for i in range(count):
            loss_lines.append(f"| {i} | " + " | ".join(f"{ok[c].losses[i]:.5f}" for c in columns) + " |")
    comparisons = []
    for a, b in (("plain-fp32", "plain-bf16"), ("lightning-fp32", "lightning-bf16"), ("plain-fp32", "lightning-fp32"),
                 ("plain-bf16", "lightning-bf16")):  # fmt: skip
        if a in ok and b in ok:
            comparisons.append((a, b, max_rel_diff(ok[a].losses, ok[b].losses, count)))
    for a, b, diff in comparisons:
        loss_lines.append(f"- max relative difference {a} vs {b} over the first {count} steps: {diff:.2e}")

    targets: list[str] = []
    if device.type != "cuda":
        targets.append(
            "Not checked: the targets (Lightning within 5 % of the plain loop, bf16 <= 0.72 x fp32 plain, SAM <= 3 % "
            "of the bf16 step, a 2048x1024 step without OOM) are set for one GPU; this run is on CPU. Run "
            "`python benchmarks/train_step.py` and `python benchmarks/train_step.py --size 2048 1024` on a GPU."
        )
        return summary, loss_lines, targets

    def verdict(passed: bool) -> str:
        return "PASS" if passed else "FAIL"

    for precision in ("fp32", "bf16"):
        plain, light = ok.get(f"plain-{precision}"), ok.get(f"lightning-{precision}")
        if plain and light:
            ratio = light.iteration / plain.iteration
            targets.append(
                f"{verdict(ratio <= 1.05)}: Lightning {precision} within 5 % of the plain loop: "
                f"{light.iteration:.1f} vs {plain.iteration:.1f} ms/iteration (x{ratio:.3f}; "
                f"per step x{light.step / plain.step:.3f})"
            )
    if "plain-fp32" in ok and "lightning-bf16" in ok:
        ratio = ok["lightning-bf16"].iteration / ok["plain-fp32"].iteration
        losses_agree = [d for a, b, d in comparisons if {a, b} in ({"plain-fp32", "plain-bf16"},
                        {"lightning-fp32", "lightning-bf16"})]  # fmt: skip
        agree = bool(losses_agree) and max(losses_agree) <= args.loss_rtol
        targets.append(
            f"{verdict(ratio <= 0.72)}: Lightning bf16 <= 0.72 x the fp32 plain-loop step: "
            f"{ok['lightning-bf16'].iteration:.1f} / {ok['plain-fp32'].iteration:.1f} ms/iteration = {ratio:.3f}"
        )
        targets.append(
            f"{verdict(agree)}: bf16 losses equal the fp32 losses to rtol {args.loss_rtol:g} over the first "
            f"{count} steps (max {max(losses_agree) if losses_agree else float('nan'):.2e})"
        )
    if "lightning-bf16" in ok and "lightning-bf16-nosam" in ok:
        with_sam, without = ok["lightning-bf16"].iteration, ok["lightning-bf16-nosam"].iteration
        share = (with_sam - without) / with_sam
        at_size = tuple(args.size) == (1024, 512) and tuple(args.source_size) == (1024, 512)
        text = (
            f"the SAM loss is <= 3 % of the bf16 step at 1024x512: {100 * share:.1f} % of the iteration "
            f"(Lightning, {with_sam:.1f} with vs {without:.1f} ms without)"
        )
        targets.append(
            f"{verdict(share <= 0.03)}: {text}" if at_size else f"Info (target set at 1024x512): {text}"
        )
    if tuple(args.size) == (2048, 1024):
        sam_runs = [r for r in results.values() if r.variant.sam and r.variant.task == "selftrain"]
        oom = [r.variant.name for r in sam_runs if r.error]
        peaks = ", ".join(f"{r.variant.name} {r.peak_mib:.0f} MiB" for r in sam_runs if r.error is None)
        targets.append(
            f"{verdict(bool(sam_runs) and not oom)}: a 2048x1024 step (N = 32768) with the SAM loss runs without "
            f"running out of memory: {'OOM in ' + ', '.join(oom) if oom else 'no OOM'}; peak {peaks or '-'}"
        )
    else:
        targets.append("Not checked in this run: the 2048x1024 step (run with `--size 2048 1024`).")
    return summary, loss_lines, targets


def write_report(
    path: Path,
    info: dict[str, str],
    args: argparse.Namespace,
    argv: list[str],
    results: dict[str, Result],
    device: torch.device,
    sam_impl: str,
    num_pixels: int,
    sync_capture_ok: bool | None,
    box: TimeBox,
    planned: int,
    complete: bool,
) -> list[str]:
    """Write the Markdown report at ``path`` and its JSON twin; returns the Markdown lines."""
    summary, loss_lines, targets = analyse(results, args, device)
    ok = {name: r for name, r in results.items() if r.error is None}
    gpu = device.type == "cuda"
    (ws, hs), (wt, ht) = args.source_size, args.size
    lines = [
        f"# Training step, plain PyTorch vs Lightning: {info.get('gpu', info['cpu'])}",
        "",
        f"- machine: {info['gpu'] + ' (' + info['gpu_memory_gib'] + ' GiB, CUDA ' + info['cuda'] + ', cuDNN ' + info['cudnn'] + '), ' if gpu else ''}"
        f"CPU {info['cpu']}, {info['cores']} cores visible, torch threads {info['threads']}; "
        f"load average at the start {info['loadavg']}",
        f"- torch {info['torch']}, lightning {info['lightning']}, Python {info['python']}; date {info['date']}",
        f"- command: `{' '.join(['python benchmarks/train_step.py', *argv])}`",
        f"- step: DeepLabV2-{args.backbone} (random init, see `prepare_random_network`; BatchNorm frozen), source {ws}x{hs} + target {wt}x{ht} "
        f"(batch 1 + 1), SAM loss eq. (8)+(10) with lambda {args.lambda_sa:g}, frozen random SAM "
        f"(impl auto -> {sam_impl} at N = {num_pixels}); SGD momentum {MOMENTUM}, wd {WEIGHT_DECAY}, lr {LR}, "
        f"classifier x{CLASSIFIER_LR_MULT:g}{' (fused)' if gpu else ''}, poly schedule",
        f"- timing: {args.warmup} warm-up + {args.steps} timed steps, medians; ms/step = step start -> end "
        "(Lightning: on_train_batch_start -> on_train_batch_end), ms/iteration = step start -> next step start "
        "(adds the batch fetch, host-to-device copy and loop overhead)"
        + (f"; cudnn.benchmark on; {info['tf32']}" if gpu else "; wall clock on a possibly shared CPU"),
        f"- time box: {box.seconds or 'none'} s"
        + ("; reached: later variants have fewer timed steps or none" if box.reached else "")
        + ("" if complete else "; run still in progress or cut short"),
        "",
        "| variant | step | precision | ms/step (median) | vs plain same precision | ms/iteration (median) "
        "| vs plain (iteration) | min ms/step | timed steps | peak GPU MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        v = r.variant
        prec = (
            PRECISIONS[v.precision]
            if v.runner == "lightning"
            else ("fp32" if v.precision == "fp32" else "bf16 autocast")
        )
        prec += " + compile" if v.compile else ""
        prec += " + channels_last" if v.channels_last else ""
        if r.error:
            lines.append(f"| {name} | {v.describe(args.lambda_sa)} | {prec} | {r.error} | | | | | | "
                         f"{f'{r.peak_mib:.0f}' if r.peak_mib is not None else '-'} |")  # fmt: skip
            continue
        ref = (
            ok.get(Variant("plain", v.precision, v.task, v.sam, v.compile, v.channels_last).name)
            if v.runner == "lightning"
            else None
        )
        vs_step = f"x{r.step / ref.step:.3f}" if ref else "-"
        vs_iter = f"x{r.iteration / ref.iteration:.3f}" if ref else "-"
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-"
        lines.append(
            f"| {name} | {v.describe(args.lambda_sa)} | {prec} | {r.step:.1f} | {vs_step} | {r.iteration:.1f} "
            f"| {vs_iter} | {min(r.step_ms):.1f} | {len(r.step_ms)} | {peak} |"
        )
    lines += ["", *[f"- {line}" for line in summary]]
    if loss_lines:
        lines += ["", "## Total loss of the first steps (same weights, same batch)", "", *loss_lines]
    if gpu:
        lines += [
            "",
            "## Host-device synchronisations inside one warm-up step (`set_sync_debug_mode('warn')`)",
            "",
        ]
        if not sync_capture_ok:
            lines.append(
                "- the probe (`.item()` on a CUDA tensor) raised no captured warning: the counts below are not reliable"
            )
        for name, r in ok.items():
            found = ", ".join(f"`{where}` x{n}" for where, n in r.syncs.most_common()) or "none"
            lines.append(f"- {name}: {sum(r.syncs.values())} ({found})")
    profiled = {name: r.profile for name, r in results.items() if r.profile}
    if profiled:
        lines += [
            "",
            "## Profile (`--profile`: traced steps after the timed ones; see benchmarks/profiling.py)",
            "",
        ]
        lines += [f"- {name}: {profile['text']} (`{profile['file']}`)" for name, profile in profiled.items()]
    lines += ["", "## Targets", "", *[f"- {t}" for t in targets]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    record = {
        "machine": info,
        "command": " ".join(["python benchmarks/train_step.py", *argv]),
        "device": device.type,
        "backbone": args.backbone,
        "size": list(args.size),
        "source_size": list(args.source_size),
        "warmup": args.warmup,
        "steps": args.steps,
        "lambda_sa": args.lambda_sa,
        "sam_impl": sam_impl,
        "variants": {name: result_record(r) for name, r in results.items()},
        "summary": summary,
        "targets": targets,
        "time_box": box.record(),
        "complete": complete,
        "headline": headline(results, planned, args),
    }
    path.with_suffix(".json").write_text(json.dumps(record, indent=2))
    return lines


def result_record(result: Result) -> dict[str, Any]:
    """One variant as written in the JSON report (medians in ms; ``None`` where not measured)."""
    measured = result.error is None
    return {
        "step_ms": result.step if measured else None,
        "iteration_ms": result.iteration if measured else None,
        "min_step_ms": min(result.step_ms) if measured else None,
        "timed_steps": len(result.step_ms),
        "all_step_ms": [round(ms, 2) for ms in result.step_ms],
        "first_nonfinite_loss_step": next(
            (i for i, x in enumerate(result.losses) if not math.isfinite(x)), None
        ),
        "peak_mib": result.peak_mib,
        "losses": result.losses,
        "error": result.error,
        "profile": result.profile,
    }


def headline(results: dict[str, Result], planned: int, args: argparse.Namespace) -> str:
    """One line: the sizes, how many variants were measured and their ms/iteration."""
    (ws, hs), (wt, ht) = args.source_size, args.size
    size = f"{wt}x{ht}" if (ws, hs) == (wt, ht) else f"source {ws}x{hs}, target {wt}x{ht}"
    ok = {name: r for name, r in results.items() if r.error is None}
    figures = ", ".join(f"{name} {r.iteration:.1f}" for name, r in ok.items())
    return f"{size}: {len(ok)}/{planned} variants measured" + (
        f"; ms/iteration: {figures}" if figures else ""
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--backbone", choices=["resnet101", "resnet50", "resnet18"],
                        help="default resnet101 on CUDA, resnet18 on CPU")  # fmt: skip
    parser.add_argument("--size", type=int, nargs=2, metavar=("W", "H"),
                        help="target (and default source) image size; default 1024 512 on CUDA, 256 128 on CPU")  # fmt: skip
    parser.add_argument("--source-size", type=int, nargs=2, metavar=("W", "H"),
                        help="source image size (default: --size; the paper's GTA5 protocol uses 1280 720)")  # fmt: skip
    parser.add_argument("--warmup", type=int, help="untimed steps per variant (default 10 CUDA, 5 CPU)")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default 30 CUDA, 10 CPU)")
    parser.add_argument("--loss-steps", type=int, default=5, help="first steps whose losses are compared")
    parser.add_argument(
        "--loss-rtol", type=float, default=2e-2, help="bf16 vs fp32 loss tolerance (relative)"
    )
    parser.add_argument("--lambda-sa", type=float, default=0.1)
    parser.add_argument("--variants", nargs="+", help=f"default: {' '.join(DEFAULT_VARIANTS)}")
    parser.add_argument("--compile", action="store_true", help=f"add {' '.join(COMPILE_VARIANTS)}")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--machine", help="name used in the output file (default: derived from the GPU/CPU)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--stem", help="results file name without suffix (default: derived from machine and sizes)"
    )
    parser.add_argument(
        "--time-box",
        type=float,
        help="seconds for the whole run (default: no limit); see the module docstring",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after each variant's timed steps, profile a few more into DIR/<variant>_profile.txt",
    )
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    try:
        box = TimeBox(args.time_box)
    except ValueError as error:
        parser.error(str(error))

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    gpu = device.type == "cuda"
    args.backbone = args.backbone or ("resnet101" if gpu else "resnet18")
    args.size = tuple(args.size or ((1024, 512) if gpu else (256, 128)))
    args.source_size = tuple(args.source_size or args.size)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 5)
    args.steps = args.steps or (30 if gpu else 10)
    if min(*args.size, *args.source_size) < 8 or args.steps < 1 or args.warmup < 0 or args.lambda_sa <= 0:
        parser.error("sizes must be >= 8 pixels, --steps >= 1, --warmup >= 0 and --lambda-sa > 0")
    try:
        names = list(args.variants or DEFAULT_VARIANTS) + (list(COMPILE_VARIANTS) if args.compile else [])
        variants = [parse_variant(n) for n in dict.fromkeys(names)]
    except ValueError as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    quiet_console()  # the package's own filters (Lightning's tips and its LeafSpec deprecation)
    # Advice about the loaders, the devices and validation that this synthetic, loader-less setup ignores on purpose.
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|GPU available but not used"
                            r"|Tensor Cores|LightningDataModule|val_dataloader).*")  # fmt: skip

    info = machine_info(device)
    sync_capture_ok = None
    if gpu:  # check that the sync debug warnings reach Python here before counting them
        probe = SyncCounter()
        probe.start()
        torch.ones(1, device=device).item()
        probe.stop()
        sync_capture_ok = sum(probe.found.values()) > 0
    torch.manual_seed(args.seed)
    base = DeepLabV2(NUM_CLASSES, backbone=args.backbone, pretrained=None).to(device)
    prepare_random_network(base, args.size, device, args.seed)
    base = base.cpu()
    sam = SelfAttentionModule(NUM_CLASSES)  # random frozen SAM: its cost does not depend on its weights
    num_pixels = -(-args.size[0] // 8) * -(-args.size[1] // 8)
    with tempfile.TemporaryDirectory(prefix="train_step_") as tmp:
        root = Path(tmp)
        setup = Setup(
            device=device,
            base_network=base,
            sam_path=save_sam(sam, root / "sam.pt"),
            batch=make_batch(args.source_size, args.size, args.seed, pin=gpu),
            warmup=args.warmup,
            steps=args.steps,
            lambda_sa=args.lambda_sa,
            debug_step=args.warmup - 1 if gpu and args.warmup > 0 else None,
            profile_dir=args.profile,
        )
        path = args.out_dir / f"{args.stem or default_stem(args, info, variants, gpu)}.md"
        impl = sam.resolve_impl(1, num_pixels)

        def report(complete: bool) -> list[str]:
            return write_report(path, info, args, raw, results, device, impl, num_pixels, sync_capture_ok, box,
                                len(variants), complete)  # fmt: skip

        def run_one(variant: Variant, share: Share) -> Result:
            setup.share = share
            began = time.perf_counter()
            result = run_variant(setup, variant, root)
            if result.error:
                print(f"{variant.name}: {result.error}", flush=True)
            else:
                peak = f", peak {result.peak_mib:.0f} MiB" if result.peak_mib is not None else ""
                print(f"{variant.name}: {result.step:.1f} ms/step, {result.iteration:.1f} ms/iteration{peak} "
                      f"({time.perf_counter() - began:.0f} s)", flush=True)  # fmt: skip
            return result

        results: dict[str, Result] = {}
        measure_variants(variants, box, setup, run_one, results, lambda: report(complete=False))
    print("\n".join(report(complete=True)))
    print(f"wrote {path}")


def default_stem(args: argparse.Namespace, info: dict[str, str], variants: list[Variant], gpu: bool) -> str:
    """``train_step_<machine>[_<size>][_src<size>][_compile]``."""
    default_size = (1024, 512) if gpu else (256, 128)
    stem = f"train_step_{args.machine or info['slug']}"
    if args.size != default_size:
        stem += f"_{args.size[0]}x{args.size[1]}"
    if args.source_size != args.size:
        stem += f"_src{args.source_size[0]}x{args.source_size[1]}"
    if any(v.compile for v in variants):
        stem += "_compile"
    return stem


if __name__ == "__main__":
    main()
