"""One generation of pseudo labels: inference over the target set, class-wise thresholds, an atomic label folder.

Plain torch (no Lightning), shared by the :class:`~uda_sam.callbacks.PseudoLabelRegeneration` callback and the
``uda-sam pseudo-label`` command. Distributed runs pass a :class:`ProcessGroup` so that every image is processed by
exactly one rank, the threshold histograms and statistics are summed across ranks, and the folder is finalised once.

The work is two passes, but the network runs only once:

1. inference: each rank runs the network over its shard of the target images (``indices[rank::world_size]``), feeds
   the class-wise histogram and caches, per image, the argmax class and the *bin index* of its confidence on disk
   (3 bytes a pixel; deleted at the end). On the same device it counts, per class and bin, the pixels with ground
   truth and those whose ground truth equals the argmax, and the ground-truth pixels per class: once the thresholds
   are known these give the label statistics exactly, so the ground truth is never cached. Host memory stays
   constant in the number of images; the loader's workers hand the masks over as uint8, not as int64.
2. labelling: once the summed histograms give the thresholds, each rank turns its cached maps into label PNGs in a
   pool of threads, so that this pass, which no network work can hide, runs on several cores. The threads run numpy
   and zlib only, never torch: torch operations in new threads of a forked process (Lightning's ``ddp_fork``) can
   fail on its thread pool, and each such thread would start an intra-op thread pool of its own.

A pixel keeps its class when its confidence bin is at or above the bin of ``tau[class]``; since ``tau`` is a bin edge
(see :class:`~uda_sam.pseudo_labels.ClasswiseThresholdEstimator`), this is exactly ``conf >= tau``.

Output, ``{output_dir}/{folder}/``: one uint8 trainId PNG per image at ``{name}.png`` (``255`` = no label),
``thresholds.json`` (thresholds, the key of what made the labels and a description of the run) and ``statistics.json``
(per-class share of pixels labelled and agreement with the ground truth where it exists, a diagnostic that training
never reads). Everything is written to a hidden temporary folder that is renamed into place when complete, so a
folder is whole or absent; a failed attempt removes its temporary folder (a killed one leaves it to the next
attempt, which removes it first), and a full disk or a read-only folder raises a
:class:`~uda_sam.files.WriteError` naming the generation's folder.

A finished folder is reused only when its recorded key, everything that determines the labels (a hash of the
teacher's weights, the target image list, the inference size and normalisation, the autocast type, the class count,
the cap and the bins; see :func:`labels_key`), equals this run's; otherwise it is made again and replaced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from uda_sam.data.labels import CLASS_NAMES, IGNORE_INDEX
from uda_sam.files import WriteError
from uda_sam.pseudo_labels.thresholds import (
    ClasswiseThresholdEstimator,
    PseudoLabelStatistics,
    all_reduce_sum,
    save_label_png,
)

__all__ = [
    "GenerationResult",
    "ProcessGroup",
    "ReuseMode",
    "autocast_dtype_for",
    "generate_pseudo_labels",
    "labels_key",
    "network_sha256",
    "read_finished_generation",
    "state_dict_sha256",
]

#: ``"matching"``: reuse a finished folder whose key equals this run's, else make the labels again and replace it;
#: ``"require"``: reuse it, and refuse (naming what differs) when it is absent or its key differs;
#: ``"never"``: always make the labels again.
ReuseMode = Literal["matching", "require", "never"]

THRESHOLDS_FILE = "thresholds.json"
#: Threads that write cache files and encode label PNGs (zlib releases the GIL) while the network runs.
IO_THREADS = 4
#: Threads that make the labels and their PNGs from the cached maps (numpy and zlib release the GIL; no torch).
LABEL_THREADS = max(IO_THREADS, min(16, os.cpu_count() or 1))
STATISTICS_FILE = "statistics.json"
#: Most histogram bins a generation supports: each pixel's bin is cached as an int16.
MAX_BINS = 2**15


class _GroundTruthCounts:
    """Pixel counts of pass 1 from which :class:`PseudoLabelStatistics` follow once the thresholds are known.

    ``per_bin[0, c, b]``: pixels with argmax ``c``, confidence bin ``b`` and ground truth (not ``ignore``);
    ``per_bin[1, c, b]``: those whose ground truth is ``c``; ``gt_pixels[c]``: ground-truth pixels of class ``c``.
    A pixel keeps its label ``c`` when ``b >= bin(tau[c])``, so the statistics' counters are sums over the bins at
    or above each class's threshold bin. Updated on the device without host synchronisation.
    """

    def __init__(self, num_classes: int, num_bins: int, device: torch.device) -> None:
        self.num_classes, self.num_bins = num_classes, num_bins
        self.per_bin = torch.zeros(2, num_classes * num_bins, dtype=torch.long, device=device)
        self.gt_pixels = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.total_pixels = 0

    def update(self, bins: Tensor, predicted: Tensor, gt: Tensor) -> None:
        """Add a batch: ``bins`` and ``predicted`` as in the histogram, ``gt`` uint8 trainIds (255 unlabelled)."""
        gt = gt.to(bins.device, non_blocking=True).reshape(-1).long()
        index = (predicted.reshape(-1).long() * self.num_bins + bins.reshape(-1)).expand(2, -1)
        valid = gt != IGNORE_INDEX
        correct = valid & (gt == predicted.reshape(-1))
        self.per_bin.scatter_add_(1, index, torch.stack([valid, correct]).long())
        self.gt_pixels.scatter_add_(0, torch.where(valid, gt, 0), valid.long())
        self.total_pixels += gt.numel()

    def sync(self, reduce_sum: Callable[[Tensor], Tensor], device: torch.device) -> None:
        """Sum the counts over the processes of a generation (every rank calls it)."""
        total = torch.tensor([self.total_pixels], dtype=torch.long, device=self.per_bin.device)
        for name, tensor in (("per_bin", self.per_bin), ("gt_pixels", self.gt_pixels), ("total", total)):
            summed = reduce_sum(tensor.to(device)).to(tensor.device)
            if name == "total":
                self.total_pixels = int(summed.item())
            else:
                setattr(self, name, summed)

    def statistics(self, histogram: Tensor, threshold_bins: Tensor) -> PseudoLabelStatistics:
        """The statistics of the labels ``argmax`` where ``bin >= threshold_bins[argmax]``.

        Args:
            histogram: ``(C, num_bins)`` counts of every pixel by argmax and bin
                (:attr:`ClasswiseThresholdEstimator.histogram`), over the same pixels as these counts.
            threshold_bins: ``(C,)`` bin of each class's threshold.
        """
        kept = torch.arange(self.num_bins) >= threshold_bins.cpu().reshape(-1, 1)  # (C, num_bins)
        per_bin = self.per_bin.cpu().view(2, self.num_classes, self.num_bins)
        stats = PseudoLabelStatistics(self.num_classes)
        stats.counts = torch.stack(
            [
                (histogram.cpu() * kept).sum(dim=1),  # labelled
                (per_bin[0] * kept).sum(dim=1),  # evaluated: labelled with ground truth
                (per_bin[1] * kept).sum(dim=1),  # correct
                self.gt_pixels.cpu(),
            ]
        )
        stats.total_pixels = torch.tensor(self.total_pixels, dtype=torch.long)
        return stats


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def _no_barrier() -> None:
    return None


@dataclass
class ProcessGroup:
    """The few collective operations a generation needs; the defaults describe a single process.

    Args:
        rank: This process's index.
        world_size: Number of processes.
        reduce_sum: Returns the element-wise sum of a tensor over all processes (every rank calls it).
        barrier: Blocks until every process reaches it.
        device: Device on which tensors must be for ``reduce_sum`` (the GPU under NCCL).
    """

    rank: int = 0
    world_size: int = 1
    reduce_sum: Callable[[Tensor], Tensor] = _identity
    barrier: Callable[[], None] = _no_barrier
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_torch_distributed(cls, device: torch.device | None = None) -> ProcessGroup:
        """The default ``torch.distributed`` group when it is initialised, else a single process."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return cls(device=device or torch.device("cpu"))

        return cls(
            rank=torch.distributed.get_rank(),
            world_size=torch.distributed.get_world_size(),
            reduce_sum=all_reduce_sum,
            barrier=torch.distributed.barrier,
            device=device or torch.device("cpu"),
        )


