"""Training samplers and loaders of the datamodule: epochs that depend only on the seed, resumable mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from uda_sam.data.transforms import augmentation_seed, sample_seed

__all__ = ["EpochLoader", "EpochSampler", "SeededSamples"]


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
