"""Two commands on one folder: the second stops at once naming the first; stale locks are taken over; DDP runs."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only

import uda_sam.cli.run_lock as run_lock_module
from uda_sam.cli.entry_point import main
from uda_sam.cli.run_lock import FolderInUseError, lock_file, run_lock

try:
    from tests.test_pipeline import pipeline_file
except ImportError:  # tests/ itself is on sys.path (no tests/__init__.py)
    from test_pipeline import pipeline_file  # type: ignore[no-redef]

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods() or os.name == "nt", reason="needs fork and fcntl"
)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread while processes are forked: a child of a process whose OpenMP pool ran with more threads
    hangs at its first parallel operation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy"
FORK = multiprocessing.get_context("fork")


@contextmanager
def held_by_another_process(folder: Path, command: str = "uda-sam fit") -> Iterator[multiprocessing.Process]:
    """A live process holding ``folder``'s lock while the block runs (it is killed after)."""
    ready = FORK.Event()

    def hold() -> None:
        with run_lock([folder], command):
            ready.set()
            signal.pause()

    holder = FORK.Process(target=hold, daemon=True)
    holder.start()
    try:
        assert ready.wait(30)
        yield holder
    finally:
        holder.kill()
        holder.join()


def test_a_folder_in_use_is_refused_naming_its_holder_and_a_stale_lock_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "runs" / "checkpoints"
    with held_by_another_process(folder) as holder:
        assert lock_file(folder) == tmp_path / "runs" / ".checkpoints.lock"
        with pytest.raises(FolderInUseError) as refused:
            with run_lock([folder], "uda-sam fit"):
                pytest.fail("entered a folder in use")
        message = str(refused.value)
        assert (
            f"{folder} is in use by process {holder.pid} on {socket.gethostname()} (`uda-sam fit`" in message
        )
        # A folder below the one in use is refused too, naming the folder above.
        with pytest.raises(FolderInUseError, match=f"inside {folder}, which process {holder.pid}"):
            with run_lock([folder / "seed_0" / "pseudo_labels"], "uda-sam fit"):
                pass
    # The holder was killed (SIGKILL): its lock file stays, stale; the next command takes it over and removes it.
    assert lock_file(folder).is_file()
    with caplog.at_level("INFO"), run_lock([folder], "uda-sam pipeline"):
        assert f'"pid": {os.getpid()}' in lock_file(folder).read_text()
    assert f"from process {holder.pid}" in caplog.text and "which no longer holds it" in caplog.text
    assert not lock_file(folder).exists()


def test_a_lock_held_by_this_process_or_its_parent_lets_it_in(tmp_path: Path) -> None:
    """The pipeline's own stages, and ``ddp_spawn`` children of the process holding the lock, are not refused;
    processes of another rank take no lock at all."""
    outer, inner = tmp_path / "out", tmp_path / "out" / "seed_0" / "checkpoints"
    with run_lock([outer], "uda-sam pipeline"):
        with run_lock([inner, outer], "uda-sam fit"):  # a stage in the same process
            assert not lock_file(inner).exists()  # covered by its folder's lock: no second file

        def launched_child() -> None:
            run_lock_module._HELD.clear()  # a fresh process, as a `ddp_spawn` child is
            with run_lock([outer], "uda-sam fit"):
                assert not run_lock_module._HELD  # nothing taken: its parent holds the folder

        child = FORK.Process(target=launched_child)
        child.start()
        child.join()
        assert child.exitcode == 0
    with held_by_another_process(outer):
        rank, rank_zero_only.rank = rank_zero_only.rank, 1
        try:
            with run_lock([outer], "uda-sam fit"):  # rank 1 of a `ddp` or torchrun job: locks nothing
                pass
        finally:
            rank_zero_only.rank = rank


def test_a_folder_that_cannot_be_locked_runs_unlocked_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock file that cannot be made (a folder whose parent is read-only) does not stop the command."""
    real_open = os.open

    def read_only_parent(path: object, *args: object, **kwargs: object) -> int:
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", read_only_parent)
    with pytest.warns(UserWarning, match="cannot be locked .Permission denied.; running unlocked"):
        with run_lock([tmp_path / "checkpoints"], "uda-sam fit"):
            pass


SMALL = [
    "--data.source_size=[72, 40]",
    "--data.target_size=[64, 32]",
    "--data.val_batch_size=2",
    "--data.source_holdout=1",
    "--trainer.max_steps=1",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
]


def fit_args(toy_root: Path) -> list[str]:
    """`uda-sam fit` of the toy No Pseudo stage, one step, into ``runs/toy/no_pseudo`` of the working folder."""
    data = [f"--data.source.root={toy_root / 'gta5'}", f"--data.target.root={toy_root / 'cityscapes'}"]
    return ["fit", "--config", str(TOY / "no_pseudo.yaml"), *SMALL, *data, "--data.batch_size=1"]


def test_fit_and_pipeline_on_a_folder_in_use_stop_at_once(
    tmp_path: Path, toy_root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    checkpoints = tmp_path / "runs" / "toy" / "no_pseudo" / "checkpoints"
    with held_by_another_process(checkpoints) as holder:
        assert main(fit_args(toy_root)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"uda-sam fit: error: {checkpoints} is in use by process {holder.pid}")
        assert not checkpoints.exists()  # nothing written

    pipeline = pipeline_file(tmp_path, toy_root)
    with held_by_another_process(tmp_path / "out", "uda-sam pipeline") as holder:
        assert main(["pipeline", "--config", str(pipeline)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(
            f"uda-sam pipeline: error: {tmp_path / 'out'} is in use by process {holder.pid}"
        )
        assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("one_thread")
def test_a_ddp_fit_holds_its_lock_in_the_launching_process(
    tmp_path: Path, toy_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 processes (``ddp_fork``): the fit runs to its end under its own lock, which is gone afterwards."""
    monkeypatch.chdir(tmp_path)
    assert main([*fit_args(toy_root), "--trainer.devices=2", "--trainer.strategy=ddp_fork"]) == 0
    last = tmp_path / "runs" / "toy" / "no_pseudo" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 1
    assert not list(tmp_path.rglob("*.lock"))
