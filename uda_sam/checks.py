"""Option checks shared by every layer (the tasks, the callbacks, the commands); imports nothing of the package."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["check_choice"]


def check_choice(option: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming ``option`` and its ``choices`` when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{option} must be one of {list(choices)}, got {value!r}")
