"""What ``uda-sam`` keeps off the console: notices a user of this package cannot act on.

Each filter below names what it hides and why; everything else (the stage headers, progress bars, tables, paths,
and every warning about the user's data or config) still shows. :func:`quiet_console` is called by
:class:`~uda_sam.cli.lightning.UDASamCLI`, so the commands and the pipeline's stages all get it.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_console"]

#: The first words of Lightning's advertisements ("try installing litlogger / litmodels").
TIP_PREFIX = "\N{ELECTRIC LIGHT BULB} Tip:"


class _DropTips(logging.Filter):
    """Drops Lightning's "💡 Tip:" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(TIP_PREFIX)


def quiet_console() -> None:
    """Install the filters (idempotent)."""
    # Lightning logs its tips with rank_zero_info on this logger: they advertise other products (LitLogger,
    # litmodels), not something this package or its user needs.
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_DropTips())
    # Raised inside Lightning's own pytree helper (lightning/pytorch/utilities/_pytree.py) at every fit, because
    # it uses torch's deprecated LeafSpec: Lightning's to change, nothing in a config or the data.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )
