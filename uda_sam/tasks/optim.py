"""Optimiser construction and learning-rate schedules shared by the training tasks.

The schedules are plain functions of the step counted from the start of the current schedule (a generation
boundary restarts it, see :meth:`uda_sam.tasks.SegmentationTask.start_new_generation`), so that a resumed run
recomputes exactly the factor an uninterrupted run would use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import nn

__all__ = [
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "LRSchedule",
    "OptimizerName",
    "build_optimizer",
    "lr_factor",
    "trainable_param_groups",
]

OptimizerName = Literal["sgd", "adam"]
LRSchedule = Literal["poly", "step", "constant"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
LR_SCHEDULES: tuple[str, ...] = get_args(LRSchedule)


def lr_factor(
    step: int,
    schedule: LRSchedule,
    total_steps: int | None = None,
    power: float = 0.9,
    step_size: int = 50000,
    gamma: float = 0.1,
) -> float:
    """Multiplier of the initial learning rate after ``step`` optimiser steps of the current schedule.

    Args:
        step: Optimiser steps taken since the schedule (re)started; negative values count as 0.
        schedule: ``"poly"``: ``(1 - step / total_steps) ** power``, 0 from ``total_steps`` on (DeepLab);
            ``"step"``: ``gamma ** (step // step_size)`` (FCN-8s with Adam); ``"constant"``: 1.
        total_steps: Horizon of the poly schedule.
        power: Exponent of the poly schedule.
        step_size: Steps between two decays of the step schedule.
        gamma: Decay factor of the step schedule.

    Returns:
        The factor, in ``[0, 1]`` for the shipped schedules.

    Raises:
        ValueError: On an unknown schedule, or ``"poly"`` without a positive ``total_steps``.
    """
    step = max(int(step), 0)
    if schedule == "poly":
        if total_steps is None or total_steps <= 0:
            raise ValueError(
                "lr_schedule='poly' needs a positive horizon: set the task's schedule_steps or trainer.max_steps"
            )
        return max(0.0, 1.0 - step / total_steps) ** power
    if schedule == "step":
        return gamma ** (step // step_size)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {schedule!r}")


def trainable_param_groups(groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep only parameters that require gradients; drop groups that end up empty (e.g. frozen BatchNorm)."""
    kept = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            kept.append({**group, "params": params})
    return kept


def _fast_kwargs(params: Sequence[nn.Parameter]) -> dict[str, bool]:
    # The fused kernels need every parameter on CUDA; on CPU PyTorch's default (for-loop/foreach) is used.
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def build_optimizer(
    groups: Sequence[dict[str, Any]],
    name: OptimizerName = "sgd",
    lr: float = 2.5e-4,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    betas: tuple[float, float] = (0.9, 0.99),
) -> torch.optim.Optimizer:
    """Build SGD (momentum, weight decay) or Adam (betas, weight decay) over parameter groups.

    Args:
        groups: Parameter groups, each with ``"params"`` and optionally its own ``"lr"``.
        name: ``"sgd"`` or ``"adam"``.
        lr: Default learning rate of groups without one.
        momentum: SGD momentum.
        weight_decay: L2 weight decay (both optimisers).
        betas: Adam coefficients.

    Returns:
        The optimiser; fused CUDA kernels are used when every parameter lives on a CUDA device.

    Raises:
        ValueError: On an unknown optimiser name or no trainable parameter.
    """
    groups = list(groups)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("the optimiser has no trainable parameter (every parameter has requires_grad=False)")
    fast = _fast_kwargs(params)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, **fast)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **fast)
    raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")
