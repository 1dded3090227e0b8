"""The LightningDataModule pairing a labelled source domain (GTA5 or SYNTHIA) with Cityscapes."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from uda_sam.data.base import check_limit
from uda_sam.data.cityscapes import Cityscapes
from uda_sam.data.gta5 import GTA5
from uda_sam.data.image_folder import ImageFolder
from uda_sam.data.switchable import SwitchableLabels
from uda_sam.data.synthia import Synthia
from uda_sam.data.transforms import (
    augmentation_seed,
    check_normalization,
    check_scale,
    check_size,
    sample_seed,
)


def _target_train_set(label_root: str | None, use_pseudo_labels: bool, **options: Any) -> Cityscapes:
    """The target training set reading the pseudo labels of ``label_root`` (when ``use_pseudo_labels``)."""
    return Cityscapes(pseudo_label_root=label_root if use_pseudo_labels else None, **options)


class EpochSampler(DistributedSampler):
    """This process's share of ``num_samples`` draws an epoch: reshuffled passes over ``size`` items, cycling as needed.

    The order of an epoch depends only on ``seed`` and the epoch number (:meth:`set_epoch`, which Lightning calls at
    every epoch start), so every process draws the same sequence and keeps every ``num_replicas``-th draw from
    ``rank`` on. Each draw is an ``(index, augmentation seed)`` pair (read by :class:`SeededSamples`); the seed is
    :func:`~uda_sam.data.transforms.sample_seed` of ``seed``, the epoch and the draw's position in the whole epoch,
    so an item drawn twice is augmented twice, differently, and a draw is augmented alike whichever process,
    worker or run loads it. Being a ``DistributedSampler``, it is not wrapped again by Lightning under DDP.
    ``start`` skips the first draws of this process's next pass only: a run resumed mid-epoch continues where it
    stopped.

    Args:
        size: Items in the dataset.
        num_samples: Indices an epoch over all processes (a multiple of ``num_replicas``).
        seed: Base seed of the orders.
        epoch: The epoch of the first pass.
        num_replicas: Processes sharing the epoch.
        rank: This process's index.
    """

    def __init__(
        self, size: int, num_samples: int, seed: int = 0, epoch: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.size = size
        self.num_samples = num_samples // num_replicas
        self.total_size = self.num_samples * num_replicas
        self.epoch = epoch
        self.start = 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        passes = -(-self.total_size // self.size)
        order = torch.cat([torch.randperm(self.size, generator=generator) for _ in range(passes)]).tolist()
        positions = range(self.rank, self.total_size, self.num_replicas)[self.start :]
        self.start = 0
        seed, epoch = self.seed, self.epoch
        return ((order[p], sample_seed(seed, epoch, p)) for p in positions)


class SeededSamples(Dataset):
    """A dataset read with ``(index, seed)`` keys: item ``index`` of ``dataset``, augmented from ``seed``.

    The keys come from an :class:`EpochSampler`; see :func:`~uda_sam.data.transforms.augmentation_seed`.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with augmentation_seed(seed):
            return self.dataset[index]