@dataclass
class GenerationResult:
    """A finished generation folder and what it holds.

    Attributes:
        label_dir: The folder.
        thresholds: Class-wise thresholds.
        statistics: The content of ``statistics.json``.
        reused: The folder was finished before this call and reused.
        replaced: Why a finished folder that was there was made again (one line per differing key entry).
    """

    label_dir: Path
    thresholds: list[float]
    statistics: dict[str, Any]
    reused: bool = False
    replaced: list[str] = field(default_factory=list)


def read_finished_generation(label_dir: str | os.PathLike[str]) -> GenerationResult | None:
    """The generation stored in ``label_dir``, or ``None`` when the folder is absent or unfinished."""
    label_dir = Path(label_dir)
    thresholds_file = label_dir / THRESHOLDS_FILE
    if not thresholds_file.is_file():
        return None
    record = json.loads(thresholds_file.read_text())
    statistics_file = label_dir / STATISTICS_FILE
    statistics = json.loads(statistics_file.read_text()) if statistics_file.is_file() else {}
    return GenerationResult(label_dir, list(record["thresholds"].values()), statistics, reused=True)


def network_sha256(network: nn.Module) -> str:
    """SHA-256 of a network's parameters and buffers (names, types, shapes and values), whatever its device."""
    return state_dict_sha256(network.state_dict())


