"""DilatedFCN: the package's network interface, frozen BatchNorm, and starting from a trained model's file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from uda_sam.nn import DilatedFCN, SelfAttentionModule


def test_forward_gives_logits_at_output_stride_4_and_upsamples_to_the_image() -> None:
    network = DilatedFCN(width=8)
    images = torch.randn(2, 3, 32, 64)
    logits, features = network(images, return_features=True)
    assert logits.shape == (2, 19, 8, 16) and features.shape == (2, network.feature_channels, 8, 16)
    assert torch.equal(network.classifier(features), logits)
    assert network.upsample_logits(logits, (32, 64)).shape == (2, 19, 32, 64)
    assert SelfAttentionModule(19)(logits).shape == logits.shape  # the SAM runs on its P


def test_frozen_batchnorm_keeps_its_statistics_and_leaves_the_optimiser() -> None:
    network = DilatedFCN(width=8, freeze_bn=True).train()
    norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    network(torch.randn(2, 3, 32, 64)).sum().backward()
    assert all(not m.training for m in norms)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True))
    grouped = {id(p) for group in network.param_groups(1e-3) for p in group["params"]}
    assert not grouped & {id(p) for m in norms for p in m.parameters()}
    assert grouped == {id(p) for p in network.parameters() if p.requires_grad}
    trainable = DilatedFCN(width=8).train()
    assert all(m.training for m in trainable.modules() if isinstance(m, nn.BatchNorm2d))


def test_weights_from_a_checkpoint_or_a_state_dict(tmp_path: Path) -> None:
    trained = DilatedFCN(width=8)
    with torch.no_grad():
        for p in trained.parameters():
            p.uniform_(-1, 1)
    state = trained.state_dict()
    checkpoint = {
        "state_dict": {**{f"network.{k}": v for k, v in state.items()}, "sam.conv.weight": torch.ones(1)}
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    torch.save(state, tmp_path / "network.pt")
    for file in ("last.ckpt", "network.pt"):
        loaded = DilatedFCN(width=8, weights=str(tmp_path / file))
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_a_weights_file_that_does_not_fit_names_the_file(tmp_path: Path) -> None:
    torch.save(DilatedFCN(width=16).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"wide\.pt' does not fit DilatedFCN\(num_classes=19, width=8\)"):
        DilatedFCN(width=8, weights=str(tmp_path / "wide.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        DilatedFCN(weights=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="width"):
        DilatedFCN(width=0)
