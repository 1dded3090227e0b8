"""Writing files atomically: readers (and a resumed run) see a whole file or none, never a truncated one."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["WriteError", "process_alive", "remove_stale_temporaries", "write_atomically"]

#: ``.{name}.{pid}.{8 hex digits}.tmp``: the temporary file of a :func:`write_atomically` of ``name``.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")


class WriteError(OSError):
    """A file or folder could not be written (disk full, read-only folder, ...): ``errno``, ``strerror`` and the
    path (``filename``), shown as ``could not write <path>: <reason>``."""

    def __str__(self) -> str:
        return f"could not write {self.filename}: {self.strerror}"

    @classmethod
    def of(cls, error: OSError, path: str | os.PathLike[str]) -> WriteError:
        """The error ``error`` raised while writing ``path``, as a :class:`WriteError` naming ``path``."""
        return cls(error.errno, error.strerror or str(error), str(path))


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (``True`` where that cannot be known)."""
    if os.name == "nt":  # os.kill would end the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Remove the temporary files of :func:`write_atomically` (of ``name`` only, if given) in ``folder`` whose
    writing process has ended (killed before it could remove them); those of live processes stay.

    Returns:
        The files removed.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMPORARY.fullmatch(path.name)
        if match and (name is None or match["name"] == name) and not process_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_atomically(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(handle)`` on a temporary file next to ``path``, then rename it to ``path``.

    The temporary name is unique per call (several processes may write into one folder) and the file is created
    like any other (the umask applies). On any error the temporary file is removed and the error re-raised, an
    ``OSError`` (a full disk, a read-only folder) as a :class:`WriteError` naming ``path``; an existing ``path`` is
    then left as it was. Temporary files of earlier writers of ``path`` that were killed are removed.

    Args:
        path: Destination file; parent folders are created.
        write: Writes the content to the binary handle it is given (``torch.save(obj, handle)``,
            ``image.save(handle, format="PNG")``, ``handle.write(data)``, ...).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        WriteError: The file could not be written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent, path.name)
        with open(tmp, "xb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            raise WriteError.of(error, path) from error
        raise
    return path
