"""The LightningDataModule pairing a labelled source domain with an unlabelled (or pseudo-labelled) target domain."""

from __future__ import annotations

import inspect
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from uda_sam.data.base import SegmentationDataset, check_limit
from uda_sam.data.image_folder import ImageFolder
from uda_sam.data.transforms import SegmentationTransform, check_normalization, check_scale, check_size
from uda_sam.datamodules.sampling import EpochLoader, EpochSampler, SeededSamples
from uda_sam.datamodules.switchable import SwitchableLabels

__all__ = ["UDADataModule"]

#: The arguments the datamodule sets on the target reader to read its splits (see ``UDADataModule``).
TARGET_ARGUMENTS = ("split", "labels", "pseudo_label_root", "list_file", "limit", "transform")


def _check_reader(dataset: object, option: str, example: str, needs: tuple[str, ...] = ("transform",)) -> Any:
    """``dataset`` if it is a reader taking the arguments ``needs``, else a ValueError naming ``data.{option}``."""
    expected = f"a dataset reader, in YAML {{class_path: {example}, init_args: {{root: ...}}}}"
    if not isinstance(dataset, SegmentationDataset):
        raise ValueError(f"data.{option} must be {expected}; got {dataset!r}")
    missing = [name for name in needs if name not in inspect.signature(type(dataset)).parameters]
    if missing:
        raise ValueError(
            f"data.{option} must be {expected}; {type(dataset).__name__} lacks the argument(s) {', '.join(missing)} "
            f"that the datamodule sets on a {option} reader"
        )
    return dataset


def _target_train_set(dataset: SegmentationDataset, label_root: str | None) -> SegmentationDataset:
    """The target training set reading the pseudo labels of ``label_root``."""
    return dataset.replace(pseudo_label_root=label_root)


def _ground_truth_target_train_set(
    dataset: SegmentationDataset, label_root: str | None
) -> SegmentationDataset:
    """The target training set with its ground truth, whatever pseudo labels exist (``target_labels="gt"``)."""
    return dataset


def _read(dataset: Dataset, option: str) -> Dataset:
    """Find ``dataset``'s files now, so that a wrong root fails in ``setup`` with the option named."""
    try:
        len(dataset)  # type: ignore[arg-type]
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(f"data.{option}: {error}") from error
    return dataset