def state_dict_sha256(state_dict: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state dict, in its order: equal to :func:`network_sha256` of a network holding it."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def labels_key(
    network: nn.Module,
    dataset: Dataset,
    *,
    num_classes: int,
    cap: float,
    num_bins: int,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Everything that determines a generation's labels, as recorded in its ``thresholds.json``.

    The image list, size and normalisation are read from the dataset's ``names``, ``size`` and ``normalization``
    (the package's readers have them; ``None`` where a dataset lacks one).
    """
    names = getattr(dataset, "names", None)
    size = getattr(dataset, "size", None)
    return {
        "teacher_sha256": network_sha256(network),
        "num_images": len(dataset),  # type: ignore[arg-type]
        "images_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest() if names is not None else None,
        "size": list(size) if size is not None else None,
        "normalization": getattr(dataset, "normalization", None),
        "autocast": str(autocast_dtype).removeprefix("torch.") if autocast_dtype is not None else None,
        "num_classes": num_classes,
        "cap": cap,
        "num_bins": num_bins,
    }


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text[:13] + '..."' if len(text) > 16 and text.startswith('"') else text


def _differences(recorded: dict[str, Any], key: dict[str, Any]) -> list[str]:
    names = sorted(set(recorded) | set(key))
    return [
        f"{name}: {_short(recorded.get(name))} there, {_short(key.get(name))} now"
        for name in names
        if recorded.get(name) != key.get(name)
    ]


def _check_reusable(
    label_dir: Path, key: dict[str, Any], reuse: ReuseMode
) -> tuple[GenerationResult | None, list[str]]:
    """The finished generation to reuse (or ``None``) and, when one is there but made otherwise, what differs."""
    finished = read_finished_generation(label_dir)
    if finished is None:
        if label_dir.exists() and any(label_dir.iterdir()):
            raise FileExistsError(
                f"{label_dir} exists but holds no {THRESHOLDS_FILE}: it is not a finished pseudo-label generation. "
                "Remove it or choose another output folder."
            )
        if reuse == "require":
            raise FileNotFoundError(f"{label_dir} holds no finished pseudo-label generation to reuse")
        return None, []
    recorded = json.loads((label_dir / THRESHOLDS_FILE).read_text()).get("key", {})
    differences = _differences(recorded, key)
    if reuse == "require" and differences:
        raise FileExistsError(
            f"{label_dir} holds pseudo labels made otherwise than this run would make them; "
            f"differs in {'; '.join(differences)}"
        )
    if reuse == "never":
        return None, differences or ["regeneration requested"]
    return (None, differences) if differences else (finished, [])


def autocast_dtype_for(precision: str | int) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision setting: ``bf16*`` -> bfloat16, ``16*`` -> float16, else None."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def generate_pseudo_labels(
    network: nn.Module,
    dataset: Dataset,
    label_dir: str | os.PathLike[str],
    *,
    description: dict[str, Any] | None = None,
    num_classes: int = 19,
    cap: float = 0.9,
    num_bins: int = 1000,
    batch_size: int = 4,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    group: ProcessGroup | None = None,
    reuse: ReuseMode = "matching",
    progress: bool = True,
) -> GenerationResult:
    """Make one generation of pseudo labels for every image of ``dataset`` into ``label_dir``.

    Args:
        network: A segmentation network with ``forward(x) -> pre-upsample logits`` and
            ``upsample_logits(logits, size)`` (the ``uda_sam.nn`` networks); used in eval mode, restored after.
        dataset: Target training images without augmentation; samples ``{"image", "mask", "name"}``. Labels are
            written at the size of ``mask`` (all-255 masks are fine: they only disable the agreement statistics).
        label_dir: The generation's folder; created atomically.
        description: JSON-serialisable description of the run (teacher, generation, ...), recorded for people;
            reuse compares :func:`labels_key` only.
        num_classes: Classes predicted by ``network``.
        cap: Upper bound of the thresholds (0.9 in the paper).
        num_bins: Histogram bins (bin width ``1 / num_bins``).
        batch_size: Images per inference batch.
        num_workers: Data-loading worker processes.
        device: Where the network runs.
        autocast_dtype: ``torch.bfloat16`` (or ``float16``) for mixed-precision inference; softmax runs in fp32.
        group: The processes sharing the work; ``None`` means a single process.
        reuse: What to do with a finished folder already at ``label_dir`` (see :data:`ReuseMode`).
        progress: Show a progress bar on rank 0.

    Returns:
        The finished generation.

    Raises:
        ValueError: If the dataset is empty or the network predicts another number of classes.
        FileExistsError: If ``label_dir`` holds something that is not a finished generation, or (``reuse="require"``)
            one made otherwise.
        FileNotFoundError: With ``reuse="require"``, if ``label_dir`` holds no finished generation.
        WriteError: If the labels cannot be written (a full disk, a read-only folder): names ``label_dir``, which is
            left as it was.
    """
    group = group or ProcessGroup()
    device = torch.device(device)
    label_dir = Path(label_dir)
    if len(dataset) == 0:
        raise ValueError("the target dataset for pseudo labels holds no images")
    if not 1 <= num_bins <= MAX_BINS:
        raise ValueError(
            f"num_bins must lie in 1..{MAX_BINS} (bins are cached as 16-bit integers), got {num_bins}"
        )
    if not math.isclose(cap * num_bins, round(cap * num_bins)):
        raise ValueError(
            f"cap * num_bins must be an integer so that the cap is a bin edge, got {cap} * {num_bins}"
        )

    key = labels_key(
        network, dataset, num_classes=num_classes, cap=cap, num_bins=num_bins, autocast_dtype=autocast_dtype
    )
    finished, replaced = _check_reusable(label_dir, key, reuse)
    group.barrier()
    if finished is not None:
        return finished

    tmp_dir = label_dir.parent / f".{label_dir.name}.tmp"
    cache_dir = tmp_dir / ".cache"
    try:
        if group.rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of an interrupted attempt
            with _writing(tmp_dir):
                cache_dir.mkdir(parents=True)
        group.barrier()

        was_training = network.training
        network.eval()
        try:
            estimator, counts, cached = _infer_and_cache(
                network,
                dataset,
                cache_dir,
                num_classes,
                num_bins,
                cap,
                batch_size,
                num_workers,
                device,
                autocast_dtype,
                group,
                progress,
            )
        finally:
            network.train(was_training)

        estimator.sync(group.reduce_sum, group.device)
        counts.sync(group.reduce_sum, group.device)
        thresholds = estimator.compute()
        threshold_bins = torch.round(thresholds.double() * num_bins).long()
        _write_labels(cached, threshold_bins.numpy(), tmp_dir)
        statistics = _statistics_record(counts.statistics(estimator.histogram, threshold_bins), thresholds)
        group.barrier()

        record = {
            "thresholds": {
                name: float(t) for name, t in zip(CLASS_NAMES[:num_classes], thresholds.tolist(), strict=True)
            },
            "key": key,
            "description": dict(description or {}),
            "num_processes": group.world_size,
        }
        if group.rank == 0:
            with _writing(tmp_dir):
                shutil.rmtree(cache_dir)
                (tmp_dir / STATISTICS_FILE).write_text(json.dumps(statistics, indent=2))
                # thresholds.json is the completion marker: written last, inside the folder that is then renamed.
                (tmp_dir / THRESHOLDS_FILE).write_text(json.dumps(record, indent=2))
                _move_into_place(tmp_dir, label_dir)
        group.barrier()
    except BaseException as error:
        # Nothing half-made stays behind; a full disk or a read-only folder is reported for the generation's folder.
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(error, WriteError):
            raise WriteError.of(error, label_dir) from error
        raise
    return GenerationResult(label_dir, thresholds.tolist(), statistics, replaced=replaced)


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An ``OSError`` raised in the block (a full disk, a read-only folder) becomes a :class:`WriteError` naming
    ``path``; errors of reading the images stay what they are."""
    try:
        yield
    except OSError as error:
        raise (error if isinstance(error, WriteError) else WriteError.of(error, path)) from error


def _save_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with _writing(path):
        np.savez(path, **arrays)


def _move_into_place(tmp_dir: Path, label_dir: Path) -> None:
    """Rename the finished ``tmp_dir`` to ``label_dir``, replacing what is there (an empty or outdated folder)."""
    label_dir.parent.mkdir(parents=True, exist_ok=True)
    if not label_dir.exists():
        os.replace(tmp_dir, label_dir)
        return
    outdated = label_dir.parent / f".{label_dir.name}.outdated"
    shutil.rmtree(outdated, ignore_errors=True)
    os.replace(label_dir, outdated)  # a kill from here to the next line leaves no folder, never a mixed one
    os.replace(tmp_dir, label_dir)
    shutil.rmtree(outdated)


def _infer_and_cache(
    network: nn.Module,
    dataset: Dataset,
    cache_dir: Path,
    num_classes: int,
    num_bins: int,
    cap: float,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    group: ProcessGroup,
    progress: bool,
) -> tuple[ClasswiseThresholdEstimator, _GroundTruthCounts, list[tuple[Path, str]]]:
    """Pass 1: inference over this rank's shard; returns the local histogram, the local ground-truth counts and the
    cached (file, name) pairs."""
    # Shard by index, not with DistributedSampler: it pads with repeated images, which would be counted twice.
    shard = Subset(dataset, range(group.rank, len(dataset), group.world_size))
    loader = DataLoader(
        shard,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=_collate_uint8_masks,
        # A generator of its own leaves the global random state to training (an exact resume).
        generator=torch.Generator().manual_seed(0),
    )
    estimator = ClasswiseThresholdEstimator(num_classes, num_bins, cap)
    counts = _GroundTruthCounts(num_classes, num_bins, device)
    cached: list[tuple[Path, str]] = []
    pending: list[Future] = []
    writer = ThreadPoolExecutor(IO_THREADS)
    bar = _progress_bar(len(loader), enabled=progress and group.rank == 0, world_size=group.world_size)
    try:
        for batch in loader:
            _infer_batch(
                batch,
                network,
                device,
                autocast_dtype,
                num_classes,
                estimator,
                counts,
                cache_dir,
                group,
                cached,
                pending,
                writer,
            )
            # Bound the writes in flight (and so the host memory they hold).
            while len(pending) > 4 * IO_THREADS:
                pending.pop(0).result()
            bar.update(1)
        for future in pending:
            future.result()
    finally:
        writer.shutdown(wait=True)
        bar.close()
    return estimator, counts, cached


def _collate_uint8_masks(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate`` with the masks narrowed to uint8 first, as the cache keeps them (trainIds and 255).

    A batch waits in the loader's queues and in pinned memory with 1 byte a mask pixel instead of 8.
    """
    return default_collate(
        [{**sample, "mask": torch.as_tensor(sample["mask"]).to(torch.uint8)} for sample in samples]
    )


def _infer_batch(
    batch: dict[str, Any],
    network: nn.Module,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    num_classes: int,
    estimator: ClasswiseThresholdEstimator,
    counts: _GroundTruthCounts,
    cache_dir: Path,
    group: ProcessGroup,
    cached: list[tuple[Path, str]],
    pending: list[Future],
    writer: ThreadPoolExecutor,
) -> None:
    """Run one batch, feed the histogram and the ground-truth counts, and queue the cache writes of its images."""
    images = batch["image"].to(device, non_blocking=True)
    masks = batch["mask"]
    masks_host = masks.numpy()
    if ((masks_host != IGNORE_INDEX) & (masks_host >= num_classes)).any():
        raise ValueError(f"gt holds values outside 0..{num_classes - 1} and {IGNORE_INDEX}")
    with _autocast(device, autocast_dtype):
        logits = network(images)
        if isinstance(logits, tuple):
            logits = logits[0]
        if logits.shape[1] != num_classes:
            raise ValueError(f"the network predicts {logits.shape[1]} classes, expected {num_classes}")
    # Upsampled and normalised in float32: bf16 probabilities would blur the 1e-3-wide confidence bins.
    logits = network.upsample_logits(logits.float(), tuple(masks.shape[-2:]))
    confidence, predicted = torch.softmax(logits, dim=1).max(dim=1)
    bins = estimator.bin_index(confidence)
    estimator.update_from_bins(bins, predicted)  # argmax classes are in range: no check, no device sync
    counts.update(bins, predicted, masks)
    # Narrowed on the device: 3 bytes a pixel cross to the host instead of 16.
    predicted_host = predicted.to(torch.uint8).cpu().numpy()
    bins_host = bins.to(torch.int16).cpu().numpy()
    for i, name in enumerate(batch["name"]):
        path = cache_dir / f"r{group.rank}_{len(cached):08d}.npz"
        arrays = {"predicted": predicted_host[i], "bins": bins_host[i]}
        pending.append(writer.submit(_save_cache, path, arrays))
        cached.append((path, name))


def _write_labels(cached: list[tuple[Path, str]], threshold_bins: np.ndarray, tmp_dir: Path) -> None:
    """Pass 2: cached predictions -> label PNGs, in threads that run numpy and zlib only (no torch)."""

    def label_one(item: tuple[Path, str]) -> None:
        path, name = item
        with np.load(path) as arrays:
            predicted, bins = arrays["predicted"], arrays["bins"]
        labels = np.where(bins >= threshold_bins[predicted], predicted, IGNORE_INDEX).astype(np.uint8)
        with _writing(tmp_dir / f"{name}.png"):
            save_label_png(labels, tmp_dir / f"{name}.png")
        path.unlink()

    with ThreadPoolExecutor(LABEL_THREADS) as pool:
        for _ in pool.map(label_one, cached):
            pass


def _statistics_record(stats: PseudoLabelStatistics, thresholds: Tensor) -> dict[str, Any]:
    """The content of ``statistics.json``."""
    num_classes = stats.num_classes
    per_class = stats.as_records(thresholds, CLASS_NAMES[:num_classes])
    summary = stats.compute()
    evaluated = int(summary["evaluated"].sum())
    return {
        "labelled_share": float(summary["labelled_share"]),
        "precision": float(summary["correct"].sum()) / evaluated if evaluated else None,
        "classes": per_class,
    }


def _progress_bar(total: int, enabled: bool, world_size: int):
    from tqdm.auto import tqdm

    desc = "pseudo labels" + (f" (rank 0 of {world_size})" if world_size > 1 else "")
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
