"""Tests of DeepLabV2 and FCN-8s: shapes, frozen BatchNorm, parameter groups, pretrained weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models

import uda_sam.nn.backbones as backbones
from uda_sam.nn import DeepLabV2, FCN8s


@pytest.fixture(scope="module")
def deeplab18() -> DeepLabV2:
    torch.manual_seed(0)
    return DeepLabV2(num_classes=5, backbone="resnet18")


@pytest.fixture(scope="module")
def fcn() -> FCN8s:
    torch.manual_seed(0)
    return FCN8s(num_classes=5)


def _batchnorms(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("size", [(33, 65), (17, 24), (40, 41)])
def test_deeplab_shapes_odd_sizes(deeplab18: DeepLabV2, size: tuple[int, int]) -> None:
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        logits, features = deeplab18(x, return_features=True)
    expected = (math.ceil(size[0] / 8), math.ceil(size[1] / 8))
    assert logits.shape == (1, 5, *expected)
    assert features.shape == (1, deeplab18.feature_channels, *expected) and deeplab18.feature_channels == 512
    assert deeplab18.upsample_logits(logits, size).shape == (1, 5, *size)
    assert deeplab18.upsample_logits(logits, (2 * size[0], 2 * size[1])).shape == (
        1,
        5,
        2 * size[0],
        2 * size[1],
    )


def test_deeplab_classifier_is_sum_of_four_dilated_convs(deeplab18: DeepLabV2) -> None:
    convs = deeplab18.classifier.convs
    assert [c.dilation for c in convs] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert all(c.padding == c.dilation and c.kernel_size == (3, 3) for c in convs)
    features = torch.randn(1, 512, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(deeplab18.classifier(features), sum(c(features) for c in convs))


def test_frozen_batchnorm_stays_frozen(deeplab18: DeepLabV2) -> None:
    deeplab18.train()
    bns = _batchnorms(deeplab18)
    assert bns and all(not bn.training for bn in bns)
    assert all(not p.requires_grad for bn in bns for p in bn.parameters())
    assert deeplab18.classifier.training and deeplab18.backbone.layer1.training
    before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    deeplab18(torch.randn(2, 3, 24, 24) * 3 + 1).sum().backward()
    for bn, (mean, var) in zip(bns, before, strict=True):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    deeplab18.zero_grad(set_to_none=True)


def test_unfrozen_batchnorm_updates() -> None:
    net = DeepLabV2(num_classes=3, backbone="resnet18", freeze_bn=False).train()
    bn = _batchnorms(net)[0]
    assert bn.training and bn.weight.requires_grad
    before = bn.running_mean.clone()
    net(torch.randn(2, 3, 16, 16))
    assert not torch.equal(bn.running_mean, before)


def test_deeplab_param_groups(deeplab18: DeepLabV2) -> None:
    groups = deeplab18.param_groups(lr=2.5e-4)
    assert [g["lr"] for g in groups] == pytest.approx([2.5e-4, 2.5e-3])
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in deeplab18.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in deeplab18.classifier.parameters()}
    torch.optim.SGD(groups, lr=2.5e-4, momentum=0.9)  # accepted as-is


def test_resnet101_is_default_with_output_stride_8() -> None:
    net = DeepLabV2()
    assert net.num_classes == 19 and net.feature_channels == 2048 and net.backbone.name == "resnet101"
    assert len(net.backbone.layer3) == 23
    assert all(m.stride == (1, 1) for m in net.backbone.layer4.modules() if isinstance(m, nn.Conv2d))
    assert {
        m.dilation
        for m in net.backbone.layer4.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    } == {(4, 4)}


def test_unknown_backbone() -> None:
    with pytest.raises(ValueError, match=r"resnet101.*resnet50.*resnet18"):
        DeepLabV2(backbone="resnet34")


def test_weights_file_loading(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    net = DeepLabV2(num_classes=3, backbone="resnet18", pretrained=str(path))
    torch.testing.assert_close(net.backbone.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(net.backbone.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    with pytest.raises(ValueError, match="do not match"):
        DeepLabV2(backbone="resnet50", pretrained=path)


def test_missing_or_unreadable_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        DeepLabV2(backbone="resnet18", pretrained=str(missing))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        DeepLabV2(backbone="resnet18", pretrained=str(garbage))


def test_imagenet_weights_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(weights: object) -> dict:
        raise OSError("network unreachable")

    monkeypatch.setattr(backbones, "_download_state_dict", offline)
    with pytest.raises(RuntimeError, match=r"ResNet18_Weights\.IMAGENET1K_V1.*pretrained="):
        DeepLabV2(backbone="resnet18", pretrained="imagenet")


def test_imagenet_weights_path(monkeypatch: pytest.MonkeyPatch) -> None:
    source = models.resnet18()
    monkeypatch.setattr(backbones, "_download_state_dict", lambda weights: source.state_dict())
    net = DeepLabV2(backbone="resnet18", pretrained="imagenet")
    torch.testing.assert_close(
        net.backbone.layer2[0].downsample[0].weight, source.layer2[0].downsample[0].weight
    )


@pytest.mark.parametrize("size", [(33, 65), (20, 9)])
def test_fcn8s_shapes(fcn: FCN8s, size: tuple[int, int]) -> None:
    fcn.eval()
    with torch.no_grad():
        scores, features = fcn(torch.randn(1, 3, *size), return_features=True)
        expected = (math.ceil(size[0] / 8), math.ceil(size[1] / 8))
        assert scores.shape == (1, 5, *expected)
        assert features.shape == (1, fcn.feature_channels, math.ceil(size[0] / 32), math.ceil(size[1] / 32))
        assert fcn.upsample_logits(scores, size).shape == (1, 5, *size)
        big = (2 * size[0], 2 * size[1])
        assert fcn.upsample_logits(scores, big).shape == (1, 5, *big)


def test_fcn8s_upsampling_is_bilinear_at_init(fcn: FCN8s) -> None:
    constant = torch.ones(1, 5, 3, 4)
    with torch.no_grad():
        up = fcn.upsample_logits(constant, (24, 32))
    # Away from the border a bilinear kernel reproduces a constant map.
    torch.testing.assert_close(up[..., 4:-4, 4:-4], torch.ones_like(up[..., 4:-4, 4:-4]))


def test_fcn8s_param_groups_and_vgg16_layout(fcn: FCN8s) -> None:
    groups = fcn.param_groups(lr=1e-5, classifier_lr_mult=1.0)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in fcn.parameters()}
    assert [g["lr"] for g in groups] == [1e-5, 1e-5]
    with torch.device("meta"):
        vgg = models.vgg16()
    tv_features = {
        k.removeprefix("features."): v.shape for k, v in vgg.state_dict().items() if k.startswith("features.")
    }
    assert tv_features == {k: v.shape for k, v in fcn.features.state_dict().items()}
    assert vgg.classifier[0].weight.numel() == fcn.fc6.weight.numel()


def test_fcn8s_bad_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="classifier.0"):
        FCN8s(pretrained=path)