class EpochLoader(DataLoader):
    """A training ``DataLoader`` over an :class:`EpochSampler` that Lightning resumes where it stopped.

    Its state (saved in Lightning checkpoints) is the epoch and how many of its batches were given;
    :meth:`load_state_dict`, which Lightning calls on the new loader of a resumed run before iterating, makes the
    next pass start with the batch after them, so the resumed steps see the batches an uninterrupted run would.
    """

    sampler: EpochSampler

    def __init__(self, dataset: Dataset, sampler: EpochSampler, batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self.batches_given = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self.batches_given = self.sampler.start // self.batch_size  # type: ignore[operator]
        for batch in super().__iter__():
            self.batches_given += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The epoch and the batches of it given so far."""
        return {"epoch": int(self.sampler.epoch), "batches": int(self.batches_given)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue after the batches recorded by :meth:`state_dict` (at the next epoch after a full one)."""
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.start = batches * self.batch_size  # type: ignore[operator]


class UDADataModule(LightningDataModule):
    """Source images with labels + Cityscapes train images (unlabelled or pseudo-labelled); Cityscapes val for eval.

    Training batches are ``{"source": {"image", "mask", "name"}, "target": {"image", "mask", "name"}}``,
    ``batch_size`` images per domain: one epoch is ``steps_per_epoch`` steps (default: as many as the larger
    domain fills), and each domain draws that many batches, reshuffled every epoch and cycling through its set
    (:class:`EpochSampler`). Training is iteration-based: set ``trainer.max_steps`` (epochs simply continue).
    Under DDP every process takes its own share of each epoch. The orders depend only on the seed and the epoch,
    and the loaders record their position in checkpoints, so a run resumed from any checkpoint sees the batches an
    uninterrupted run would (:class:`EpochLoader`); no loader draws from the global random generator. The random
    scale, crop and flip of each training draw depend only on the seed, the epoch and the draw's position in it
    (:class:`EpochSampler`), so a resumed run augments as an uninterrupted one, whatever its loader workers.

    Target training masks are the pseudo labels of ``pseudo_label_root`` when set, else all 255. Validation runs on
    Cityscapes val (image at ``target_size``; mask at full resolution when ``val_label_size="full"``), test on
    ``test_split`` (val for Cityscapes, whose test labels are not public; the toy pair's labelled ``test``).
    The toy domain pair (:func:`uda_sam.data.toy.make_toy_data`) is read with ``source="gta5"``.

    Args:
        source: source dataset format, ``"gta5"`` or ``"synthia"``.
        source_root: source dataset root (``images/``+``labels/`` for GTA5, ``RGB/``+``GT/LABELS/`` for SYNTHIA).
        source_image_root: GTA5 only: folder of style-translated images replacing ``source_root/images``.
        target_root: Cityscapes root (``leftImg8bit/`` and ``gtFine/``).
        source_size: ``(width, height)`` the source images are resized to (1280x720 for GTA5, 1280x760 for
            SYNTHIA), ``None`` = native size.
        target_size: ``(width, height)`` the Cityscapes images are resized to, ``None`` = native size.
        val_label_size: ``"full"`` evaluates against the native-size labels, ``"resized"`` at ``target_size``.
        pseudo_label_root: folder of target pseudo labels ``{root}/{city}/{city}_{seq}_{frame}.png`` (uint8
            trainIds, 255 ignore); ``None`` = target masks all 255. See :meth:`set_pseudo_label_root`.
        batch_size: training images per domain per step (per process under DDP).
        val_batch_size: images per validation/test/predict batch.
        num_workers: data-loader worker processes per loader (0 = load in the main process).
        normalization: ``"imagenet"`` (RGB, mean/std) or ``"caffe"`` (BGR, 0-255, mean only).
        random_scale: optional ``(min, max)`` random rescale of training images (both domains).
        crop_size: optional random crop ``(width, height)`` of training images (both domains).
        hflip: random horizontal flip of training images (both domains).
        pin_memory: pin batches in page-locked memory (only when CUDA is available).
        persistent_workers: keep workers alive between epochs (only when ``num_workers > 0``).
        val_limit: evaluate on the first ``val_limit`` validation images only (``None`` = all 500).
        source_list_file: optional list of source image names (one per line) instead of every file.
        source_holdout: the last ``source_holdout`` source images (in list or file order) are kept out of
            training, for diagnostics on labelled source images nothing trained on (the SAM's attention quality,
            :meth:`source_holdout_dataset`); 0 trains on every image.
        target_list_file: optional list of Cityscapes train image names instead of every file.
        target_labels: masks of the target training images: ``"pseudo"`` (the pseudo labels, or all 255 before
            any exist; the UDA setting) or ``"gt"`` (the Cityscapes ground truth: the target-supervised "Oracle").
        test_split: the Cityscapes split ``test`` / ``trainer.test`` scores: ``"val"`` (Cityscapes' public
            labels) or ``"test"`` (a labelled test split, e.g. the toy pair's, for reporting on images that no
            setting was chosen on).
        steps_per_epoch: if set, every training epoch is exactly this many steps (each domain draws
            ``steps_per_epoch x batch_size`` images per process, reshuffled, cycling through its set), so that
            generation boundaries of :class:`~uda_sam.callbacks.PseudoLabelRegeneration` can fall on epoch ends;
            ``None``: the larger domain's images // (``batch_size`` x processes).
        predict_root: ``uda-sam predict`` reads every PNG/JPEG image below this folder (any tree of sub-folders;
            see :class:`~uda_sam.data.image_folder.ImageFolder`: image at ``target_size``, predictions at each
            image's own resolution, one image per batch) instead of Cityscapes val; ``None`` = Cityscapes val.
    """

    def __init__(
        self,
        *,
        source: Literal["gta5", "synthia"] = "gta5",
        source_root: str,
        source_image_root: str | None = None,
        target_root: str,
        source_size: tuple[int, int] | None = (1280, 720),
        target_size: tuple[int, int] | None = (1024, 512),
        val_label_size: Literal["full", "resized"] = "full",
        pseudo_label_root: str | None = None,
        batch_size: int = 1,
        val_batch_size: int = 1,
        num_workers: int = 4,
        normalization: Literal["imagenet", "caffe"] = "imagenet",
        random_scale: tuple[float, float] | None = None,
        crop_size: tuple[int, int] | None = None,
        hflip: bool = False,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        val_limit: int | None = None,
        source_list_file: str | None = None,
        source_holdout: int = 0,
        target_list_file: str | None = None,
        target_labels: Literal["pseudo", "gt"] = "pseudo",
        test_split: Literal["val", "test"] = "val",
        steps_per_epoch: int | None = None,
        predict_root: str | None = None,
    ) -> None:
        super().__init__()
        if source not in ("gta5", "synthia"):
            raise ValueError(f"source must be 'gta5' or 'synthia', got {source!r}")
        if source_image_root is not None and source != "gta5":
            raise ValueError("source_image_root (translated images) is only supported with source='gta5'")
        if val_label_size not in ("full", "resized"):
            raise ValueError(f"val_label_size must be 'full' or 'resized', got {val_label_size!r}")
        check_normalization(normalization)
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        if target_labels not in ("pseudo", "gt"):
            raise ValueError(f"target_labels must be 'pseudo' or 'gt', got {target_labels!r}")
        if test_split not in ("val", "test"):
            raise ValueError(f"test_split must be 'val' or 'test', got {test_split!r}")
        check_limit(steps_per_epoch, "steps_per_epoch")
        check_limit(val_limit, "val_limit")
        if not isinstance(source_holdout, int) or source_holdout < 0:
            raise ValueError(f"source_holdout must be a non-negative integer, got {source_holdout!r}")
        self.save_hyperparameters()

        self.source = source
        self.source_root = source_root
        self.source_image_root = source_image_root
        self.target_root = target_root
        self.source_size = check_size(source_size, "source_size")
        self.target_size = check_size(target_size, "target_size")
        self.crop_size = check_size(crop_size, "crop_size")
        self.random_scale = check_scale(random_scale)
        self.val_label_size = val_label_size
        self.pseudo_label_root = pseudo_label_root
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.normalization = normalization
        self.hflip = hflip
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.val_limit = val_limit
        self.source_list_file = source_list_file
        self.source_holdout = source_holdout
        self.target_list_file = target_list_file
        self.target_labels = target_labels
        self.test_split = test_split
        self.steps_per_epoch = steps_per_epoch

        self.sampler_seed: int | None = None  # fixed at the first training loader, saved in checkpoints
        self.source_train: Dataset | None = None
        self.target_train: SwitchableLabels | None = None
        self.val_dataset: Cityscapes | None = None
        self.test_dataset: Cityscapes | None = None
        self.predict_root = predict_root
        self.predict_dataset: Dataset | None = None

    # ----------------------------------------------------------------------------------------------- datasets
    def _augment(self) -> dict[str, Any]:
        return {
            "normalization": self.normalization,
            "random_scale": self.random_scale,
            "crop_size": self.crop_size,
            "hflip": self.hflip,
        }

    def _make_source(self, augment: bool = True) -> Dataset:
        options = self._augment() if augment else {"normalization": self.normalization}
        if self.source == "gta5":
            return GTA5(
                self.source_root,
                image_root=self.source_image_root,
                size=self.source_size,
                list_file=self.source_list_file,
                **options,
            )
        return Synthia(self.source_root, size=self.source_size, list_file=self.source_list_file, **options)

    def _make_source_train(self) -> Dataset:
        dataset = self._make_source()
        if self.source_holdout == 0:
            return dataset
        kept = len(dataset) - self.source_holdout  # type: ignore[arg-type]
        if kept < 1:
            raise ValueError(
                f"source_holdout={self.source_holdout} keeps no training image out of the {len(dataset)} source "  # type: ignore[arg-type]
                "images; lower it"
            )
        return Subset(dataset, range(kept))

    def source_holdout_dataset(self) -> Dataset | None:
        """The ``source_holdout`` source images kept out of training, without augmentation (``None`` if 0)."""
        if self.source_holdout == 0:
            return None
        dataset = self._make_source(augment=False)
        return Subset(dataset, range(len(dataset) - self.source_holdout, len(dataset)))  # type: ignore[arg-type]

    def _make_target_train(self) -> SwitchableLabels:
        build = partial(
            _target_train_set,
            use_pseudo_labels=self.target_labels == "pseudo",
            root=self.target_root,
            split="train",
            size=self.target_size,
            labels="gt" if self.target_labels == "gt" else "none",
            list_file=self.target_list_file,
            **self._augment(),
        )
        return SwitchableLabels(build, self.pseudo_label_root)

    def _make_val(
        self, limit: int | None, labels: Literal["gt", "optional"] = "gt", split: str = "val"
    ) -> Cityscapes:
        return Cityscapes(
            self.target_root,
            split=split,
            size=self.target_size,
            labels=labels,
            label_size=self.val_label_size,
            normalization=self.normalization,
            limit=limit,
        )

    def target_inference_dataset(self) -> Cityscapes:
        """Target **train** images without augmentation, for pseudo-label inference.

        Image at ``target_size``; mask = ground truth (labelIds -> trainIds) where the ``gtFine`` file exists,
        else all 255; name = ``"{city}/{city}_{seq}_{frame}"``.
        """
        return Cityscapes(
            self.target_root,
            split="train",
            size=self.target_size,
            labels="optional",
            list_file=self.target_list_file,
            normalization=self.normalization,
        )

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.world_size) if trainer is not None else 1

    def _check_enough(self, dataset: Dataset, what: str) -> None:
        # Training loaders drop incomplete batches: a domain smaller than one global batch would yield nothing.
        needed = self.batch_size * self._world_size()
        if len(dataset) < needed:  # type: ignore[arg-type]
            raise ValueError(
                f"the {what} training set has {len(dataset)} images, fewer than batch_size x processes = {needed}"  # type: ignore[arg-type]
            )

    def setup(self, stage: str | None = None) -> None:
        """Build (and validate, with errors naming the missing paths) the datasets the stage needs."""
        if stage in (None, "fit"):
            self.source_train = self._make_source_train()
            self._check_enough(self.source_train, f"source ({self.source})")
            self.target_train = self._make_target_train()
            self._check_enough(self.target_train, "target (Cityscapes train)")
        if stage in (None, "fit", "validate"):
            self.val_dataset = self._make_val(self.val_limit)
        if stage in (None, "test"):
            self.test_dataset = self._make_val(None, split=self.test_split)
        if stage in (None, "predict"):
            self.predict_dataset = (
                self._make_val(None, labels="optional")
                if self.predict_root is None
                else ImageFolder(self.predict_root, size=self.target_size, normalization=self.normalization)
            )

    # -------------------------------------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        """An evaluation loader, in order; its workers' seeds come from a generator of its own, not the global one."""
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            generator=torch.Generator().manual_seed(0),
            **self._loader_options(),
        )

    def _loader_options(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
        }

    def _require(self, dataset: Dataset | None, stage: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"UDADataModule.setup({stage!r}) must run before asking for its dataloader")
        return dataset

    def train_epoch_length(self) -> int:
        """Steps of a training epoch: ``steps_per_epoch``, else the larger domain's images // (batch x processes).

        Raises:
            RuntimeError: Before ``setup("fit")`` when ``steps_per_epoch`` is not set.
        """
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        source = self._require(self.source_train, "fit")
        target = self._require(self.target_train, "fit")
        return max(len(source), len(target)) // (self.batch_size * self._world_size())  # type: ignore[arg-type]

    def _epoch_loader(self, dataset: Dataset, seed: int) -> EpochLoader:
        trainer = getattr(self, "trainer", None)
        world_size = self._world_size()
        sampler = EpochSampler(
            len(dataset),  # type: ignore[arg-type]
            self.train_epoch_length() * self.batch_size * world_size,
            seed,
            epoch=int(trainer.current_epoch) if trainer is not None else 0,
            num_replicas=world_size,
            rank=int(trainer.global_rank) if trainer is not None else 0,
        )
        generator = torch.Generator().manual_seed(seed)
        return EpochLoader(
            SeededSamples(dataset), sampler, self.batch_size, generator=generator, **self._loader_options()
        )

    def train_dataloader(self) -> CombinedLoader:
        """``CombinedLoader({"source": ..., "target": ...})`` of two :class:`EpochLoader` of one epoch's length."""
        source = self._require(self.source_train, "fit")
        target = self._require(self.target_train, "fit")
        if self.sampler_seed is None:
            self.sampler_seed = torch.initial_seed() % 2**31
        loaders = {
            "source": self._epoch_loader(source, self.sampler_seed),
            "target": self._epoch_loader(target, self.sampler_seed + 1),
        }
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        sampler = None
        if self._world_size() > 1:
            # Every image exactly once across processes: Lightning's default DistributedSampler would repeat some
            # images to pad the last batch, and the summed confusion matrix would count them twice.
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=self._world_size(), rank=self.trainer.global_rank, shuffle=False
            )
        return self._loader(dataset, self.val_batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        """Cityscapes val with ground truth; under DDP each image is evaluated by exactly one process."""
        return self._eval_loader(self._require(self.val_dataset, "validate"))

    def test_dataloader(self) -> DataLoader:
        """``test_split`` with ground truth (Cityscapes val by default: its test split has no public labels)."""
        return self._eval_loader(self._require(self.test_dataset, "test"))

    def predict_dataloader(self) -> DataLoader:
        """Cityscapes val images (masks from ground truth where present), or the images of ``predict_root``.

        The images of ``predict_root`` come one per batch: their masks (and predictions) have each image's size.
        """
        dataset = self._require(self.predict_dataset, "predict")
        batch_size = 1 if isinstance(dataset, ImageFolder) else self.val_batch_size
        return self._loader(dataset, batch_size)

    # ----------------------------------------------------------------------------------- pseudo labels
    def set_pseudo_label_root(self, path: str | Path | None) -> None:
        """Switch the target training masks to another pseudo-label folder (``None``: back to all 255).

        If the training datasets exist already, the target set for the folder is built (and validated: every
        target image needs its file) at once, and the train loader already made reads it from its next epoch
        on, in its worker processes too (persistent or not): the folder is a value in shared memory
        (:class:`~uda_sam.data.switchable.SwitchableLabels`). Switch between epochs. Under DDP call it on every rank
        after the labels are completely written (e.g. after a barrier).

        Raises:
            FileNotFoundError: the folder does not exist or lacks files for some target images.
        """
        value = str(path) if path is not None else None
        if self.target_train is not None:
            self.target_train.switch(value)  # validates first; raises with nothing changed
        self.pseudo_label_root = value
        self.hparams["pseudo_label_root"] = value

    def state_dict(self) -> dict[str, Any]:
        """The current pseudo-label folder and the seed of the training orders, for an exact resume."""
        return {"pseudo_label_root": self.pseudo_label_root, "sampler_seed": self.sampler_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        if "pseudo_label_root" in state_dict:
            self.set_pseudo_label_root(state_dict["pseudo_label_root"])
        self.sampler_seed = state_dict.get("sampler_seed", self.sampler_seed)
