"""Shared test setup: source-tree imports, offline W&B, few threads, a tiny network and a tiny toy dataset."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from uda_sam.nn import SegmentationNetwork  # noqa: E402  (after the source tree is on the path)

# Tests never talk to the W&B servers and stay quiet; the machine's cores are shared.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
torch.set_num_threads(2)

#: Sizes of the session toy set: target (W, H) and source (W, H).
TOY_SIZE = (64, 32)
TOY_SOURCE_SIZE = (72, 40)

#: The toy stage configs (configs/toy) and the arguments that shrink them to the session toy set and two steps.
TOY_CONFIGS = REPO_ROOT / "configs" / "toy"
SMALL_TOY_RUN = [
    "--data.source_size=[72, 40]",
    "--data.target_size=[64, 32]",
    "--data.batch_size=2",
    "--data.val_batch_size=2",
    "--data.source_holdout=1",
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


class TinySegNet(SegmentationNetwork):
    """A few-thousand-parameter stand-in for DeepLabV2 under the same contract (output stride 8).

    ``forward(x)`` gives logits at ``ceil(H/8) x ceil(W/8)``; ``classifier`` maps the ``feature_channels``-channel
    features to the logits and is the ``"classifier"`` group of ``param_groups``.
    """

    output_stride = 8

    def __init__(self, num_classes: int = 19, feature_channels: int = 8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_channels = feature_channels
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, feature_channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(feature_channels, num_classes, 1)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        features = self.backbone(x)
        logits = self.classifier(features)
        return (logits, features) if return_features else logits

    def upsample_logits(self, logits: Tensor, size: tuple[int, int]) -> Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        return self.classifier.parameters()


@pytest.fixture
def tiny_network() -> Callable[..., TinySegNet]:
    """Factory of seeded :class:`TinySegNet` instances (same seed -> same weights)."""

    def make(seed: int = 0, **kwargs: int) -> TinySegNet:
        torch.manual_seed(seed)
        return TinySegNet(**kwargs)

    return make


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny toy domain pair (4 source, 4 target-train, 2 val, 2 test images at 64x32), made once per session."""
    from uda_sam.data.toy import make_toy_data

    root = tmp_path_factory.mktemp("toy") / "toy"
    return Path(
        make_toy_data(
            root,
            num_source=4,
            num_target_train=4,
            num_val=2,
            num_test=2,
            size=TOY_SIZE,
            source_size=TOY_SOURCE_SIZE,
            seed=0,
        )
    )


@pytest.fixture
def toy_datamodule(toy_root: Path) -> Callable[..., object]:
    """Factory of :class:`~uda_sam.datamodules.UDADataModule` over the session toy set (no workers, native sizes)."""
    from uda_sam.data import GTA5, Cityscapes
    from uda_sam.datamodules import UDADataModule

    def make(**kwargs: object) -> UDADataModule:
        options: dict[str, object] = {
            "source": GTA5(toy_root / "gta5"),
            "target": Cityscapes(toy_root / "cityscapes"),
            "source_size": TOY_SOURCE_SIZE,
            "target_size": TOY_SIZE,
            "batch_size": 1,
            "val_batch_size": 2,
            "num_workers": 0,
            "persistent_workers": False,
        }
        options.update(kwargs)
        return UDADataModule(**options)  # type: ignore[arg-type]

    return make
