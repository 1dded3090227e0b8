"""The Lightning datamodule: it pairs a source and a target dataset reader (:mod:`uda_sam.data`) for training.

- :mod:`uda_sam.datamodules.uda`: :class:`UDADataModule`, the datasets and loaders of every stage.
- :mod:`uda_sam.datamodules.sampling`: the training epochs' samplers and loaders (seeded, resumable mid-epoch).
- :mod:`uda_sam.datamodules.switchable`: the target training set whose pseudo-label folder changes in flight.
"""

from __future__ import annotations

from uda_sam.datamodules.uda import UDADataModule

__all__ = ["UDADataModule"]
