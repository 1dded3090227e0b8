"""``benchmarks/sam_attention.py``: where eq. (9)'s target sits between the image's mean logits and the pixel's own."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

from uda_sam.data.labels import IGNORE_INDEX
from uda_sam.nn import SelfAttentionModule

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sam_attention.py"


@pytest.fixture(scope="module")
def diagnostic() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sam_attention_diagnostic", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uniform_attention_pulls_every_pixel_to_the_image_mean(diagnostic: ModuleType) -> None:
    logits = torch.randn(5, 40)
    uniform = logits.mean(dim=1, keepdim=True).expand_as(logits)
    assert diagnostic.distance_to_image_mean(uniform, logits) == pytest.approx(0.0, abs=1e-6)
    assert diagnostic.distance_to_image_mean(logits, logits) == pytest.approx(1.0)


def test_same_class_target_is_the_class_mean_and_skips_ignored_pixels(diagnostic: ModuleType) -> None:
    logits = torch.tensor([[1.0, 3.0, 10.0, 20.0, 7.0]])
    labels = torch.tensor([0, 0, 4, 4, IGNORE_INDEX])
    target, valid = diagnostic.same_class_target(logits, labels)
    assert valid.tolist() == [True, True, True, True, False]
    assert target[0, :4].tolist() == [2.0, 2.0, 15.0, 15.0]


def test_a_sam_with_a_constant_transform_attends_uniformly(diagnostic: ModuleType) -> None:
    """A transform that maps every pixel to the same vector gives ``SAM(P) = mean(P)``: the ratio is 0."""
    sam = SelfAttentionModule(3)
    with torch.no_grad():
        for param in sam.transform.parameters():
            param.zero_()
        sam.transform.bias.fill_(1.0)
    logits = torch.randn(1, 3, 4, 5)
    attended = sam(logits)[0].flatten(1)
    assert diagnostic.distance_to_image_mean(attended, logits[0].flatten(1)) == pytest.approx(0.0, abs=1e-5)


def test_class_attention_shares_against_the_class_pixel_share(diagnostic: ModuleType) -> None:
    """Two road pixels attending only to each other keep all their attention; the pole pixel keeps none."""
    labels = torch.tensor([0, 0, 5, IGNORE_INDEX])
    attention = torch.tensor(
        [
            [0.5, 0.5, 0.0, 0.0],
            [0.5, 0.5, 0.0, 0.0],
            [0.4, 0.4, 0.0, 0.2],  # the ignored pixel's weight is left out of the share
            [0.25, 0.25, 0.25, 0.25],
        ]
    )
    shares = diagnostic.class_attention_shares(attention, labels)
    assert shares[0] == pytest.approx((1.0, 2 / 3, 2))
    assert shares[5] == pytest.approx((0.0, 1 / 3, 1))
    assert set(shares) == {0, 5}
