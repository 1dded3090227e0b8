"""Timing shared by the benchmark scripts: synchronised wall-clock times and host-device synchronisation counts.

Imported as ``from timing import ...`` (a script's own folder is on ``sys.path``), like ``machine``.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

import torch

__all__ = ["SyncCounter", "median_ms", "synchronize", "synchronized_time", "timed"]


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on a CUDA ``device`` (nothing to wait for on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized_time(device: torch.device | str) -> float:
    """``time.perf_counter()`` once ``device`` has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


def timed(work: Callable[[], object], device: torch.device | str) -> float:
    """Seconds ``work()`` takes, the device synchronised before and after."""
    start = synchronized_time(device)
    work()
    return synchronized_time(device) - start


def median_ms(starts: Sequence[float], ends: Sequence[float]) -> float:
    """Median of ``ends[i] - starts[i]`` in milliseconds."""
    return 1000 * statistics.median(end - start for start, end in zip(starts, ends, strict=True))


class SyncCounter:
    """Collect the ``torch.cuda.set_sync_debug_mode("warn")`` warnings raised between :meth:`start` and :meth:`stop`.

    ``found`` counts them by ``file:line`` (package paths from ``uda_sam/`` or ``benchmarks/``, others from
    ``site-packages/``).
    """

    def __init__(self) -> None:
        self._catcher: warnings.catch_warnings | None = None
        self._records: list[warnings.WarningMessage] | None = None
        self.found: Counter = Counter()

    def start(self) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self._records = self._catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        torch.cuda.set_sync_debug_mode("default")
        assert self._catcher is not None and self._records is not None
        self._catcher.__exit__(None, None, None)
        for record in self._records:
            if "synchroniz" in str(record.message):
                path = record.filename.replace(os.sep, "/")
                if "site-packages/" in path:
                    path = path.split("site-packages/", 1)[1]
                else:
                    for marker in ("/uda_sam/", "/benchmarks/"):
                        if marker in path:
                            path = marker[1:] + path.split(marker, 1)[1]
                            break
                self.found[f"{path}:{record.lineno}"] += 1
        self._catcher = self._records = None
