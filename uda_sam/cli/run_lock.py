"""One command at a time per run folder: a lock file next to the folder names the process that uses it.

``uda-sam fit`` locks its checkpoint and pseudo-label folders, ``uda-sam pipeline`` its output folder. A second
command on a folder in use, or on a folder below one in use, stops at once and names the process holding it. The
lock of ``runs/toy/no_pseudo/checkpoints`` is the file ``runs/toy/no_pseudo/.checkpoints.lock``, next to the folder
rather than in it (Lightning warns about any file in a checkpoint folder), holding the pid, host, command and start
time of its holder, and locked (``fcntl.lockf``) while the command runs. The operating system releases that lock
when the process ends, however it ends (forked children, such as data-loader workers, do not hold it), so the lock
of a killed command is stale at once and the next command takes it over. Under DDP only the process of global rank
0 takes locks; processes it launches (``ddp_spawn`` children) find the folder held by their parent and go on.
Where the operating system cannot lock files (Windows), commands run unlocked; where the file system cannot (some
network file systems) or the lock file cannot be made (a read-only parent folder), unlocked with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["FolderInUseError", "lock_file", "run_lock"]

#: errno values of a file system that does not lock files, or of a lock file that cannot be made (a folder whose
#: parent is read-only, such as a container's mount point).
_NO_LOCKS = {
    errno.ENOLCK,
    errno.EOPNOTSUPP,
    errno.ENOSYS,
    errno.EINVAL,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
}


class FolderInUseError(FileExistsError):
    """Another live process holds the lock of a folder this command would write to."""


def lock_file(folder: str | os.PathLike[str]) -> Path:
    """The lock file of ``folder``: ``.{name}.lock`` next to it."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


#: Lock files this process holds, and their descriptors: a POSIX lock is the process's, so another descriptor of
#: one of these files must never be opened and closed here (closing it would release the lock).
_HELD: dict[Path, int] = {}


def _holder(fd: int) -> dict[str, Any]:
    """The record in an open lock file (empty when it has none)."""
    for attempt in range(2):  # a holder that just took the lock may not have written its record yet
        os.lseek(fd, 0, os.SEEK_SET)
        with contextlib.suppress(ValueError):
            record = json.loads(os.read(fd, 65536) or b"{}")
            if isinstance(record, dict) and (record or attempt):
                return record
        time.sleep(0.1)
    return {}


def _ours(record: dict[str, Any]) -> bool:
    """Held by this process or by the one that launched it (the ``ddp_spawn`` parent of rank 0)."""
    return record.get("host") == socket.gethostname() and record.get("pid") in (os.getpid(), os.getppid())


def _describe(record: dict[str, Any]) -> str:
    pid, host = record.get("pid", "?"), record.get("host", "?")
    command = f" (`{record['command']}`, started {record.get('started', '?')})" if "command" in record else ""
    return f"process {pid} on {host}{command}"


def _try_lock(path: Path, exclusive: bool) -> tuple[int | None, dict[str, Any]]:
    """``(fd, record)``: ``fd`` holds a lock of ``path`` (exclusive: created if need be), or is ``None`` when
    another process holds it; ``record`` is the holder's (for a lock just taken, the previous holder's)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY, 0o644)
        try:
            fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as error:
            record = _holder(fd) if error.errno in (errno.EACCES, errno.EAGAIN) else None
            os.close(fd)
            if record is None:
                raise
            return None, record
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd, _holder(fd)
        os.close(fd)  # released and removed by its holder between our open and lock: lock the new file


def _check_folders_above(folder: Path) -> None:
    """Refuse a folder below one that another live process holds."""
    for above in folder.parents:
        path = lock_file(above) if above.parent != above else None
        if path is None or path in _HELD or not path.is_file():
            continue
        try:
            fd, record = _try_lock(path, exclusive=False)
        except OSError:  # released meanwhile, or not readable here
            continue
        if fd is not None:  # stale: left by a process that ended; not ours to remove
            os.close(fd)
        elif not _ours(record):
            raise FolderInUseError(
                f"{folder} is inside {above}, which {_describe(record)} is using (lock file {path}); wait for "
                "it to finish or stop it, or choose another folder"
            )


def _acquire(folder: Path, command: str) -> Path | None:
    """Lock ``folder`` for ``command``; its lock file, or ``None`` when this process (or its parent) holds it."""
    path = lock_file(folder)
    if path in _HELD:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, record = _try_lock(path, exclusive=True)
    if fd is None:
        if _ours(record):
            return None
        raise FolderInUseError(
            f"{folder} is in use by {_describe(record)} (lock file {path}); wait for it to finish or stop it, "
            "or choose another folder"
        )
    if record.get("pid") is not None:
        rank_zero_info(f"Taking over {path} from {_describe(record)}, which no longer holds it")
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
    mine["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(mine).encode())
    _HELD[path] = fd
    return path


def _release(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(_HELD.pop(path))


@contextlib.contextmanager
def run_lock(folders: Iterable[str | os.PathLike[str]], command: str) -> Iterator[None]:
    """Hold the locks of ``folders`` while the block runs (see the module docstring).

    Folders below another of ``folders`` are covered by its lock. Only the process of global rank 0 locks; in
    the others (``ddp`` processes launched by rank 0, every process of a ``torchrun`` job but one) this does nothing.

    Args:
        folders: The folders the command writes to.
        command: What holds them, for the message of a command refused (e.g. ``"uda-sam fit"``).

    Raises:
        FolderInUseError: A folder, or a folder above it, is in use by another live process, named in the message.
    """
    resolved = sorted({Path(f).resolve() for f in folders})
    tops = [f for f in resolved if not any(other in f.parents for other in resolved)]
    if fcntl is None or rank_zero_only.rank != 0 or not tops:
        yield
        return
    held: list[Path] = []
    try:
        for folder in tops:
            _check_folders_above(folder)
            try:
                path = _acquire(folder, command)
            except OSError as error:
                if error.errno not in _NO_LOCKS or isinstance(error, FolderInUseError):
                    raise
                rank_zero_warn(f"{command}: {folder} cannot be locked ({error.strerror}); running unlocked")
                continue
            if path is not None:
                held.append(path)
        yield
    finally:
        for path in reversed(held):
            _release(path)
