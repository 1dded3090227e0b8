"""write_atomically: a whole file or none, no temporary files left behind, the usual permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from uda_sam.files import write_atomically


def test_writes_the_file_and_creates_parents(tmp_path: Path) -> None:
    path = write_atomically(tmp_path / "a" / "b.json", lambda handle: handle.write(b"{}"))
    assert path.read_bytes() == b"{}"
    assert os.listdir(path.parent) == ["b.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600: other users may read results


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    path.write_bytes(b"old")

    def fail(handle) -> None:
        handle.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(path, fail)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["result.json"]
