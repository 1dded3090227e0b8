"""A dataset whose label folder can change while the data loader over it, and its worker processes, live on.

The pseudo labels of the target training set change at every generation of self-training. Rebuilding the train
loader for each generation would need Lightning's private state; instead the loader keeps one
:class:`SwitchableLabels` dataset, and the folder it reads is a value in shared memory: the main process writes it
(:meth:`SwitchableLabels.switch`), every worker (persistent or not, forked or spawned) reads it before each sample
and, when it changed, builds its own copy of the dataset for the new folder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["SharedText", "SwitchableLabels"]


class SharedText:
    """A short text in shared memory with a version number: written by one process, read by its children.

    Args:
        text: The first value (``None`` is stored as "no value").
        capacity: Bytes reserved for the UTF-8 text.
    """

    def __init__(self, text: str | None = None, capacity: int = 4096) -> None:
        self._data = torch.zeros(capacity, dtype=torch.uint8).share_memory_()
        # [version, length + 1]; a length of 0 stands for None.
        self._header = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.set(text)

    @property
    def version(self) -> int:
        """Incremented by every :meth:`set`."""
        return int(self._header[0])

    def set(self, text: str | None) -> None:
        """Store ``text`` (``None`` allowed) and increment the version."""
        encoded = b"" if text is None else text.encode()
        if len(encoded) > self._data.numel():
            raise ValueError(f"text of {len(encoded)} bytes exceeds the {self._data.numel()} bytes reserved")
        if encoded:
            self._data[: len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
        self._header[1] = 0 if text is None else len(encoded) + 1
        self._header[0] += 1

    def get(self) -> str | None:
        """The stored text."""
        length = int(self._header[1])
        return None if length == 0 else bytes(self._data[: length - 1].tolist()).decode()


class SwitchableLabels(Dataset):
    """A dataset made by ``build(label_root)``, made again in each process when :meth:`switch` changes the root.

    Args:
        build: Makes the dataset for a label folder (``None``: the dataset's own default); must be picklable
            (e.g. a :func:`functools.partial` of the dataset class) when loader workers are spawned.
        label_root: The first folder.
    """

    def __init__(self, build: Callable[[str | None], Dataset], label_root: str | None = None) -> None:
        self._build = build
        self._root = SharedText(label_root)
        self._dataset = build(label_root)
        self._version = self._root.version

    @property
    def label_root(self) -> str | None:
        """The folder the samples are read with."""
        return self._root.get()

    @property
    def dataset(self) -> Dataset:
        """This process's dataset for the current folder."""
        version = self._root.version
        if version != self._version:  # switched since this copy was made: a worker catches up
            self._dataset = self._build(self._root.get())
            self._version = version
        return self._dataset

    def switch(self, label_root: str | None) -> None:
        """Read ``label_root`` from now on, in this process and in every worker of loaders over this dataset.

        The dataset for the new folder is built (and so validated) here first: if that raises, nothing changes.
        Switch between epochs, when no worker is reading a sample.
        """
        dataset = self._build(label_root)
        if len(dataset) != len(self._dataset):  # type: ignore[arg-type]
            raise ValueError(
                f"the dataset for labels {label_root} has {len(dataset)} samples, "  # type: ignore[arg-type]
                f"not {len(self._dataset)} like the one it replaces"  # type: ignore[arg-type]
            )
        self._root.set(label_root)
        self._dataset, self._version = dataset, self._root.version

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        """Other attributes (``samples``, ``names``, ``pseudo_label_root``, ...) are the current dataset's."""
        if name.startswith("_"):  # not set yet (e.g. while unpickling): no delegation
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"SwitchableLabels({self._dataset!r}, label_root={self.label_root!r})"
