"""The ``uda-sam`` command (Lightning), one module per part:

- :mod:`uda_sam.cli.entry_point`: the entry point (``main``), ``uda-sam --help`` and the one-message error handling;
- :mod:`uda_sam.cli.lightning`: :class:`UDASamCLI`, the LightningCLI of ``fit``, ``validate``, ``test``, ``predict``;
  :mod:`uda_sam.cli.checkpoint_config`: what ``predict --ckpt_path`` reads of a run from its checkpoint alone;
- :mod:`uda_sam.cli.pipeline`, :mod:`~uda_sam.cli.pseudo_label`, :mod:`~uda_sam.cli.evaluate`,
  :mod:`~uda_sam.cli.make_toy_data`: the package's own commands, each with its ``main(argv)``.

The names below are resolved on first use, so importing one command module (``uda_sam.cli.evaluate``) does not
import Lightning.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from uda_sam.cli.entry_point import EXTRA_COMMANDS, main
    from uda_sam.cli.lightning import UDASamCLI

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "EXTRA_COMMANDS": "uda_sam.cli.entry_point",
    "UDASamCLI": "uda_sam.cli.lightning",
    "main": "uda_sam.cli.entry_point",
}

__all__ = ["EXTRA_COMMANDS", "UDASamCLI", "main"]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'uda_sam.cli' has no attribute {name!r}")
    return getattr(import_module(module), name)
