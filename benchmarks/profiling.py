"""A few training steps under ``torch.profiler``, written as a compact text table with the shares that matter.

Used by ``train_step.py --profile DIR``. After a variant's timed steps, :class:`StepProfiler` records
``PROFILE_WARMUP`` untraced and ``PROFILE_STEPS`` traced steps (CPU activity always, CUDA activity on CUDA) and
:meth:`StepProfiler.write` writes ``DIR/<variant>_profile.txt``: one line of totals, then the top ``TOP_ROWS`` rows
of ``key_averages()``, sorted by self device time on CUDA and by self CPU time on the CPU, per traced step.

The totals line splits the busy time of a step:

- busy: on CUDA the summed duration of every device activity (kernels, memcpy, memset), on the CPU the summed self
  CPU time of every operator (``ProfilerStep#`` excluded: that is Python between operators);
- conv: on CUDA the kernels launched by a convolution operator (an ``aten::`` operator whose name contains
  ``conv``: ``cudnn_convolution``, ``convolution_backward`` ...) that are not layout conversions; on the CPU the
  self time of those operators;
- layout/copy: every kernel (CUDA) or operator (CPU) whose name matches :data:`LAYOUT_RE` (case-insensitive):
  ``nchwToNhwc`` / ``nhwcToNchw`` (cuDNN's conversions around an NHWC kernel), ``transpose``, ``convert``,
  ``copy`` (ATen's ``direct_copy_kernel``, which also casts dtypes and changes memory formats; ``aten::copy_``,
  ``aten::_to_copy``) and ``cast`` (not ``broadcast``). Host-device transfers (``Memcpy HtoD``) do not match.

On CUDA the line also gives the wall time of a traced step next to its busy device time: a step whose device is
busy for much less than its wall time waits on the host (kernel launches, Python), not on the GPU's arithmetic.
The traced steps run slower than untraced ones by the profiler's own cost per operator.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from timing import synchronized_time  # benchmarks/timing.py
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

__all__ = ["LAYOUT_RE", "PROFILE_STEPS", "PROFILE_WARMUP", "StepProfiler", "compact_name", "is_conv_op"]

#: Steps run under the profiler before tracing (its own start-up lands there) and steps traced.
PROFILE_WARMUP = 1
PROFILE_STEPS = 3
TOP_ROWS = 25
NAME_WIDTH = 100
#: Layout conversions and copies, matched against kernel names (CUDA) or operator names (CPU).
LAYOUT_RE = re.compile(r"nchwtonhwc|nhwctonchw|transpose|convert|copy|(?<!broad)cast", re.IGNORECASE)
# Noise removed from kernel names in the table (the full names are still what the rules match).
_NOISE_RE = re.compile(
    r"^void |at::native::|\(anonymous namespace\)::|at::|c10::|\((?:at::)?TensorIteratorBase&\)|\{lambda\([^)]*\)#\d+\}"
    r"|::operator\(\)\(\) const"
)


def _annotation(event: Any) -> bool:
    """Whether a profiler event is a ``record_function`` range (e.g. the optimiser's step) rather than work."""
    return bool(getattr(event, "is_user_annotation", False))


def is_conv_op(name: str) -> bool:
    """Whether an operator is a convolution (forward or backward): an ``aten::`` name containing ``conv``."""
    return name.startswith("aten::") and "conv" in name.lower()


def compact_name(name: str, width: int = NAME_WIDTH) -> str:
    """``name`` without template noise, cut to ``width`` characters."""
    short = re.sub(r"\s+", " ", re.sub(r"::(:+)", "::", _NOISE_RE.sub("", name))).strip()
    return short if len(short) <= width else short[: width - 3] + "..."


class StepProfiler:
    """Drive ``torch.profiler`` over ``PROFILE_WARMUP + PROFILE_STEPS`` steps: :meth:`begin` and :meth:`end` around
    each step until :attr:`done`, then :meth:`write`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.profiler = profile(
            activities=activities,
            schedule=schedule(wait=0, warmup=PROFILE_WARMUP, active=PROFILE_STEPS, repeat=1),
        )
        self.taken = 0
        self.traced_since: float | None = None  # when the first traced step started
        self.traced_until: float | None = None

    @property
    def done(self) -> bool:
        return self.taken >= PROFILE_WARMUP + PROFILE_STEPS

    def begin(self) -> None:
        """Before a step."""
        if self.taken == 0:
            self.profiler.start()
        if self.taken == PROFILE_WARMUP:
            self.traced_since = synchronized_time(self.device)

    def end(self) -> None:
        """After a step."""
        self.taken += 1
        if self.done:
            self.traced_until = synchronized_time(self.device)
        self.profiler.step()
        if self.done:
            self.profiler.stop()

    def summary(self) -> tuple[dict[str, Any], list[Any]]:
        """The totals (per traced step) and the ``key_averages`` rows, most expensive first."""
        gpu = self.device.type == "cuda"
        events = self.profiler.events()
        rows = [row for row in self.profiler.key_averages() if not row.key.startswith("ProfilerStep")]
        if gpu:
            # Device activities: kernels, memcpy, memset; not the ranges of record_function shown on the GPU.
            device = [e for e in events if e.device_type == DeviceType.CUDA and not _annotation(e)]
            busy = sum(e.device_time_total for e in device)
            layout = sum(e.device_time_total for e in device if LAYOUT_RE.search(e.name))
            conv = sum(
                kernel.duration
                for e in events
                if e.device_type == DeviceType.CPU and is_conv_op(e.name)
                for kernel in e.kernels  # the kernels this operator launched
                if not LAYOUT_RE.search(kernel.name)
            )
            rows = [r for r in rows if r.device_type == DeviceType.CPU or not _annotation(r)]
            rows.sort(key=lambda r: r.self_device_time_total, reverse=True)
        else:
            busy = sum(r.self_cpu_time_total for r in rows)
            layout = sum(r.self_cpu_time_total for r in rows if LAYOUT_RE.search(r.key))
            conv = sum(r.self_cpu_time_total for r in rows if is_conv_op(r.key))
            rows.sort(key=lambda r: r.self_cpu_time_total, reverse=True)
        assert self.traced_since is not None and self.traced_until is not None
        totals = {
            "traced_steps": PROFILE_STEPS,
            "wall_ms_per_step": 1000 * (self.traced_until - self.traced_since) / PROFILE_STEPS,
            "busy": "device" if gpu else "cpu operators",
            "busy_ms_per_step": busy / 1000 / PROFILE_STEPS,
            "conv_share": conv / busy if busy else None,
            "layout_share": layout / busy if busy else None,
        }
        return totals, rows

    def write(self, path: Path, title: str) -> dict[str, Any]:
        """Write the table to ``path``; returns the totals, their line (``text``) and the file's name."""
        totals, rows = self.summary()
        gpu = self.device.type == "cuda"
        steps = PROFILE_STEPS
        busy = totals["busy_ms_per_step"]
        text = totals_text(totals)
        lines = [
            f"# {title}: {steps} traced steps after {PROFILE_WARMUP} untraced (benchmarks/profiling.py)",
            text,
            "",
            "(ms and calls per traced step"
            + ("; an op's device time is that of the kernels it launched)" if gpu else ")"),
        ]
        if gpu:
            lines.append(
                f"{'self device ms':>14} {'% busy':>7} {'calls':>6} {'self CPU ms':>11}  kind    name"
            )
        else:
            lines.append(f"{'self CPU ms':>14} {'% busy':>7} {'calls':>6}  name")  # fmt: skip
        for row in rows[:TOP_ROWS]:
            calls = row.count / steps
            if gpu:
                ms = row.self_device_time_total / 1000 / steps
                kind = "op" if row.device_type == DeviceType.CPU else "kernel"
                lines.append(f"{ms:14.2f} {100 * ms / busy if busy else 0:6.1f}% {calls:6.0f} "
                             f"{row.self_cpu_time_total / 1000 / steps:11.2f}  {kind:<6}  {compact_name(row.key)}")  # fmt: skip
            else:
                ms = row.self_cpu_time_total / 1000 / steps
                lines.append(f"{ms:14.2f} {100 * ms / busy if busy else 0:6.1f}% {calls:6.0f}  {compact_name(row.key)}")  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return {"file": path.name, **totals, "text": text}


def totals_text(totals: dict[str, Any]) -> str:
    """The totals of a profile in one line."""

    def share(key: str) -> str:
        return "-" if totals[key] is None else f"{100 * totals[key]:.1f} %"

    return (
        f"per traced step: wall {totals['wall_ms_per_step']:.1f} ms, {totals['busy']} busy "
        f"{totals['busy_ms_per_step']:.1f} ms, of which conv {share('conv_share')}, "
        f"layout/copy {share('layout_share')}"
    )
