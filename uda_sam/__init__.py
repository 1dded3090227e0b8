"""uda-sam: unsupervised domain adaptation for semantic segmentation with a self-attention module (SAM).

Import the parts you need; importing the package itself stays light (no Lightning, no datasets):

- :mod:`uda_sam.nn`: the SAM, its losses and the segmentation networks (plain PyTorch).
- :mod:`uda_sam.data`: dataset readers, the UDA datamodule and the toy domain pair.
- :mod:`uda_sam.tasks`: the Lightning training tasks; :mod:`uda_sam.cli`: the ``uda-sam`` command.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("uda-sam")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

__all__ = ["__version__"]
