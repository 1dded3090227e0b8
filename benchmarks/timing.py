"""Timing shared by the benchmark scripts: synchronised wall-clock times, host-device synchronisation counts and
the time box a script measures within.

Imported as ``from timing import ...`` (a script's own folder is on ``sys.path``), like ``machine``.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "Share",
    "SyncCounter",
    "TimeBox",
    "median_ms",
    "process_age",
    "synchronize",
    "synchronized_time",
    "timed",
]


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


def process_age() -> float:
    """Seconds since this process started (its imports included); 0 where ``/proc`` does not tell."""
    try:
        # /proc/self/stat: field 22 is the start time in clock ticks after boot; fields 3... follow the ")".
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


class TimeBox:
    """The time a script may spend, counted from the start of its process (imports included).

    A script stops starting new work once :meth:`expired` is true, i.e. once no time is left, and writes what it
    has. :meth:`share` splits what is left evenly between the pieces of work still to come, so that the last ones
    are measured (with fewer steps) rather than skipped; :meth:`allot` gives the next piece its :class:`Share`.
    :attr:`reached` records that the box cut a measurement short (a piece stopped by its share, or the box used up);
    it never closes the box by itself. ``seconds=None`` is a box without a limit.

    Args:
        seconds: Length of the box, or ``None``.
        clock: Monotonic clock in seconds (a fake one in tests).
        started: When the box started on ``clock``; default: the start of this process.
    """

    def __init__(
        self, seconds: float | None, clock: Callable[[], float] = time.monotonic, started: float | None = None
    ) -> None:
        if seconds is not None and not seconds > 0:
            raise ValueError(f"--time-box must be a positive number of seconds, got {seconds!r}")
        self.seconds = seconds
        self.clock = clock
        self.started = clock() - process_age() if started is None else started
        self.reached = False

    def left(self) -> float:
        """Seconds left in the box (infinite without a limit)."""
        if self.seconds is None:
            return float("inf")
        return self.seconds - (self.clock() - self.started)

    def expired(self) -> bool:
        """Whether the box is used up; depends on the time left only (and then sets :attr:`reached`)."""
        if self.left() > 0:
            return False
        self.reached = True
        return True

    def share(self, pieces: int) -> float:
        """Time on :attr:`clock` at which the next of ``pieces`` equal pieces of what is left should end."""
        return self.clock() + max(self.left(), 0.0) / max(pieces, 1)

    def allot(self, pieces: int, min_steps: int = 0) -> Share:
        """The next of ``pieces`` equal pieces of what is left, which may always take ``min_steps`` steps."""
        return Share(self, self.share(pieces), min_steps)

    def record(self) -> dict[str, float | bool | None]:
        """The box as written in a results file: its length and whether it cut the measurements short."""
        return {"seconds": self.seconds, "reached": self.reached}


@dataclass(frozen=True)
class Share:
    """The part of a :class:`TimeBox` one piece of work (a benchmark variant) may use.

    The piece takes steps until :meth:`done`: once it has taken ``min_steps`` steps (its warm-up and a few timed
    ones, so that a piece whose first steps are slow, e.g. cuDNN's algorithm search, is still measured) and its
    share has ended, or at once when the whole box is used up (the caller's hard limit guards the rest).
    """

    box: TimeBox
    end: float
    min_steps: int = 0

    def done(self, steps_taken: int) -> bool:
        """Whether to stop after ``steps_taken`` steps."""
        if self.box.expired():
            return True
        return steps_taken >= self.min_steps and self.box.clock() >= self.end


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
