"""Writing files atomically: readers (and a resumed run) see a whole file or none, never a truncated one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["write_atomically"]


def write_atomically(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(handle)`` on a temporary file next to ``path``, then rename it to ``path``.

    The temporary name is unique per call (several processes may write into one folder) and the file is created
    like any other (the umask applies). On any error the temporary file is removed and the error re-raised;
    an existing ``path`` is then left as it was.

    Args:
        path: Destination file; parent folders are created.
        write: Writes the content to the binary handle it is given (``torch.save(obj, handle)``,
            ``image.save(handle, format="PNG")``, ``handle.write(data)``, ...).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
