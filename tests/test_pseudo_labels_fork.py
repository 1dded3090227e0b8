"""A pseudo-label generation in a process started by ``fork`` (Lightning's ``ddp_fork`` / ``ddp_notebook``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The parent uses torch's thread pool first, then forks a child that makes a generation (its label threads start
# in the child, where torch operations in new threads can fail) and exits with the child's exit status.
SCRIPT = textwrap.dedent(
    """
    import multiprocessing
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, sys.argv[3])
    from conftest import TinySegNet

    from uda_sam.data import Cityscapes, SegmentationTransform
    from uda_sam.data.toy import make_toy_data
    from uda_sam.pseudo_labels.generation import generate_pseudo_labels

    root, out = Path(sys.argv[1]), Path(sys.argv[2])


    def child() -> None:
        # What a forked rank must do first in its main thread (Lightning does it only without OMP_NUM_THREADS):
        # with the parent's OpenMP pool up, a parallel torch operation in the child hangs otherwise.
        torch.set_num_threads(1)
        torch.manual_seed(0)
        dataset = Cityscapes(
            root / "cityscapes", split="train", labels="optional", transform=SegmentationTransform(size=(64, 32))
        )
        generate_pseudo_labels(TinySegNet(), dataset, out, batch_size=2, num_workers=0, progress=False)


    make_toy_data(root, num_source=1, num_target_train=6, num_val=1, num_test=1, size=(64, 32),
                  source_size=(64, 32), seed=0)
    torch.randn(512, 512) @ torch.randn(512, 512)  # the parent's intra-op thread pool is up before the fork
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(120)
    sys.exit(process.exitcode if process.exitcode is not None else 99)
    """
)


def test_generation_completes_in_a_forked_process(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    out = tmp_path / "labels"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "toy"), str(out), str(REPO / "tests")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.rglob("*.png"))) == 6 and (out / "thresholds.json").is_file()