class UDADataModule(LightningDataModule):
    """A labelled source domain + the target domain's train images (unlabelled or pseudo-labelled); target val for eval.

    The two domains are dataset readers (:mod:`uda_sam.data`), given as objects: in YAML ::

        data:
          source: {class_path: uda_sam.data.GTA5, init_args: {root: data/gta5}}
          target: {class_path: uda_sam.data.Cityscapes, init_args: {root: data/cityscapes}}

    Each reader knows its dataset's on-disk layout and label mapping; the datamodule builds the transforms once
    (each domain's size, the training augmentation, the normalisation) and hands them to the readers, and reads
    the target's splits through the arguments ``split``, ``labels``, ``pseudo_label_root``, ``list_file`` and
    ``limit`` (those of :class:`~uda_sam.data.Cityscapes`), so a new dataset is one reader module.

    Training batches are ``{"source": {"image", "mask", "name"}, "target": {"image", "mask", "name"}}``,
    ``batch_size`` images per domain: one epoch is ``steps_per_epoch`` steps (default: as many as the larger
    domain fills), and each domain draws that many batches, reshuffled every epoch and cycling through its set
    (:class:`~uda_sam.datamodules.sampling.EpochSampler`). Training is iteration-based: set ``trainer.max_steps``
    (epochs simply continue). Under DDP every process takes its own share of each epoch. The orders depend only on
    the seed and the epoch, and the loaders record their position in checkpoints, so a run resumed from any
    checkpoint sees the batches an uninterrupted run would (:class:`~uda_sam.datamodules.sampling.EpochLoader`);
    no loader draws from the global random generator. The random scale, crop and flip of each training draw
    depend only on the seed, the epoch and the draw's position in it, so a resumed run augments as an
    uninterrupted one, whatever its loader workers.

    Target training masks are the pseudo labels of ``pseudo_label_root`` when set, else all 255. Validation runs on
    the target's val split (image at ``target_size``; mask at full resolution when ``val_label_size="full"``), test
    on ``test_split`` (val for Cityscapes, whose test labels are not public; the toy pair's labelled ``test``).
    The toy domain pair (:func:`uda_sam.data.toy.make_toy_data`) is read with the GTA5 and Cityscapes readers.

    Args:
        source: the labelled source dataset, e.g. :class:`~uda_sam.data.GTA5` or :class:`~uda_sam.data.Synthia`
            (its ``root``, ``list_file``, GTA5's translated ``image_root``); its transform is set here.
        target: the target dataset, e.g. :class:`~uda_sam.data.Cityscapes` (its ``root``; its ``list_file``
            chooses the training images); its splits, labels and transform are set here.
        source_size: ``(width, height)`` the source images are resized to (1280x720 for GTA5, 1280x760 for
            SYNTHIA), ``None`` = native size.
        target_size: ``(width, height)`` the target images are resized to, ``None`` = native size.
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
        source_holdout: the last ``source_holdout`` source images (in list or file order) are kept out of
            training, for diagnostics on labelled source images nothing trained on (the SAM's attention quality,
            :meth:`source_holdout_dataset`); 0 trains on every image.
        target_labels: masks of the target training images: ``"pseudo"`` (the pseudo labels, or all 255 before
            any exist; the UDA setting) or ``"gt"`` (the target's ground truth: the target-supervised "Oracle").
        test_split: the target split ``test`` / ``trainer.test`` scores: ``"val"`` (Cityscapes' public
            labels) or ``"test"`` (a labelled test split, e.g. the toy pair's, for reporting on images that no
            setting was chosen on).
        steps_per_epoch: if set, every training epoch is exactly this many steps (each domain draws
            ``steps_per_epoch x batch_size`` images per process, reshuffled, cycling through its set), so that
            generation boundaries of :class:`~uda_sam.callbacks.PseudoLabelRegeneration` can fall on epoch ends;
            ``None``: the larger domain's images // (``batch_size`` x processes).
        predict_root: ``uda-sam predict`` reads every PNG/JPEG image below this folder (any tree of sub-folders;
            see :class:`~uda_sam.data.image_folder.ImageFolder`: image at ``target_size``, predictions at each
            image's own resolution, one image per batch) instead of the target's val split; ``None`` = val.

    Raises:
        ValueError: ``source`` or ``target`` is not a dataset reader (or the target lacks the split arguments),
            or an option is out of its range.
    """

    def __init__(
        self,
        *,
        source: SegmentationDataset,
        target: SegmentationDataset,
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
        source_holdout: int = 0,
        target_labels: Literal["pseudo", "gt"] = "pseudo",
        test_split: Literal["val", "test"] = "val",
        steps_per_epoch: int | None = None,
        predict_root: str | None = None,
    ) -> None:
        super().__init__()
        self.source = _check_reader(source, "source", "uda_sam.data.GTA5")
        self.target = _check_reader(target, "target", "uda_sam.data.Cityscapes", TARGET_ARGUMENTS)
        if getattr(target, "pseudo_label_root", None) is not None:
            raise ValueError("data.target must not set pseudo_label_root; set data.pseudo_label_root instead")
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
        for option, reader in (("source", source), ("target", target)):
            if self.hparams.get(option) is reader:  # made in Python: its arguments, in plain values
                self.hparams[option] = reader.as_config()

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
        self.source_holdout = source_holdout
        self.target_labels = target_labels
        self.test_split = test_split
        self.steps_per_epoch = steps_per_epoch
        self.predict_root = predict_root

        # The transforms, built once and handed to the readers: training (augmented) and evaluation, per domain.
        augmentation = {"random_scale": self.random_scale, "crop_size": self.crop_size, "hflip": hflip}
        self.source_transform = SegmentationTransform(self.source_size, normalization, **augmentation)
        self.source_eval_transform = SegmentationTransform(self.source_size, normalization)
        self.target_transform = SegmentationTransform(self.target_size, normalization, **augmentation)
        self.target_eval_transform = SegmentationTransform(self.target_size, normalization)
        self.val_transform = SegmentationTransform(
            self.target_size, normalization, resize_mask=val_label_size == "resized"
        )
        self.predict_transform = SegmentationTransform(self.target_size, normalization, resize_mask=False)

        self.sampler_seed: int | None = None  # fixed at the first training loader, saved in checkpoints
        self.source_train: Dataset | None = None
        self.target_train: SwitchableLabels | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.predict_dataset: Dataset | None = None

    # ----------------------------------------------------------------------------------------------- datasets
    def _make_source_train(self) -> Dataset:
        dataset = _read(self.source.replace(transform=self.source_transform), "source")
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
        dataset = _read(self.source.replace(transform=self.source_eval_transform), "source")
        return Subset(dataset, range(len(dataset) - self.source_holdout, len(dataset)))

    def _make_target_train(self) -> SwitchableLabels:
        pseudo = self.target_labels == "pseudo"
        dataset = self.target.replace(
            split="train", labels="none" if pseudo else "gt", transform=self.target_transform
        )
        build = partial(_target_train_set if pseudo else _ground_truth_target_train_set, dataset)
        return SwitchableLabels(build, self.pseudo_label_root)

    def _make_val(self, split: str, limit: int | None = None, labels: str = "gt") -> Dataset:
        dataset = self.target.replace(
            split=split, labels=labels, list_file=None, limit=limit, transform=self.val_transform
        )
        return _read(dataset, "target")

    def target_inference_dataset(self) -> SegmentationDataset:
        """Target **train** images without augmentation, for pseudo-label inference.

        Image at ``target_size``; mask = ground truth where the target has it, else all 255; name as the
        reader names it (``"{city}/{city}_{seq}_{frame}"`` for Cityscapes).
        """
        dataset = self.target.replace(split="train", labels="optional", transform=self.target_eval_transform)
        return _read(dataset, "target")  # type: ignore[return-value]

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
            self._check_enough(self.source_train, f"source ({type(self.source).__name__})")
            self.target_train = self._make_target_train()
            _read(self.target_train, "target")
            self._check_enough(self.target_train, f"target ({type(self.target).__name__} train)")
        if stage in (None, "fit", "validate"):
            self.val_dataset = self._make_val("val", self.val_limit)
        if stage in (None, "test"):
            self.test_dataset = self._make_val(self.test_split)
        if stage in (None, "predict"):
            self.predict_dataset = (
                self._make_val("val", labels="optional")
                if self.predict_root is None
                else _read(ImageFolder(self.predict_root, transform=self.predict_transform), "predict_root")
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
        """The target's val split with ground truth; under DDP each image is evaluated by exactly one process."""
        return self._eval_loader(self._require(self.val_dataset, "validate"))

    def test_dataloader(self) -> DataLoader:
        """The target's ``test_split`` with ground truth (val by default: Cityscapes' test labels are not public)."""
        return self._eval_loader(self._require(self.test_dataset, "test"))

    def predict_dataloader(self) -> DataLoader:
        """The target's val images (masks from ground truth where present), or the images of ``predict_root``.

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
        (:class:`~uda_sam.datamodules.switchable.SwitchableLabels`). Switch between epochs. Under DDP call it on every rank
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
